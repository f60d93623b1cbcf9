"""Work items cut into shards: the driver never holds the whole listing; it writes each shard
(``shard_size`` image URIs) as a small Parquet file under ``RUN/_shards/`` while the listing
streams. Ray then reads the shard files as its work units, so a bucket with millions of objects
streams through in constant driver memory, and a later resume can tell which shards are finished.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Iterable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.io.listing import WorkItem, image_id_for, is_process_local
from pipeline.io.video import VIDEO_SUFFIXES

SHARDS_DIR = "_shards"
SHARD_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("uri", pa.string()),
        ("image_id", pa.string()),
        # Bytes travel with the work item only for filesystems that live inside one process
        # (memory://), which Ray's workers cannot see; everywhere else workers read the URI.
        ("data", pa.binary()),
        ("prompts", pa.string()),
        ("meta", pa.string()),
        ("base_uri", pa.string()),
        # Images in the shard, so the driver knows when all of them are written; null for a tar,
        # whose members are counted by the decode stage as it reads them.
        ("shard_rows", pa.int32()),
    ]
)


@dataclass
class ShardListing:
    shards_uri: str
    num_shards: int
    num_images: int
    meta_columns: list[str] = field(default_factory=list)  # extra manifest keys, in first-seen order
    labels: list[str] = field(default_factory=list)  # class names the manifest's objects use
    video_shards: list[str] = field(default_factory=list)  # shards of one video each (stages/track.py), not images
    num_videos: int = 0


def is_video(uri: str) -> bool:
    """A video file by its suffix (io/video.py's ``VIDEO_SUFFIXES``), query and fragment aside."""
    return uri.split("?", 1)[0].split("#", 1)[0].lower().endswith(VIDEO_SUFFIXES)


def write_shards(
    items: Iterable[WorkItem],
    shard_size: int,
    run_fs: fsspec.AbstractFileSystem,
    run_path: str,
    storage_options: dict | None = None,
    tars: bool = False,
) -> ShardListing:
    """Write the work items as one Parquet file per shard under ``RUN/_shards``
    (``tars``: each item is a tar shard whose image count is not known yet). A video is a shard
    of its own (one unit of work, retried and committed as one), listed in ``video_shards``."""
    shards_path = f"{run_path.rstrip('/')}/{SHARDS_DIR}"
    run_fs.makedirs(shards_path, exist_ok=True)
    listing = ShardListing(run_fs.unstrip_protocol(shards_path), 0, 0)
    meta_columns: dict[str, None] = {}
    labels: set[str] = set()
    batch: list[WorkItem] = []

    def flush(batch: list[WorkItem] = batch) -> None:
        shard_id = f"{listing.num_shards:06d}"
        uris = [item.uri for item in batch]
        table = pa.table(
            {
                "shard_id": [shard_id] * len(batch),
                "uri": uris,
                "image_id": [image_id_for(u) for u in uris],
                "data": [_bytes_if_process_local(u, storage_options) for u in uris],
                "prompts": [item.prompts for item in batch],
                "meta": [item.meta for item in batch],
                "base_uri": [item.base_uri for item in batch],
                "shard_rows": [None if tars else len(batch)] * len(batch),
            },
            schema=SHARD_SCHEMA,
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        run_fs.pipe_file(f"{shards_path}/shard-{shard_id}.parquet", buf.getvalue())
        listing.num_shards += 1
        batch.clear()

    for item in items:
        if not tars and is_video(item.uri):
            listing.video_shards.append(f"{listing.num_shards:06d}")
            listing.num_videos += 1
            flush([item])
        else:
            batch.append(item)
            listing.num_images += 1
        if item.meta:
            meta_columns.update(dict.fromkeys(json.loads(item.meta)))
        if item.prompts:
            labels.update(o["label"] for o in json.loads(item.prompts) if isinstance(o, dict) and isinstance(o.get("label"), str))
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    listing.meta_columns = list(meta_columns)
    listing.labels = sorted(labels)
    return listing


def _bytes_if_process_local(uri: str, storage_options: dict | None) -> Optional[bytes]:
    fs, path = url_to_fs(uri, **(storage_options or {}))
    if not is_process_local(fs):
        return None
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None  # the decode stage reports it as not_found
