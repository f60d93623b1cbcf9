"""The output tables' schemas: what ``RUN/images/*.parquet`` and ``RUN/objects/*.parquet`` hold
(docs/output.md is the contract of record), in plain Arrow types only, so that pyarrow, pandas,
polars and duckdb read every file as it is. A column that reaches the output is declared here.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.stages.segment import OBJECT_TYPE

# What the read stage adds to each images row (stages/read.py), or an error row's values.
IMAGE_COLUMNS = [
    ("width", pa.int32()),  # after EXIF orientation
    ("height", pa.int32()),
    ("status", pa.string()),
    ("error_class", pa.string()),
    ("error", pa.string()),
    ("note", pa.string()),
]

# What a video frame's images row adds (null for still images): the file, the decoded frame's
# 0-based index (before video.stride) and its presentation time.
FRAME_COLUMNS = [("video_uri", pa.string()), ("frame_index", pa.int32()), ("time_s", pa.float64())]

CLASS_COUNT_TYPE = pa.struct([("class_id", pa.int32()), ("class_name", pa.string()), ("count", pa.int32())])

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        *IMAGE_COLUMNS,  # width ... note, as read
        ("num_objects", pa.int32()),
        ("class_counts", pa.list_(CLASS_COUNT_TYPE)),
        ("num_prompt_errors", pa.int32()),
        ("num_flagged", pa.int32()),  # objects needing review (sam/quality.py's flags)
        ("shard_id", pa.string()),
        *FRAME_COLUMNS,  # video frames only
    ]
)

# OBJECT_TYPE (the objects' own columns) is still defined by the segment stage that fills them;
# track_id is the video track stage's (stages/track.py): unique within its video, null for images.
OBJECTS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), *OBJECT_TYPE, ("track_id", pa.int32())])

# RUN/videos/: one row per video (stages/track.py), an unreadable one too (status=error).
VIDEOS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error_class", pa.string()),  # io/video.py's VideoError classes
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),
        ("frames", pa.int64()),  # decoded frames in the file (the container's count, or counted)
        ("frames_processed", pa.int64()),  # kept frames (video.stride, video.max_frames) that were tracked
        ("duration_s", pa.float64()),
        ("num_tracks", pa.int32()),  # all tracks, short ones too
        ("class_counts", pa.list_(CLASS_COUNT_TYPE)),  # unique tracks per class with >= video.min_track_frames frames
        # video.count_line (run/line_counts.py, at the commit): counted tracks whose centre crossed it, per class; null: no line
        ("line_in", pa.list_(CLASS_COUNT_TYPE)),
        ("line_out", pa.list_(CLASS_COUNT_TYPE)),
        ("shard_id", pa.string()),
    ]
)

# RUN/tracks/: one row per track of a video.
TRACKS_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("track_id", pa.int32()),
        ("object_key", pa.string()),  # prompted mode: the manifest's key
        ("class_id", pa.int32()),  # majority over its detections (prompted: the manifest's label)
        ("class_name", pa.string()),
        ("first_frame", pa.int32()),  # decoded frame indices, as in the images rows' frame_index
        ("last_frame", pa.int32()),  # the last frame its mask was not empty
        ("num_frames", pa.int32()),  # kept frames with a non-empty mask
        ("mean_mask_score", pa.float32()),  # mean object score (sigmoid of sam2's object score logit)
        ("mean_det_score", pa.float32()),  # mean score of the detections matched to it (null: prompted)
        ("source", pa.string()),  # detector | manifest
        ("shard_id", pa.string()),
    ]
)


def images_schema(meta_columns: list[str]) -> pa.Schema:
    """Manifest metadata (site, camera, ...) becomes string columns after the fixed ones."""
    return pa.schema([*IMAGES_SCHEMA, *(pa.field(name, pa.string()) for name in meta_columns)])
