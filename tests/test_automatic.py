"""Segment everything (``pipeline.sam.automatic``) against SAM 2.1's own ``SAM2AutomaticMaskGenerator``.

The reference is the library's generator, built with ``build_sam2`` on the same random-weight
checkpoint file, with the same arguments, on real photos. Its masks must all be found in ours
(IoU >= 0.99, one to one) and the counts must be equal, at ``sam.image_size`` 1024 and below.

Two things the reference needs, neither taken from our code:
- At sizes other than 1024, ``SAM2ImagePredictor._bb_feat_sizes`` (hard-coded for 1024) is set
  to the feature sizes the library itself computes for the model: the fourth value of
  ``SAM2Base._prepare_backbone_features`` (what its video predictor uses), from one forward pass
  at that size.
- With ``min_mask_region_area > 0`` the library fills holes and removes islands through its
  optional CUDA kernel ``sam2.utils.misc.get_connected_components``; sam2 is installed without it
  (scripts/setup.sh), and the library then warns and skips the step. The reference gets a
  stand-in for that one kernel with its contract (8-connected labels and each pixel's component
  area), from scipy's labelling; ours uses OpenCV's.

Random weights give near-constant, image-wide masks: every box is the whole image (or crop), so
``box_nms_thresh=1.0`` keeps the few dozen masks the thresholds let through (they still differ
from each other: no two match at IoU 0.99), and ``stability_score_offset`` is small because the
random logits are. One case keeps the default NMS thresholds (everything collapses to one mask
per crop, which must be the same one).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import real_photos
from pipeline.sam import masks as mask_codec
from pipeline.config import QaConfig, SamConfig
from pipeline.run.faults import InjectedFaults
from pipeline.sam.automatic import AutomaticArgs, AutomaticMaskGenerator, AutoMasks
from pipeline.sam.model import SamModel, SegmentOOM

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# Calibrated for random weights: predicted IoUs lie in 0.47-0.55, stability at offset 0.02 in 0.4-0.98.
RANDOM_WEIGHTS = dict(pred_iou_thresh=0.5, stability_score_thresh=0.8, stability_score_offset=0.02, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def photos():
    return real_photos()


@pytest.fixture(scope="module")
def ours(checkpoints):
    """Our batched model per image size (float32, so the CPU/GPU arithmetic is the library's)."""
    models = {}

    def get(size: int, **cfg) -> SamModel:
        key = (size, tuple(sorted(cfg.items())))
        if key not in models:
            models[key] = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=size, dtype="float32", **cfg))
        return models[key]

    return get


@pytest.fixture(scope="module")
def library(checkpoints, ours):
    """``SAM2AutomaticMaskGenerator(model, **args).generate(image)``, the library's model per size."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    models = {}

    def generate(size: int, image: np.ndarray, **args) -> list[dict]:
        device = ours(size).device
        if size not in models:
            overrides = [] if size == 1024 else [f"++model.image_size={size}"]
            model = build_sam2(CONFIG, str(checkpoints["sam"]), device=str(device), hydra_overrides_extra=overrides)
            feat_sizes = None
            if size != 1024:
                with torch.inference_mode():
                    out = model.forward_image(torch.zeros(1, 3, size, size, device=device))
                    feat_sizes = [tuple(s) for s in model._prepare_backbone_features(out)[3]]
            models[size] = model, feat_sizes
        model, feat_sizes = models[size]
        generator = SAM2AutomaticMaskGenerator(model, **args)
        if feat_sizes is not None:
            generator.predictor._bb_feat_sizes = feat_sizes
        with pytest.MonkeyPatch.context() as patch:
            if device.type != "cuda" or importlib.util.find_spec("sam2._C") is None:
                patch.setattr("sam2.utils.misc.get_connected_components", _connected_components)
            return generator.generate(image)

    return generate


def _connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's ``get_connected_components`` contract, by scipy: (N, 1, H, W) uint8 -> labels
    (0 = background) and, per foreground pixel, its component's area; 8-connectivity."""
    from scipy import ndimage

    binary = mask.cpu().numpy().astype(bool)
    labels = np.zeros(binary.shape, np.int32)
    areas = np.zeros(binary.shape, np.int32)
    for n in range(len(binary)):
        labelled, _ = ndimage.label(binary[n, 0], structure=np.ones((3, 3)))
        labels[n, 0] = labelled
        areas[n, 0] = np.where(labelled > 0, np.bincount(labelled.ravel())[labelled], 0)
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


