"""Segment stage: a Ray actor holding one SAM 2.1 image predictor, boxes -> masks -> COCO RLE.

Per image: one encoder pass (``set_image``), then the boxes go through the prompt decoder in
chunks of ``sam.box_chunk`` (one batched call per chunk), so memory stays bounded however many
objects an image holds.
"""
from __future__ import annotations

import contextlib
import os
import logging

import numpy as np
import pyarrow as pa

from . import masks as mask_codec
from .config import SamConfig
from .decode import pixels_of

log = logging.getLogger(__name__)

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
OBJECT_TYPE = pa.struct(
    [
        ("object_id", pa.int32()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("det_score", pa.float32()),
        ("mask_score", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("area", pa.int64()),
        ("mask", MASK_TYPE),
    ]
)


def resolve_dtype(requested: str, device) -> str:
    """``sam.dtype=auto``: bfloat16 autocast on CUDA, float32 elsewhere (bf16 is slow on CPUs)."""
    if requested == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return requested


def autocast(dtype: str, device):
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def masks_for_boxes(predictor, boxes: np.ndarray, chunk: int, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) on the image already set -> bool masks (N, H, W) and SAM scores (N,).

    With ``multimask`` SAM returns three candidates per box; the best-scoring one is kept.
    """
    h, w = predictor._orig_hw[-1]
    all_masks, all_scores = [], []
    for start in range(0, len(boxes), chunk):
        part = boxes[start : start + chunk]
        masks, scores, _ = predictor.predict(box=part, multimask_output=multimask)
        k = 3 if multimask else 1
        # 1 box -> (k, H, W), (k,); n boxes -> (n, k, H, W), (n, k): make both (n, k, ...)
        masks = masks.reshape(len(part), k, h, w)
        scores = scores.reshape(len(part), k)
        best = scores.argmax(axis=1)
        rows = np.arange(len(part))
        all_masks.append(masks[rows, best] > 0)  # predict already thresholded; stored as float
        all_scores.append(scores[rows, best])
    if not all_masks:
        return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
    return np.concatenate(all_masks), np.concatenate(all_scores).astype(np.float32)


class Segmenter:
    """Constructed once per actor (one per GPU); ``__call__`` adds an ``objects`` column."""

    def __init__(self, cfg: SamConfig, class_names: dict[int, str], cpu_threads: int | None = None):
        import torch

        from .models import build_sam_predictor, pick_device, resolve_sam_checkpoint

        self.cfg = cfg
        self.class_names = class_names
        self.device = pick_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif cpu_threads:
            # Ray pins a fractional-CPU actor to one thread; on a CPU-only node SAM is the
            # bottleneck by far, so it gets the threads the job planned for it.
            torch.set_num_threads(min(cpu_threads, os.cpu_count() or 1))
        weights = resolve_sam_checkpoint(cfg.size, cfg.checkpoint)
        self.predictor = build_sam_predictor(weights, cfg.image_size, self.device)
        log.info("SAM 2.1 %s (%s) on %s, %s", cfg.size, weights.path or "random weights", self.device, self.dtype)

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode(), autocast(self.dtype, self.device):
            self.predictor.set_image(image)
            return masks_for_boxes(self.predictor, boxes, self.cfg.box_chunk, self.cfg.multimask)

    def __call__(self, batch: pa.Table) -> pa.Table:
        objects_per_image = []
        columns = {name: batch.column(name).to_pylist() for name in ("status", "width", "height", "det_boxes", "det_class_ids", "det_scores")}
        pixels = batch.column("pixels")
        for i in range(batch.num_rows):
            boxes = columns["det_boxes"][i]
            if columns["status"][i] != "ok" or not boxes:
                objects_per_image.append([])
                continue
            image = pixels_of(pixels[i].as_py(), columns["width"][i], columns["height"][i])
            box_array = np.asarray(boxes, dtype=np.float32)
            masks, scores = self.segment(image, box_array)
            rles = mask_codec.encode(masks)
            areas = masks.reshape(len(masks), -1).sum(axis=1)
            objects = []
            for j, (rle, cls, det_score) in enumerate(zip(rles, columns["det_class_ids"][i], columns["det_scores"][i])):
                objects.append(
                    {
                        "object_id": j,
                        "class_id": cls,
                        "class_name": self.class_names.get(cls, str(cls)),
                        "det_score": det_score,
                        "mask_score": float(scores[j]),
                        "box": boxes[j],
                        "area": int(areas[j]),
                        "mask": rle,
                    }
                )
            objects_per_image.append(objects)
        batch = batch.drop_columns(["pixels", "det_boxes", "det_class_ids", "det_scores"])
        return batch.append_column(pa.field("objects", pa.list_(OBJECT_TYPE)), pa.array(objects_per_image, type=pa.list_(OBJECT_TYPE)))
