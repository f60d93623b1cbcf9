"""Sink: per-image rows with nested objects -> ``RUN/images/*.parquet`` and ``RUN/objects/*.parquet``.

Runs inside Ray workers and writes through fsspec, so the run folder can be local or an object
store. Each file is written under a temporary name and then moved into place, so readers never
see half a file. Returns one small summary row per image for the driver's totals.
"""
from __future__ import annotations

import hashlib
import io
import json
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .decode import IMAGE_COLUMNS
from .segment import OBJECT_TYPE

CLASS_COUNT_TYPE = pa.struct([("class_id", pa.int32()), ("class_name", pa.string()), ("count", pa.int32())])

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        *((name, typ) for name, typ in IMAGE_COLUMNS if name != "pixels"),  # width ... note, as decoded
        ("num_objects", pa.int32()),
        ("class_counts", pa.list_(CLASS_COUNT_TYPE)),
        ("num_prompt_errors", pa.int32()),
        ("shard_id", pa.string()),
    ]
)

OBJECTS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), *OBJECT_TYPE])

SUMMARY_SCHEMA = pa.schema(
    [
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("num_objects", pa.int32()),
        ("class_counts", pa.list_(CLASS_COUNT_TYPE)),
        ("num_prompt_errors", pa.int32()),
    ]
)


def counted(objects: list[dict]) -> list[dict]:
    """The objects that count: segmented (not error rows), one row per object (best candidate)."""
    return [o for o in objects if o["status"] == "ok" and o["candidate"] == 0]


def class_counts(objects: list[dict]) -> list[dict]:
    counts: dict[tuple, dict] = {}
    for obj in counted(objects):
        key = (obj["class_id"] is None, obj["class_id"] or 0, obj["class_name"] or "")
        entry = counts.setdefault(key, {"class_id": obj["class_id"], "class_name": obj["class_name"], "count": 0})
        entry["count"] += 1
    return [counts[k] for k in sorted(counts)]


def images_schema(meta_columns: list[str]) -> pa.Schema:
    """Manifest metadata (site, camera, ...) becomes string columns after the fixed ones."""
    return pa.schema([*IMAGES_SCHEMA, *(pa.field(name, pa.string()) for name in meta_columns)])


def _meta_value(value) -> Optional[str]:
    return None if value is None else value if isinstance(value, str) else json.dumps(value)


def split_tables(batch: pa.Table, meta_columns: list[str] = ()) -> tuple[pa.Table, pa.Table]:
    """One row per image with nested ``objects`` -> (images table, objects table)."""
    columns = ["image_id", "uri", "width", "height", "status", "error_class", "error", "shard_id", "objects"]
    rows = batch.select(columns + [c for c in ("meta", "note") if c in batch.column_names]).to_pylist()
    image_rows, object_rows = [], []
    for row in rows:
        objects = row.pop("objects") or []
        meta = json.loads(row.pop("meta", None) or "{}")
        row["num_objects"] = len(counted(objects))
        row["class_counts"] = class_counts(objects)
        row["num_prompt_errors"] = sum(o["status"] == "error" for o in objects)
        row.update({name: _meta_value(meta.get(name)) for name in meta_columns})
        image_rows.append(row)
        for obj in objects:
            object_rows.append({"image_id": row["image_id"], "uri": row["uri"], **obj})
    return (
        pa.Table.from_pylist(image_rows, schema=images_schema(list(meta_columns))),
        pa.Table.from_pylist(object_rows, schema=OBJECTS_SCHEMA),
    )


def _write_atomically(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    fs.pipe_file(tmp, buf.getvalue())
    fs.mv(tmp, path)


def part_name(batch: pa.Table) -> str:
    """Deterministic for the same images: shard id + a digest of the image ids in the part."""
    ids = batch.column("image_id").to_pylist()
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:12]
    shard = batch.column("shard_id")[0].as_py() if batch.num_rows else "empty"
    return f"part-{shard}-{digest}.parquet"


def write_batch(batch: pa.Table, run_uri: str, storage_options: Optional[dict] = None, meta_columns: list[str] = ()) -> pa.Table:
    """Ray map_batches function: write both tables for this batch, return per-image summaries."""
    fs, root = url_to_fs(run_uri, **(storage_options or {}))
    images, objects = split_tables(batch, meta_columns)
    name = part_name(batch)
    for folder, table in (("images", images), ("objects", objects)):
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
        _write_atomically(fs, f"{root}/{folder}/{name}", table)
    return images.select(SUMMARY_SCHEMA.names)