def _library_rows(records: list[dict]) -> list[dict]:
    """The library's records in our terms (boxes as pixel edges, crop boxes as xyxy)."""
    rows = []
    for r in records:
        x, y, w, h = r["bbox"]
        cx, cy, cw, ch = r["crop_box"]
        rows.append({"rle": mask_codec.encode(r["segmentation"][None])[0], "score": r["predicted_iou"],
                     "stability": r["stability_score"], "area": r["area"], "point": r["point_coords"][0],
                     "box": [x, y, x + w + 1, y + h + 1] if r["area"] else [0, 0, 0, 0], "crop_box": [cx, cy, cx + cw, cy + ch]})
    return rows


def _our_rows(result: AutoMasks) -> list[dict]:
    return [{"rle": result.rles[i], "score": float(result.scores[i]), "stability": float(result.stability[i]),
             "area": int(result.areas[i]), "point": result.points[i].tolist(), "box": result.boxes[i].tolist(),
             "crop_box": result.crop_boxes[i].tolist()} for i in range(len(result))]


def _faithful(theirs: list[dict], mine: list[dict]) -> tuple[bool, str]:
    """Equal counts, and every one of their masks matched by one of ours at IoU >= 0.99 (one to
    one; among equal masks the closest score is the partner)."""
    from scipy.optimize import linear_sum_assignment

    if len(theirs) != len(mine):
        return False, f"{len(mine)} masks, the reference has {len(theirs)}"
    if not theirs:
        return True, "no masks"
    iou = np.asarray(mask_utils.iou([mask_codec.to_coco(m["rle"]) for m in mine], [mask_codec.to_coco(t["rle"]) for t in theirs],
                                    [0] * len(theirs)), np.float64).reshape(len(mine), len(theirs))
    if iou.max(axis=0).min() < 0.99:
        return False, f"a reference mask has no match: best IoU {iou.max(axis=0).min():.4f}"
    gap = np.abs(np.array([m["score"] for m in mine])[:, None] - np.array([t["score"] for t in theirs])[None, :])
    rows, cols = linear_sum_assignment((1.0 - iou) + gap)
    if iou[rows, cols].min() < 0.99:
        return False, f"no one-to-one matching: worst pair IoU {iou[rows, cols].min():.4f}"
    for r, c in zip(rows, cols):
        m, t = mine[r], theirs[c]
        if abs(m["score"] - t["score"]) > 1e-4 or abs(m["stability"] - t["stability"]) > 1e-3:
            return False, f"scores differ: {m['score']}, {m['stability']} vs {t['score']}, {t['stability']}"
        if m["crop_box"] != t["crop_box"] or np.abs(np.subtract(m["point"], t["point"])).max() > 1e-3:
            return False, f"made from another point or crop: {m['point']} {m['crop_box']} vs {t['point']} {t['crop_box']}"
        if np.abs(np.subtract(m["box"], t["box"])).max() > 1 or abs(m["area"] - t["area"]) > 0.01 * max(t["area"], 1):
            return False, f"box or area differ: {m['box']} {m['area']} vs {t['box']} {t['area']}"
    return True, f"{len(mine)} masks matched, worst IoU {iou[rows, cols].min():.4f}"


def _distinct(rows: list[dict]) -> int:
    """How many pairs of these masks the IoU bound cannot tell apart (0: matching means something)."""
    coco = [mask_codec.to_coco(r["rle"]) for r in rows]
    iou = np.asarray(mask_utils.iou(coco, coco, [0] * len(coco)), np.float64).reshape(len(coco), len(coco))
    return int((np.triu(iou, 1) >= 0.99).sum())


def test_at_1024_every_library_mask_is_found(photos, library, ours):
    """The size SAM 2.1 was trained at, where the library runs unchanged: one small case."""
    args = dict(RANDOM_WEIGHTS, points_per_side=4, points_per_batch=10, pred_iou_thresh=0.49)
    theirs = _library_rows(library(1024, photos["chelsea"], **args))
    mine = _our_rows(AutomaticMaskGenerator(ours(1024), **args).generate(photos["chelsea"]))
    ok, why = _faithful(theirs, mine)
    assert ok, why
    assert 20 <= len(mine) <= 48 and _distinct(mine) <= 2, (len(mine), _distinct(mine))


