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
    ]
)

# OBJECT_TYPE (the objects' own columns) is still defined by the segment stage that fills them.
OBJECTS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), *OBJECT_TYPE])


def images_schema(meta_columns: list[str]) -> pa.Schema:
    """Manifest metadata (site, camera, ...) becomes string columns after the fixed ones."""
    return pa.schema([*IMAGES_SCHEMA, *(pa.field(name, pa.string()) for name in meta_columns)])
