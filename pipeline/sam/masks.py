"""Binary masks <-> COCO compressed RLE (pycocotools), the form masks take in the objects table."""
from __future__ import annotations

from typing import Optional

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


# ---------------------------------------------------------------- masks finished where they are made
#
# SAM's masks are made on the GPU at full image resolution; copying them to the host as float32
# bitmaps costs 8 MB per full-HD mask and then more CPU than SAM itself. These functions reduce a
# batch of masks to what the objects table needs (area, bounding box, COCO run lengths) on the
# masks' own device, so only the run boundaries (a few KB per mask) cross to the host, where
# pycocotools compresses them into exactly the string ``pycocotools.mask.encode`` would give.

def device_stats(masks, capacity: Optional[int] = None) -> dict:
    """(n, h, w) bool tensor -> per mask ``area`` (n,), ``bbox`` (n, 4) xyxy (pixel edges, zeros
    when empty), and the COCO run boundaries: ``first`` (n,) the first pixel's value,
    ``changes`` the positions (in column-major order, as COCO RLE counts) where a mask's value
    changes, concatenated, and ``num_changes`` (n,) how many belong to each mask.

    ``capacity``: ``changes`` is a buffer of that many positions (``torch.nonzero_static``), so
    nothing waits for the device; its first ``num_changes.sum()`` are valid when they fit (the
    caller checks, once the numbers are on the host). None: exactly the positions (this waits)."""
    import torch

    n, h, w = masks.shape
    area = masks.sum(dim=(1, 2), dtype=torch.int64)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    ar_h, ar_w = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    bbox = torch.stack([x0, y0, x1, y1], dim=1)
    bbox = torch.where((area > 0)[:, None], bbox, torch.zeros_like(bbox))
    flat = masks.transpose(1, 2).reshape(n, h * w)  # column-major, as COCO RLE counts pixels
    changed = flat[:, 1:] != flat[:, :-1]
    if capacity is None:
        where = changed.nonzero(as_tuple=True)[1]
    else:
        where = torch.nonzero_static(changed, size=capacity, fill_value=-1)[:, 1]
    return {
        "area": area, "bbox": bbox, "first": flat[:, 0], "changes": (where + 1).to(torch.int32),
        "num_changes": changed.sum(dim=1, dtype=torch.int64),
    }


def rle_from_changes(first: bool, changes, h: int, w: int) -> dict:
    """One mask's run boundaries -> ``{"size": [h, w], "counts": str}``, compressed by
    pycocotools from the uncompressed counts (COCO RLE starts with a run of zeros)."""
    bounds = np.concatenate([[0], np.asarray(changes, np.int64), [h * w]])
    counts = np.diff(bounds)
    if first:
        counts = np.concatenate([[0], counts])
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