def test_at_256_with_crops_and_small_regions_removed(photos, library, ours):
    """Crop layer 1 (crops overlapping so much that their masks survive the crop-edge filter, a
    coarser grid there), holes and islands removed, a partial last batch of points; controls:
    another grid, and no region removal, both fall outside the tolerance."""
    args = dict(RANDOM_WEIGHTS, points_per_side=6, points_per_batch=20, pred_iou_thresh=0.52, stability_score_thresh=0.6,
                crop_n_layers=1, crop_overlap_ratio=0.95, crop_n_points_downscale_factor=2, min_mask_region_area=3,
                crop_nms_thresh=1.0)
    image = photos["astronaut"]
    theirs = _library_rows(library(256, image, **args))
    result = AutomaticMaskGenerator(ours(256), **args).generate(image)
    ok, why = _faithful(theirs, _our_rows(result))
    assert ok, why
    assert len(result) >= 30 and _distinct(theirs) == 0
    assert len({tuple(c) for c in result.crop_boxes.tolist()}) == 5  # masks of the image and of its four crops
    assert result.masks.shape == (len(result), *image.shape[:2]) and result.masks.dtype == bool
    for control in (dict(points_per_side=5), dict(min_mask_region_area=0)):
        ok, why = _faithful(theirs, _our_rows(AutomaticMaskGenerator(ours(256), **{**args, **control}).generate(image)))
        assert not ok, f"{control} should not pass as the library's output: {why}"


def test_at_512_with_the_default_nms_and_crop_edge_filter(photos, library, ours):
    """Default NMS thresholds and crop overlap: the crops' masks reach their crop's inner edges
    and are dropped, the image's collapse to one by box NMS; single-mask output."""
    args = dict(RANDOM_WEIGHTS, points_per_side=4, pred_iou_thresh=0.3, stability_score_thresh=0.5, box_nms_thresh=0.7,
                crop_n_layers=1, crop_n_points_downscale_factor=2, multimask_output=False)
    theirs = _library_rows(library(512, photos["coffee"], **args))
    mine = _our_rows(AutomaticMaskGenerator(ours(512), **args).generate(photos["coffee"]))
    ok, why = _faithful(theirs, mine)
    assert ok, why
    assert len(mine) >= 1


def test_images_and_crops_are_encoded_once_in_batches_and_features_can_be_shared(photos, ours):
    """Two images with crop layer 1: 10 crops through the encoder ``sam.batch_size`` at a time,
    each once; handed the images' own features (as the segment stage has them), only the 8
    smaller crops are encoded. Either way each image's masks are those it gets alone."""
    sam = ours(256, batch_size=3)
    images = [photos[name] for name in ("chelsea", "coffee")]
    generator = AutomaticMaskGenerator(sam, **dict(RANDOM_WEIGHTS, points_per_side=4, crop_n_layers=1, crop_overlap_ratio=0.9,
                                                   crop_n_points_downscale_factor=2))
    alone = [generator.generate(image) for image in images]
    calls = []
    encode = sam._encode
    sam._encode = lambda batch: calls.append([im.shape[:2] for im in batch]) or encode(batch)
    try:
        together = generator.generate_batch(images)
        assert [len(c) for c in calls] == [3, 3, 3, 1]
        assert sorted(s for c in calls for s in c) == sorted(_crop_shapes(images, generator.args))
        with torch.inference_mode():
            features = encode(images)
        calls.clear()
        shared = generator.generate_batch(images, features=features)
        assert sum(len(c) for c in calls) == 8 and all(s not in [im.shape[:2] for im in images] for c in calls for s in c)
    finally:
        sam._encode = encode
    assert sum(len(r) for r in alone) > 0
    for mine in (together, shared):
        for a, b in zip(alone, mine):
            assert a.rles == b.rles and np.array_equal(a.scores, b.scores) and np.array_equal(a.boxes, b.boxes)


