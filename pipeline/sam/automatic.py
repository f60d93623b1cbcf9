"""Segment everything: SAM 2.1's automatic mask generator on our batched SAM model.

``SAM2AutomaticMaskGenerator`` prompts SAM with a grid of points over the image (and over crops
of it), keeps the masks SAM is confident in and that are stable, and removes duplicates by box
NMS. This module does the same, with the same arguments and sam2's own helpers
(``sam2.utils.amg``, torchvision's ``batched_nms``), so its masks are the library's; what it adds
is how the work reaches the device:

- the images and crops go through our batched image encoder (``SamModel._encode``,
  ``sam.batch_size`` at a time) once each; the full image's features may be handed in, already
  computed for the image's other prompts, and are then not computed again;
- each decoder call answers ``points_per_batch`` points of one crop (the library's calls, so the
  logits are its own to the bit); masks are upsampled ``MASK_PIXELS`` at a time and only those
  past the IoU filter, and survivors leave the device as COCO run boundaries, so memory stays
  bounded on large photos (the library holds every mask of a batch at full resolution);
- a decoder call out of GPU memory is retried with half the points, down to one.

``min_mask_region_area`` is SAM 2.1's meaning of it: the generator hands it to the predictor as
``max_hole_area`` and ``max_sprinkle_area``, which fill holes and remove islands of at most that
many pixels of the decoder's low-resolution masks (``sam.image_size / 4`` a side) before
upsampling. The library needs its optional CUDA extension for that and, without it (as sam2 is
installed here), warns and skips it; here it always runs (OpenCV's 8-connected labelling).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from pipeline.sam import masks as mask_codec
from pipeline.sam.host_work import quality_of
from pipeline.sam.prompts import Prompt
from pipeline.sam.model import MASK_PIXELS, Candidates, SamModel, SegmentOOM, _free_gpu_memory, _short, autocast, rles_of

log = logging.getLogger(__name__)

SOURCE = "automatic"  # the objects table's ``source`` of these masks


@dataclass(frozen=True)
class AutomaticArgs:
    """``SAM2AutomaticMaskGenerator``'s arguments, with its defaults (sam2 1.1.0). Not exposed:
    ``point_grids`` (explicit grids), ``mask_threshold`` (0, as everywhere in this project),
    ``output_mode`` (masks leave as COCO RLE) and ``use_m2m``."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    multimask_output: bool = True

    def __post_init__(self):
        problems = []
        if self.points_per_side < 1 or self.points_per_batch < 1:
            problems.append("points_per_side and points_per_batch must be at least 1")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            problems.append("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
        elif int(self.points_per_side / self.crop_n_points_downscale_factor ** self.crop_n_layers) < 1:
            problems.append(f"points_per_side={self.points_per_side} leaves no points in crop layer {self.crop_n_layers} "
                            f"(downscaled by {self.crop_n_points_downscale_factor} per layer)")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            problems.append("crop_overlap_ratio must be in [0, 1)")
        if self.stability_score_offset < 0 or self.min_mask_region_area < 0:
            problems.append("stability_score_offset and min_mask_region_area must be >= 0")
        if problems:
            raise ValueError("automatic: " + "; ".join(problems))


@dataclass
class AutoMasks:
    """One image's masks, in the generator's order (by its NMS). Boxes are the masks' tight
    boxes in pixel edges, as the objects table has them (the library's ``bbox`` is XYWH of
    inclusive pixel indices: ``[x0, y0, x1 - 1 - x0, y1 - 1 - y0]`` here)."""

    size: tuple[int, int]  # (h, w) of the image
    scores: np.ndarray  # (N,) float32, SAM's predicted IoU (``predicted_iou``)
    stability: np.ndarray  # (N,) float32, ``stability_score``
    boxes: np.ndarray  # (N, 4) float32 xyxy pixel edges
    areas: np.ndarray  # (N,) int64
    points: np.ndarray  # (N, 2) float32, the grid point that made each mask (``point_coords``), image pixels
    crop_boxes: np.ndarray  # (N, 4) int64 xyxy, the crop each mask came from (``crop_box``, as XYWH there)
    runs: list = field(repr=False)  # N (first pixel value, change positions) pairs, or RLE dicts
    quality: Optional[list] = None  # N dicts of quality.py's metrics, when the model was given a QaConfig
    _rles: Optional[list] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def rles(self) -> list[dict]:
        """N dicts ``{"size": [h, w], "counts": str}``, exactly as ``pycocotools.mask.encode`` gives."""
        if self._rles is None:
            self._rles = rles_of(self.runs, self.size)
        return self._rles

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool at the image's resolution (decoded from the RLE; the pipeline needs none)."""
        if not len(self):
            return np.zeros((0, *self.size), bool)
        return np.stack([mask_codec.decode(r) for r in self.rles])

    def as_prompts(self) -> tuple[list[Prompt], list[Candidates]]:
        """Per mask a point prompt (its grid point, ``source="automatic"``, no class) and a
        one-candidate answer: what ``segment.object_rows`` turns into objects rows. Their
        ``stability`` is the generator's (at ``stability_score_offset``, 1.0 by default as for
        other rows); with the model's QaConfig clean-up on, masks were cleaned after the NMS."""
        prompts = [Prompt(points=p[None].astype(np.float32), point_labels=np.ones(1, np.int32), source=SOURCE) for p in self.points]
        answers = [Candidates(self.scores[i:i + 1], self.areas[i:i + 1], self.boxes[i:i + 1], self.size, [self.runs[i]],
                              quality=None if self.quality is None else [self.quality[i]]) for i in range(len(self))]
        return prompts, answers


class AutomaticMaskGenerator:
    """``SAM2AutomaticMaskGenerator`` on a ``SamModel``: ``generate(image)`` for one image,
    ``generate_batch(images)`` for several (their encoder passes batched)."""

    def __init__(self, sam: SamModel, args: Optional[AutomaticArgs] = None, **overrides):
        from sam2.utils.amg import build_all_layer_point_grids

        self.sam = sam
        self.args = dataclasses.replace(args or AutomaticArgs(), **overrides)
        a = self.args
        self.point_grids = build_all_layer_point_grids(a.points_per_side, a.crop_n_layers, a.crop_n_points_downscale_factor)

    def generate(self, image: np.ndarray, uri: Optional[str] = None) -> AutoMasks:
        (answer,) = self.generate_batch([image], uris=[uri])
        if isinstance(answer, SegmentOOM):
            raise answer
        return answer

    def generate_batch(self, images: Sequence[np.ndarray], features: Optional[dict] = None,
                       uris: Optional[Sequence[Optional[str]]] = None) -> list:
        """Every image's masks: per image an ``AutoMasks``, or a ``SegmentOOM`` when the GPU ran
        out of memory on it even one point at a time. ``features``: ``SamModel._encode(images)``
        when the caller already has them (then only the crops are encoded here)."""
        import torch
        from sam2.utils.amg import MaskData, generate_crop_boxes

        uris = list(uris) if uris is not None else [None] * len(images)
        units = []  # (image, crop box, layer), in the library's order
        for i, image in enumerate(images):
            crop_boxes, layers = generate_crop_boxes(image.shape[:2], self.args.crop_n_layers, self.args.crop_overlap_ratio)
            units += [(i, box, layer) for box, layer in zip(crop_boxes, layers)]
        left = [sum(u[0] == i for u in units) for i in range(len(images))]
        data = [MaskData() for _ in images]
        results: list = [None] * len(images)

        def crop(unit, feats, k):
            i, box, layer = unit
            if isinstance(results[i], SegmentOOM):
                return
            try:
                data[i].cat(self._crop(feats, k, images[i], box, layer, uris[i]))
            except torch.OutOfMemoryError as exc:
                _free_gpu_memory()
                results[i] = SegmentOOM(f"out of GPU memory in the automatic mask generator even one point at a time ({_short(exc)})")
            left[i] -= 1
            if left[i] == 0 and results[i] is None:
                results[i] = self._finish(data[i], images[i].shape[:2], len(self.point_grids) > 1)
                data[i] = None

        def flush(group):
            group = [u for u in group if not isinstance(results[u[0]], SegmentOOM)]
            if not group:
                return
            try:
                feats = self.sam._encode([_cut(images[i], box) for i, box, _ in group])
            except torch.OutOfMemoryError as exc:
                _free_gpu_memory()
                if len(group) == 1:
                    results[group[0][0]] = SegmentOOM(f"out of GPU memory in the image encoder ({_short(exc)})")
                    return
                log.warning("out of GPU memory encoding %d crops at once; retrying one at a time", len(group))
                for unit in group:
                    flush([unit])
                return
            for k, unit in enumerate(group):
                crop(unit, feats, k)

        with torch.inference_mode(), autocast(self.sam.dtype, self.sam.device):
            if features is not None:  # the full images, already encoded; each image's crops still come after
                for unit in units:
                    if unit[2] == 0:
                        crop(unit, features, unit[0])
                units = [u for u in units if u[2] != 0]
            step = self.sam.cfg.batch_size
            for start in range(0, len(units), step):
                flush(units[start:start + step])
        self.sam._settle()
        return results

    # ------------------------------------------------------------------ one crop

    def _crop(self, features: dict, k: int, image: np.ndarray, crop_box: list, layer: int, uri):
        """``SAM2AutomaticMaskGenerator._process_crop`` on the crop's features (``k``-th of the
        batch): its grid in ``points_per_batch`` chunks, box NMS, back to image coordinates."""
        import torch
        from sam2.utils.amg import MaskData, uncrop_boxes_xyxy, uncrop_points
        from torchvision.ops.boxes import batched_nms

        x0, y0, x1, y1 = crop_box
        crop_hw = (y1 - y0, x1 - x0)
        points = self.point_grids[layer] * np.array(crop_hw)[None, ::-1]
        data = MaskData()
        step, start = self.args.points_per_batch, 0
        while start < len(points):
            part = points[start:start + step]
            started = self.sam._mark()
            try:
                if self.sam.faults:
                    self.sam.faults.maybe_oom([uri], len(part))
                data.cat(self._points(features, k, part, crop_hw, crop_box, image.shape[:2]))
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                _free_gpu_memory()
                step = max(1, len(part) // 2)
                log.warning("out of GPU memory with %d points per decoder call; retrying with %d", len(part), step)
                continue
            finally:
                self.sam._elapsed(started, "masks")
            start += len(part)
        keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]),
                           iou_threshold=self.args.box_nms_thresh)
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["runs"]))], dtype=torch.int64).reshape(-1, 4)
        return data

    def _points(self, features: dict, k: int, points: np.ndarray, crop_hw: tuple, crop_box: list, orig_hw: tuple):
        """``_process_batch``: one decoder call for these points (crop pixels), then the IoU
        filter, stability, threshold, boxes and the crop-edge filter; survivors as run
        boundaries in the image's frame."""
        import torch
        import torch.nn.functional as F
        from sam2.utils.amg import (MaskData, batched_mask_to_box, calculate_stability_score, is_box_near_crop_edge,
                                    uncrop_masks)

        a, sam, model = self.args, self.sam, self.sam.model
        pts = torch.as_tensor(points, dtype=torch.float32, device=sam.device)
        coords = pts.clone()  # SAM2Transforms.transform_coords(normalize=True): x / w, y / h, then * size
        coords[:, 0] = coords[:, 0] / crop_hw[1]
        coords[:, 1] = coords[:, 1] / crop_hw[0]
        coords = coords * sam.size
        labels = torch.ones(len(pts), dtype=torch.int, device=sam.device)
        sparse, dense = model.sam_prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou, _, _ = model.sam_mask_decoder(  # SAM2ImagePredictor._predict's call
            image_embeddings=features["image_embed"][k].unsqueeze(0),
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=a.multimask_output,
            repeat_image=len(pts) > 1,
            high_res_features=[level[k].unsqueeze(0) for level in features["high_res_feats"]],
        )
        candidates = low_res.shape[1]
        low_res, iou = low_res.float().flatten(0, 1), iou.float().flatten(0, 1)
        pts = pts.repeat_interleave(candidates, dim=0)
        if a.pred_iou_thresh > 0.0:
            keep = iou > a.pred_iou_thresh
            low_res, iou, pts = low_res[keep], iou[keep], pts[keep]
        if a.min_mask_region_area > 0 and len(low_res):
            low_res = fill_small_regions(low_res, a.min_mask_region_area)
        h, w = crop_hw
        out = MaskData(iou_preds=iou[:0], points=pts[:0], stability_score=iou[:0], boxes=torch.zeros(0, 4, device=sam.device),
                       runs=[], areas=torch.zeros(0, dtype=torch.int64, device=sam.device))
        step = max(1, MASK_PIXELS // (h * w))
        for start in range(0, len(low_res), step):
            sl = slice(start, start + step)
            logits = F.interpolate(low_res[sl][:, None], crop_hw, mode="bilinear", align_corners=False)[:, 0]
            stability = calculate_stability_score(logits, 0.0, a.stability_score_offset)
            keep = torch.ones_like(stability, dtype=torch.bool)
            if a.stability_score_thresh > 0.0:
                keep = stability >= a.stability_score_thresh
            masks = logits[keep] > 0.0
            del logits
            boxes = batched_mask_to_box(masks)
            near = is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_hw[1], orig_hw[0]])
            masks, boxes = masks[~near], boxes[~near]
            index = keep.nonzero()[:, 0][~near] + start
            masks = uncrop_masks(masks, crop_box, *orig_hw)
            out.cat(MaskData(iou_preds=iou[index], points=pts[index], stability_score=stability[keep][~near],
                             boxes=boxes, runs=self._runs(masks), areas=masks.sum(dim=(1, 2), dtype=torch.int64)))
            del masks
        return out

    def _runs(self, masks) -> list:
        """(n, H, W) bool masks -> run boundaries (on a GPU) or RLE dicts (pycocotools on a CPU)."""
        if not len(masks):
            return []
        if self.sam.reduce_on_device:
            stats = {key: value.cpu().numpy() for key, value in mask_codec.device_stats(masks).items() if key != "bbox"}
            offsets = np.concatenate([[0], np.cumsum(stats["num_changes"])])
            return [(bool(stats["first"][m]), stats["changes"][offsets[m]:offsets[m + 1]]) for m in range(len(masks))]
        return mask_codec.encode(masks.cpu().numpy())

    # ------------------------------------------------------------------ one image

    def _finish(self, data, size: tuple, several_crops: bool) -> AutoMasks:
        """``_generate_masks``' last step: NMS across crops (smaller crops preferred), then the
        image's masks on the host (with quality metrics when the model has a QaConfig)."""
        import torch
        from torchvision.ops.boxes import batched_nms, box_area

        if "runs" not in dict(data.items()):  # no crop answered (nothing to keep)
            data = _empty(self.sam.device)
        if several_crops and len(data["runs"]):
            scores = (1 / box_area(data["crop_boxes"])).to(data["boxes"].device)
            keep = batched_nms(data["boxes"].float(), scores, torch.zeros_like(data["boxes"][:, 0]), iou_threshold=self.args.crop_nms_thresh)
            data.filter(keep)
        n = len(data["runs"])
        areas = data["areas"].cpu().numpy().astype(np.int64)
        boxes = data["boxes"].float().cpu().numpy().reshape(n, 4) + np.array([0, 0, 1, 1], np.float32)
        boxes[areas == 0] = 0.0
        result = AutoMasks(size=(int(size[0]), int(size[1])), scores=data["iou_preds"].float().cpu().numpy(),
                           stability=data["stability_score"].float().cpu().numpy(), boxes=boxes.astype(np.float32), areas=areas,
                           points=data["points"].float().cpu().numpy().reshape(n, 2),
                           crop_boxes=data["crop_boxes"].cpu().numpy().astype(np.int64).reshape(n, 4), runs=list(data["runs"]))
        if self.sam.qa is not None:
            result.quality = []
            for m in range(n):
                metrics = quality_of(self.sam.qa, result.runs[m], result.size, result.boxes[m], None, float(result.stability[m]))
                if "cleaned" in metrics:
                    result.runs[m], result.areas[m], result.boxes[m] = metrics.pop("cleaned")
                result.quality.append(metrics)
            result._rles = None
        return result


