"""Sink: per-image rows with nested objects -> ``RUN/images/*.parquet`` and ``RUN/objects/*.parquet``.

Runs inside Ray workers and writes through fsspec, so the run folder can be local or an object
store. Each file is written under a temporary name and then moved into place, so readers never
see half a file. Returns one small summary row per image for the driver's totals.
"""
from __future__ import annotations

import hashlib
import io
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .segment import MASK_TYPE

CLASS_COUNT_TYPE = pa.struct([("class_id", pa.int32()), ("class_name", pa.string()), ("count", pa.int32())])

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("error", pa.string()),
        ("num_objects", pa.int32()),
        ("class_counts", pa.list_(CLASS_COUNT_TYPE)),
        ("shard_id", pa.string()),
    ]
)

OBJECTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("object_id", pa.int32()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("det_score", pa.float32()),
        ("mask_score", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("area", pa.int64()),
        ("mask", MASK_TYPE),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("num_objects", pa.int32()),
        ("class_counts", pa.list_(CLASS_COUNT_TYPE)),
    ]
)


def class_counts(objects: list[dict]) -> list[dict]:
    counts: dict[int, dict] = {}
    for obj in objects:
        entry = counts.setdefault(obj["class_id"], {"class_id": obj["class_id"], "class_name": obj["class_name"], "count": 0})
        entry["count"] += 1
    return [counts[k] for k in sorted(counts)]


def split_tables(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """One row per image with nested ``objects`` -> (images table, objects table)."""
    rows = batch.select(["image_id", "uri", "width", "height", "status", "error_class", "error", "shard_id", "objects"]).to_pylist()
    image_rows, object_rows = [], []
    for row in rows:
        objects = row.pop("objects") or []
        row["num_objects"] = len(objects)
        row["class_counts"] = class_counts(objects)
        image_rows.append(row)
        for obj in objects:
            object_rows.append({"image_id": row["image_id"], "uri": row["uri"], **obj})
    return pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA), pa.Table.from_pylist(object_rows, schema=OBJECTS_SCHEMA)


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


def write_batch(batch: pa.Table, run_uri: str, storage_options: Optional[dict] = None) -> pa.Table:
    """Ray map_batches function: write both tables for this batch, return per-image summaries."""
    fs, root = url_to_fs(run_uri, **(storage_options or {}))
    images, objects = split_tables(batch)
    name = part_name(batch)
    for folder, table in (("images", images), ("objects", objects)):
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
        _write_atomically(fs, f"{root}/{folder}/{name}", table)
    return images.select(SUMMARY_SCHEMA.names)
