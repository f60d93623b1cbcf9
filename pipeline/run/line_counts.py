"""``video.count_line`` at a video shard's commit: ``videos.line_in`` / ``videos.line_out``, the
tracks that crossed the line per class, from the shard's objects rows (track, frame, box) and
tracks rows (class), by the rule of sam/crossings.py.

At the commit, not in the track actor, because a track is only whole once its video's rows are
merged (a video's chunks joined into one track per object). The line comes from run.json's
config, so the commit needs no more arguments than it had. Only counted tracks cross: those with
at least ``video.min_track_frames`` frames (the unique objects of ``class_counts``), so
``line_in + line_out <= class_counts`` per class.
"""
from __future__ import annotations

import json
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sam.crossings import box_centre, crossings

BOX_COLUMNS = ["image_id", "uri", "track_id", "box", "status", "candidate"]


def video_config(fs, root: str) -> dict:
    """run.json's ``config.video`` ({} when there is none: a commit outside a run)."""
    try:
        return (json.loads(fs.cat_file(f"{root}/run.json")).get("config") or {}).get("video") or {}
    except (FileNotFoundError, ValueError):
        return {}


def staged_boxes(fs, names: list[str]) -> pa.Table:
    """The tracked objects of a shard's staged ``objects-*`` parts (only the columns crossings need):
    an image staged twice is taken from its first part, as ``sink.commit_shard`` takes it."""
    parts, seen = [], set()
    for part in (n for n in names if n.rsplit("/", 1)[-1].startswith("objects-")):
        with fs.open(part, "rb") as fh:
            table = pq.read_table(fh, columns=BOX_COLUMNS)
        fresh = pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(seen), pa.string())))
        table = table.filter(fresh)
        seen.update(table.column("image_id").to_pylist())
        parts.append(table)
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in BOX_COLUMNS})


def add_line_counts(videos: pa.Table, tracks: pa.Table, objects: pa.Table, line: Optional[list], min_track_frames: int) -> pa.Table:
    """``videos`` with ``line_in`` / ``line_out`` filled (left null without a line)."""
    from pipeline.run.sink import class_counts

    if line is None or not videos.num_rows:
        return videos
    paths: dict[tuple, list] = {}
    for row in objects.to_pylist():
        if row["track_id"] is None or row.get("status", "ok") != "ok" or row.get("candidate", 0) != 0 or row["box"] is None:
            continue
        video, mark, frame = row["uri"].rpartition("#frame=")
        if mark and frame.isdigit():
            paths.setdefault((video, row["track_id"]), []).append((int(frame), box_centre(row["box"])))
    crossed = crossings(paths, line)
    counted = {"in": {}, "out": {}}
    for track in tracks.to_pylist():
        way = crossed.get((track["video_uri"], track["track_id"]))
        if way is not None and (track["num_frames"] or 0) >= min_track_frames:
            counted[way].setdefault(track["video_uri"], []).append(
                {"status": "ok", "candidate": 0, "class_id": track["class_id"], "class_name": track["class_name"]})
    uris = videos.column("uri").to_pylist()
    for name, way in (("line_in", "in"), ("line_out", "out")):
        column = pa.array([class_counts(counted[way].get(u, [])) for u in uris], videos.schema.field(name).type)
        videos = videos.set_column(videos.schema.get_field_index(name), name, column)
    return videos


def count_line_crossings(fs, root: str, names: list[str], videos: pa.Table, tracks: pa.Table,
                         objects: Optional[pa.Table] = None) -> pa.Table:
    """The commit's one call: the line and ``min_track_frames`` from run.json, the boxes from the
    staged parts (or ``objects``, the shard's merged objects rows, when the caller has them)."""
    config = video_config(fs, root)
    line = config.get("count_line")
    if line is None:
        return videos
    boxes = objects if objects is not None else staged_boxes(fs, names)
    return add_line_counts(videos, tracks, boxes, line, int(config.get("min_track_frames") or 1))
