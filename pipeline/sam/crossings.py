"""Counting-line crossings (``video.count_line``): how many tracks crossed a line, in and out, per class.

The rule is ultralytics' ``ObjectCounter`` with a two-point region (``count_objects``), applied to
a finished track instead of a live stream:

- a track's position on a frame is the centre of its box; its path is the segments between
  consecutive frames where it was seen (a frame where its mask is empty is skipped, as a tracker's
  history skips a frame without a detection);
- the track is counted once, at the first segment that meets the line segment (touching counts),
  as ultralytics keeps ``counted_ids``; a segment of length zero (the object did not move) never
  counts;
- the direction follows the line's orientation: across a line more vertical than horizontal,
  moving right is ``in`` and left ``out``; across any other line, moving down is ``in`` and up
  ``out`` (image coordinates: y grows downwards).

supervision's ``LineZone`` is the other common rule (in/out by the side of the line's direction
vector, every crossing counted); this module keeps ultralytics', which counts each object once.

Pure functions over box centres, so a commit (run/line_counts.py), a test or a notebook can use them.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

Point = tuple[float, float]
Line = Sequence[float]  # x1, y1, x2, y2 in pixels of the frame


def _orient(a: Point, b: Point, c: Point) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _within(a: Point, b: Point, c: Point) -> bool:
    """c, collinear with a-b, lies within the segment's bounding box."""
    return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])


def segments_meet(p: Point, q: Point, a: Point, b: Point) -> bool:
    """Closed segments p-q and a-b share at least one point (crossing, touching or overlapping)."""
    d1, d2, d3, d4 = _orient(a, b, p), _orient(a, b, q), _orient(p, q, a), _orient(p, q, b)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return ((d1 == 0 and _within(a, b, p)) or (d2 == 0 and _within(a, b, q))
            or (d3 == 0 and _within(p, q, a)) or (d4 == 0 and _within(p, q, b)))


def direction(line: Line, prev: Point, cur: Point) -> str:
    """``in`` or ``out`` for a step from ``prev`` to ``cur`` that meets ``line`` (ultralytics' rule)."""
    x1, y1, x2, y2 = line
    if abs(x1 - x2) < abs(y1 - y2):  # more vertical: left/right
        return "in" if cur[0] > prev[0] else "out"
    return "in" if cur[1] > prev[1] else "out"


def first_crossing(path: Iterable[Point], line: Line) -> Optional[str]:
    """The direction of a track's first crossing of ``line`` along ``path`` (its box centres in
    frame order), or None when it never crosses."""
    a, b = (float(line[0]), float(line[1])), (float(line[2]), float(line[3]))
    prev = None
    for cur in path:
        cur = (float(cur[0]), float(cur[1]))
        if prev is not None and cur != prev and segments_meet(prev, cur, a, b):
            return direction(line, prev, cur)
        prev = cur
    return None


def box_centre(box: Sequence[float]) -> Point:
    """The centre of an (x0, y0, x1, y1) box, as ultralytics' track history stores it."""
    return ((float(box[0]) + float(box[2])) / 2.0, (float(box[1]) + float(box[3])) / 2.0)


def crossings(paths: dict, line: Line) -> dict:
    """{track id: "in" | "out"} for the tracks of ``paths`` ({track id: [(frame, (x, y)), ...]}, any
    order) that cross ``line``."""
    out = {}
    for track_id, steps in paths.items():
        found = first_crossing([centre for _, centre in sorted(steps, key=lambda s: s[0])], line)
        if found is not None:
            out[track_id] = found
    return out

