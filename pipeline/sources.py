"""Where images come from: list ``input.uri`` through fsspec and cut the listing into shards.

The driver never holds the whole listing: it walks the storage lazily and writes each shard
(``shard_size`` image URIs) as a small Parquet file under ``RUN/_shards/``. Ray then reads the
shard files as its work units, so a bucket with millions of objects streams through in
constant driver memory, and a later resume can tell which shards are finished.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

SHARDS_DIR = "_shards"
SHARD_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("uri", pa.string()),
        ("image_id", pa.string()),
        # Bytes travel with the work item only for filesystems that live inside one process
        # (memory://), which Ray's workers cannot see; everywhere else workers read the URI.
        ("data", pa.binary()),
    ]
)
_GLOB_CHARS = "*?["


class SourceError(ValueError):
    """``input.uri`` cannot be listed; the message says why."""


def no_images(uri: str, extensions: list[str]) -> SourceError:
    return SourceError(f"input.uri: no images with suffix {', '.join(extensions)} under {uri}")


def image_id_for(uri: str) -> str:
    """Stable id of an image: the same URI always gives the same id, across runs and machines."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "memory" in protocols


def iter_image_uris(uri: str, extensions: list[str], storage_options: dict | None = None) -> Iterator[str]:
    """Yield full URIs of the images under ``uri`` (folder, recursive; glob; or one file), lazily.

    Folders are walked directory by directory in sorted order, so the order (and thus the shard
    layout) is the same on every run over the same data.
    """
    fs, path = url_to_fs(uri, **(storage_options or {}))
    wanted = tuple(e.lower() for e in extensions)

    def full(p: str) -> str:
        return fs.unstrip_protocol(p)

    if any(c in path for c in _GLOB_CHARS):
        matches = sorted(fs.glob(path, detail=False))
        for match in matches:
            if match.lower().endswith(wanted) and fs.isfile(match):
                yield full(match)
        return
    if fs.isfile(path):
        yield full(path)  # a single file named explicitly is taken whatever its suffix
        return
    if not fs.isdir(path):
        raise SourceError(f"input.uri: nothing found at {uri}")
    for root, dirs, files in fs.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(wanted) and not name.startswith("."):
                yield full(f"{root.rstrip('/')}/{name}")


@dataclass
class ShardListing:
    shards_uri: str
    num_shards: int
    num_images: int


def write_shards(
    uri: str,
    extensions: list[str],
    shard_size: int,
    run_fs: fsspec.AbstractFileSystem,
    run_path: str,
    storage_options: dict | None = None,
) -> ShardListing:
    """List the input and write one Parquet file per shard under ``RUN/_shards``."""
    in_fs, _ = url_to_fs(uri, **(storage_options or {}))
    carry_bytes = is_process_local(in_fs)
    shards_path = f"{run_path.rstrip('/')}/{SHARDS_DIR}"
    run_fs.makedirs(shards_path, exist_ok=True)
    num_images = num_shards = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal num_shards
        shard_id = f"{num_shards:06d}"
        data = [in_fs.cat_file(in_fs._strip_protocol(u)) if carry_bytes else None for u in batch]
        table = pa.table(
            {"shard_id": [shard_id] * len(batch), "uri": batch, "image_id": [image_id_for(u) for u in batch], "data": data},
            schema=SHARD_SCHEMA,
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        run_fs.pipe_file(f"{shards_path}/shard-{shard_id}.parquet", buf.getvalue())
        num_shards += 1
        batch.clear()

    for image_uri in iter_image_uris(uri, extensions, storage_options):
        batch.append(image_uri)
        num_images += 1
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    if num_images == 0:
        raise no_images(uri, extensions)
    return ShardListing(run_fs.unstrip_protocol(shards_path), num_shards, num_images)
