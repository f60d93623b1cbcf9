"""Tracks of neighbouring chunks of one video joined into one track per object (issue 19).

A long video is tracked in chunks that share a few frames (run/video_chunks.py). On those
overlap frames both chunks have masks for the objects they track; a track of the earlier chunk
and one of the later are the same object when their masks agree there. Agreement is the IoU of
the two tracks' masks over all overlap frames together (summed intersections over summed
unions, so a frame where the object is large weighs more than one where it is a sliver, and a
frame where only one of them has a mask counts against the pair). Pairs are matched by an optimal
assignment (``tracks.assign``: ``scipy.optimize.linear_sum_assignment``, pairs under the
threshold not allowed), so each track joins at most one track of each neighbour, and joins chain
through the chunks into groups: one group, one object.

Masks stay COCO RLE: pycocotools intersects and measures them on their runs (exact pixel counts),
so no overlap frame is decoded at full resolution.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.sam.masks import to_coco
from pipeline.sam.tracks import assign

# frame -> {track id: COCO RLE dict as stored (counts as text)}: one chunk's masks on the overlap frames
Masks = dict[int, dict[int, dict]]


class Joined(NamedTuple):
    groups: dict  # (chunk, track id) -> group number, 0.. in the order of each group's first (chunk, track id)
    pairs: list  # (chunk, earlier track id, later track id, IoU): the joins between chunk and chunk + 1


def overlap_iou(earlier: Masks, later: Masks, frames: Sequence[int]) -> tuple[list[int], list[int], np.ndarray]:
    """(earlier track ids, later track ids, their IoU matrix) over ``frames``: summed intersection
    over summed union of each pair's masks (a track without a mask on a frame has none there)."""
    a_ids = sorted({t for f in frames for t in earlier.get(f, {})})
    b_ids = sorted({t for f in frames for t in later.get(f, {})})
    inter = np.zeros((len(a_ids), len(b_ids)))
    area_a, area_b = np.zeros(len(a_ids)), np.zeros(len(b_ids))
    a_at, b_at = {t: i for i, t in enumerate(a_ids)}, {t: j for j, t in enumerate(b_ids)}
    for frame in frames:
        here_a = {t: to_coco(r) for t, r in earlier.get(frame, {}).items()}
        here_b = {t: to_coco(r) for t, r in later.get(frame, {}).items()}
        for t, rle in here_a.items():
            area_a[a_at[t]] += float(mask_utils.area(rle))
        for u, rle in here_b.items():
            area_b[b_at[u]] += float(mask_utils.area(rle))
        for t, ra in here_a.items():
            for u, rb in here_b.items():
                inter[a_at[t], b_at[u]] += float(mask_utils.area(mask_utils.merge([ra, rb], intersect=True)))
    union = area_a[:, None] + area_b[None, :] - inter
    return a_ids, b_ids, np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def join_chunks(tracks: Sequence[Sequence[int]], overlaps: Sequence[tuple[Masks, Masks, Sequence[int]]],
                iou_threshold: float) -> Joined:
    """Every track of every chunk in a group. ``tracks[k]``: chunk k's track ids;
    ``overlaps[k]``: (chunk k's masks, chunk k+1's masks, the frames they share)."""
    parent: dict[tuple[int, int], tuple[int, int]] = {(k, t): (k, t) for k, ids in enumerate(tracks) for t in ids}

    def root(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    pairs = []
    for k, (earlier, later, frames) in enumerate(overlaps):
        a_ids, b_ids, iou = overlap_iou(earlier, later, frames)
        for i, j in assign(iou, iou_threshold).pairs:
            a, b = (k, a_ids[i]), (k + 1, b_ids[j])
            parent.setdefault(a, a)
            parent.setdefault(b, b)
            first, second = sorted((root(a), root(b)))
            parent[second] = first  # the group keeps its earliest member as its root
            pairs.append((k, a_ids[i], b_ids[j], float(iou[i, j])))
    roots = sorted({root(node) for node in parent})
    number = {r: n for n, r in enumerate(roots)}
    return Joined({node: number[root(node)] for node in sorted(parent)}, pairs)
