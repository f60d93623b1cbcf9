"""Binary masks <-> COCO compressed RLE (pycocotools), the form masks take in the objects table."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool masks -> N dicts ``{"size": [h, w], "counts": str}``, as pycocotools decodes."""
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(np.moveaxis(masks.astype(np.uint8, copy=False), 0, -1))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in mask_utils.encode(fortran)]


def to_coco(rle: dict) -> dict:
    """An RLE dict as stored in Parquet (counts as text) -> the form pycocotools takes (bytes)."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: dict) -> np.ndarray:
    """One RLE dict (as stored in Parquet) -> (H, W) bool mask."""
    return mask_utils.decode(to_coco(rle)).astype(bool)


def area(rle: dict) -> int:
    return int(mask_utils.area(to_coco(rle)))


def bbox_xywh(rle: dict) -> list[float]:
    """The mask's tight box, COCO style [x, y, w, h]."""
    return [float(v) for v in mask_utils.toBbox(to_coco(rle))]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Mask IoU; two empty masks are identical (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