def fill_small_regions(low_res, max_area: int):
    """``SAM2Transforms.postprocess_masks``' clean-up of low-res logits (n, h, w) at threshold 0:
    background regions of at most ``max_area`` pixels become +10 (holes filled), foreground
    regions of at most that many become -10 (islands removed); both found in the logits as
    given, with 8-connectivity, as sam2's CUDA ``get_connected_components`` finds them."""
    import cv2
    import torch

    logits = low_res.cpu().numpy()
    out = logits.copy()
    for m in range(len(logits)):
        for region, value in ((logits[m] <= 0.0, 10.0), (logits[m] > 0.0, -10.0)):
            count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
            small = np.zeros(count, bool)
            small[1:] = stats[1:, cv2.CC_STAT_AREA] <= max_area
            out[m][small[labels]] = value
    return torch.from_numpy(out).to(low_res.device)


def _cut(image: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1, :]


def _empty(device):
    import torch
    from sam2.utils.amg import MaskData

    return MaskData(iou_preds=torch.zeros(0, device=device), points=torch.zeros(0, 2, device=device),
                    stability_score=torch.zeros(0, device=device), boxes=torch.zeros(0, 4, device=device), runs=[],
                    areas=torch.zeros(0, dtype=torch.int64, device=device), crop_boxes=torch.zeros(0, 4, dtype=torch.int64))
