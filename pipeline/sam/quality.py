"""Quality control of masks nobody looked at: a score for every mask, clean-up, duplicates, flags.

Per mask (computed by the segment stage where the mask is: stability and the share inside the
prompt box on the device, the shape on the mask's bounding-box crop):

- ``stability``: SAM's stability score (``sam2.utils.amg.calculate_stability_score``): the IoU
  of the mask's full-resolution logits thresholded at +1 and at -1. A mask that changes a lot
  when the threshold moves is one SAM was unsure of.
- ``box_iou``: IoU of the mask's tight box with the prompt box; ``outside_box``: the share of the
  mask's pixels (by their centres) outside the prompt box. A mask that leaks out of its box, or
  fills only a corner of it, probably is not the object the box was drawn around.
- ``regions``: connected regions (8-connectivity), ``largest_region``: the largest one's share of
  the area, ``hole_area``: background pixels enclosed by the mask (8-connectivity, as SAM's own
  ``remove_small_regions`` sees them).

Clean-up (``qa.remove_islands_below``, ``qa.fill_holes_below``) is SAM's ``remove_small_regions``.
Duplicates (``qa.dedup``): within an image, greedily by ``mask_score``, a mask overlapping a
better one by ``qa.dedup_threshold`` (mask IoU, or intersection over the smaller mask) gets
``status=duplicate`` and ``duplicate_of`` = the better one's ``object_id``; it is kept, not
dropped, and not counted. Flags (``flags``, ``needs_review``) come from the ``qa.*`` thresholds.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from pipeline.config import QaConfig

FLAGS = ("low_score", "unstable", "leaks_box", "fragmented", "tiny", "duplicate")
DUPLICATE = "duplicate"


def shape(crop: np.ndarray) -> tuple[int, float, int]:
    """(regions, largest region's share of the area, hole area) of a mask given as its
    bounding-box crop (bool)."""
    import cv2

    if not crop.any():
        return 0, 0.0, 0
    count, _, stats, _ = cv2.connectedComponentsWithStats(crop.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    # Background: a 1-pixel frame joins every background region that reaches the crop's edge
    # into the one outside the mask; what a flood fill of that one leaves are holes (the same
    # 8-connected regions as a labelling, at a third of its cost).
    background = np.ascontiguousarray(np.pad(~crop, 1, constant_values=True), dtype=np.uint8)
    total = int(background.sum())
    outside, _, _, _ = cv2.floodFill(background, None, (0, 0), 0, flags=8)
    return int(count - 1), float(areas.max() / areas.sum()), total - int(outside)


def clean(crop: np.ndarray, remove_islands_below: int, fill_holes_below: int) -> tuple[np.ndarray, bool]:
    """SAM's own ``remove_small_regions`` (islands, then holes) on a mask's bounding-box crop.
    The crop is framed with enough background that the region outside the mask is never
    mistaken for a small hole."""
    from sam2.utils.amg import remove_small_regions

    changed = False
    if remove_islands_below:
        crop, did = remove_small_regions(crop, remove_islands_below, "islands")
        changed |= did
    if fill_holes_below:
        frame = 1 + math.ceil(fill_holes_below / (2 * (crop.shape[0] + crop.shape[1]) + 4))
        framed, did = remove_small_regions(np.pad(crop, frame), fill_holes_below, "holes")
        crop = framed[frame:-frame, frame:-frame]
        changed |= did
    return crop, changed


def pixels_inside(crop: np.ndarray, x0: int, y0: int, box) -> int:
    """Mask pixels (a crop whose top-left pixel is (x0, y0)) whose centres lie in ``box`` (xyxy)."""
    bx0, by0, bx1, by1 = (float(v) for v in box)
    cols = slice(max(0, math.ceil(bx0 - 0.5) - x0), max(0, math.floor(bx1 - 0.5) + 1 - x0))
    rows = slice(max(0, math.ceil(by0 - 0.5) - y0), max(0, math.floor(by1 - 0.5) + 1 - y0))
    return int(crop[rows, cols].sum())


def box_agreement(mask_box, prompt_box, area: int, inside: int) -> tuple[Optional[float], Optional[float]]:
    """(IoU of the mask's tight box with the prompt box, share of the mask outside the prompt
    box); (None, None) without a prompt box."""
    if prompt_box is None:
        return None, None
    mx0, my0, mx1, my1 = (float(v) for v in mask_box)
    px0, py0, px1, py1 = (float(v) for v in prompt_box)
    iw, ih = max(0.0, min(mx1, px1) - max(mx0, px0)), max(0.0, min(my1, py1) - max(my0, py0))
    union = (mx1 - mx0) * (my1 - my0) + (px1 - px0) * (py1 - py0) - iw * ih
    iou = iw * ih / union if union > 0 else 0.0
    return iou, (1.0 - inside / area) if area else 0.0


def overlaps(rles: list[dict], areas: list[int], mode: str) -> np.ndarray:
    """Pairwise overlap of masks given as COCO RLE: IoU, or intersection over the smaller mask."""
    from pycocotools import mask as mask_utils

    from pipeline.sam.masks import to_coco

    coco = [to_coco(r) for r in rles]
    iou = np.asarray(mask_utils.iou(coco, coco, [0] * len(coco)), np.float64).reshape(len(coco), len(coco))
    if mode == "iou":
        return iou
    a = np.asarray(areas, np.float64)
    inter = iou * (a[:, None] + a[None, :]) / (1.0 + iou)
    smaller = np.minimum(a[:, None], a[None, :])
    return np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)


def mark_duplicates(rows: list[dict], qa: QaConfig) -> None:
    """Greedy mask NMS over one image's object rows (in place): the best ``mask_score`` first;
    a mask overlapping a kept one by ``qa.dedup_threshold`` becomes ``status=duplicate`` with
    ``duplicate_of``; so do its other candidates (same object_id)."""
    if qa.dedup == "off":
        return
    best = [r for r in rows if r["status"] == "ok" and r["candidate"] == 0 and r["area"]]
    if len(best) < 2:
        return
    matrix = overlaps([r["mask"] for r in best], [r["area"] for r in best], qa.dedup)
    order = sorted(range(len(best)), key=lambda i: (-best[i]["mask_score"], best[i]["object_id"]))
    kept: list[int] = []
    duplicate_of: dict[int, int] = {}
    for i in order:
        match = next((k for k in kept if matrix[i, k] >= qa.dedup_threshold
                      and (not qa.dedup_class_aware or best[i]["class_name"] == best[k]["class_name"])), None)
        if match is None:
            kept.append(i)
        else:
            duplicate_of[best[i]["object_id"]] = best[match]["object_id"]
    for row in rows:
        if row["status"] == "ok" and row["object_id"] in duplicate_of:
            row["status"], row["duplicate_of"] = DUPLICATE, duplicate_of[row["object_id"]]


def flag(row: dict, qa: QaConfig) -> None:
    """Set ``flags`` and ``needs_review`` of one row (in place) from the ``qa.*`` thresholds."""
    if row["status"] not in ("ok", DUPLICATE) or row.get("stability") is None:
        return
    flags = []
    if row["mask_score"] < qa.min_mask_score:
        flags.append("low_score")
    if row["stability"] < qa.min_stability:
        flags.append("unstable")
    if row["box_iou"] is not None and (row["box_iou"] < qa.min_box_iou or row["outside_box"] > qa.max_outside_box):
        flags.append("leaks_box")
    if row["regions"] > qa.max_regions:
        flags.append("fragmented")
    if row["area"] < qa.min_area:
        flags.append("tiny")
    if row["status"] == DUPLICATE:
        flags.append("duplicate")
    row["flags"], row["needs_review"] = flags, bool(flags)