def _crop_shapes(images, args: AutomaticArgs) -> list[tuple]:
    from sam2.utils.amg import generate_crop_boxes

    shapes = []
    for image in images:
        boxes, _ = generate_crop_boxes(image.shape[:2], args.crop_n_layers, args.crop_overlap_ratio)
        shapes += [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in boxes]
    return shapes


def test_out_of_gpu_memory_halves_the_points_then_fails_only_that_image(photos, ours):
    """A decoder call over 5 points runs out of memory (injected, as faults.py does for the
    segment stage): the points go in smaller calls and the masks stay the same; an image on
    which every call fails becomes a SegmentOOM, and the others in its batch are unaffected."""
    sam = ours(256)
    args = dict(RANDOM_WEIGHTS, points_per_side=4, points_per_batch=16)
    generator = AutomaticMaskGenerator(sam, **args)
    normal = generator.generate(photos["chelsea"])
    calls = []
    hook = sam.model.sam_mask_decoder.register_forward_hook(lambda m, a, out: calls.append(len(out[0])))
    try:
        sam.faults = InjectedFaults(oom_over_prompts=5)
        smaller = generator.generate(photos["chelsea"])
        sam.faults = InjectedFaults(oom_uri="coffee")
        answers = generator.generate_batch([photos["chelsea"], photos["coffee"]], uris=["in/chelsea.jpg", "in/coffee.jpg"])
        with pytest.raises(SegmentOOM):
            generator.generate(photos["coffee"], uri="in/coffee.jpg")
    finally:
        sam.faults = None
        hook.remove()
    assert calls[:4] == [4, 4, 4, 4]
    ok, why = _faithful(_our_rows(normal), _our_rows(smaller))
    assert ok, why
    assert isinstance(answers[1], SegmentOOM) and answers[1].error_class == "oom"
    assert answers[0].rles == normal.rles


def test_masks_become_objects_rows_with_source_automatic_and_no_class(photos, ours):
    """``as_prompts`` feeds ``segment.object_rows``: one row per mask, ``source=automatic``, no
    class, SAM's predicted IoU as ``mask_score``, the mask's box; quality metrics with a QaConfig.
    The masks are the same whether reduced on the device (a GPU's way) or by pycocotools."""
    from pipeline.stages.segment import object_rows

    sam = ours(256)
    qa_sam = SamModel(SamConfig(checkpoint=sam.cfg.checkpoint, image_size=256, dtype="float32"), qa=QaConfig())
    args = dict(RANDOM_WEIGHTS, points_per_side=3)
    plain = AutomaticMaskGenerator(sam, **args).generate(photos["chelsea"])
    result = AutomaticMaskGenerator(qa_sam, **args).generate(photos["chelsea"])
    assert len(result) > 0 and plain.quality is None and result.rles == plain.rles
    sam.reduce_on_device = True  # the GPU's way (run boundaries by torch), here on the CPU
    try:
        assert AutomaticMaskGenerator(sam, **args).generate(photos["chelsea"]).rles == plain.rles
    finally:
        sam.reduce_on_device = False
    rows = object_rows(*result.as_prompts(), keep_all=False)
    assert len(rows) == len(result)
    for i, row in enumerate(rows):
        assert row["source"] == "automatic" and row["class_id"] is None and row["class_name"] is None
        assert row["status"] == "ok" and row["mask"] == result.rles[i] and row["area"] == result.areas[i]
        assert row["mask_score"] == pytest.approx(float(result.scores[i])) and row["box"] == result.boxes[i].tolist()
        assert row["stability"] == pytest.approx(float(result.stability[i])) and row["regions"] >= 1
        assert row["box_iou"] is None and row["outside_box"] is None


def test_arguments_are_the_library_s_with_its_defaults():
    import inspect

    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    library = inspect.signature(SAM2AutomaticMaskGenerator.__init__).parameters
    for name, value in AutomaticArgs().__dict__.items():
        assert library[name].default == value, name
    for bad in (dict(points_per_side=0), dict(pred_iou_thresh=1.5), dict(crop_overlap_ratio=1.0),
                dict(points_per_side=4, crop_n_layers=3, crop_n_points_downscale_factor=2)):
        with pytest.raises(ValueError):
            AutomaticArgs(**bad)
