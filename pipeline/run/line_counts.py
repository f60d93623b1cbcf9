"""``video.count_line`` at a video shard's commit: ``videos.line_in`` / ``videos.line_out``, the
tracks that crossed the line per class, from the shard's objects rows (track, frame, box) and
tracks rows (class), by the rule of sam/crossings.py.

At the commit, not in the track actor, because a track is only whole once its video's rows are
merged (a video's chunks joined into one track per object, run/video_chunks.py). Only counted
tracks cross: those with
at least ``video.min_track_frames`` frames (the unique objects of ``class_counts``), so
``line_in + line_out <= class_counts`` per class.
"""
from __future__ import annotations

from typing import Optional

import pyarrow as pa

from pipeline.sam.crossings import box_centre, crossings

BOX_COLUMNS = ["image_id", "uri", "track_id", "box", "status", "candidate"]


def add_line_counts(videos: pa.Table, tracks: pa.Table, objects: pa.Table, line: Optional[list], min_track_frames: int) -> pa.Table:
    """``videos`` with ``line_in`` / ``line_out`` filled (left null without a line)."""
    from pipeline.run.sink import class_counts

    if line is None or not videos.num_rows:
        return videos
    paths: dict[tuple, list] = {}
    for row in objects.select([c for c in BOX_COLUMNS if c in objects.column_names]).to_pylist():
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
