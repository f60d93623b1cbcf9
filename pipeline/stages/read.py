"""Read stage (CPU tasks): the images of a shard file -> their encoded bytes and header facts, or
error rows; a tar shard's members are streamed. Pixels are not decoded here: each model actor
decodes its own copy (io/decode.py), so images travel between stages encoded.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

import pyarrow as pa
from fsspec.core import url_to_fs

from pipeline.errors import ImageError
from pipeline.io.decode import error_text, inspect_image, iter_tar_members, read_bytes
from pipeline.run.tables import IMAGE_COLUMNS

# The encoded file (empty for an error row), next to the images columns the read stage adds
# (IMAGE_COLUMNS); dropped before the sink.
DATA_COLUMN = ("data", pa.large_binary())


def _inspected(data, uri: str, storage_options: Optional[dict], max_pixels: Optional[int]) -> tuple:
    """The read stage's columns for one input: (width, height, status, error_class, error, note, data)."""
    try:
        if isinstance(data, ImageError):
            raise data
        data = data if data is not None else read_bytes(uri, storage_options)
        width, height, note = inspect_image(data, max_pixels)
    except ImageError as exc:
        return (None, None, "error", exc.error_class, error_text(exc), None, b"")
    return (width, height, "ok", None, None, note, data)


def _append_image_columns(table: pa.Table, values: list[tuple]) -> pa.Table:
    for i, (name, typ) in enumerate([*IMAGE_COLUMNS, DATA_COLUMN]):
        table = table.append_column(pa.field(name, typ), pa.array([v[i] for v in values], type=typ))
    return table


class _GuardedRead:
    """Reading under the crash ledger (see run/faults.py): an image that kills the read worker
    again and again becomes a ``worker_crash`` row instead of failing the job."""

    def __init__(self, ledger, max_image_crashes: int):
        from pipeline.run.console import worker_logging
        from pipeline.run.faults import CrashGuard, InjectedFaults

        worker_logging()
        self.guard = CrashGuard(ledger, "decode", max_image_crashes)
        self.faults = InjectedFaults.from_env()
        self.whole = True

    def begin(self, uris: list[str]) -> None:
        self.whole = self.guard.start_batch(uris)

    def __call__(self, data, uri: str, storage_options: Optional[dict], max_pixels: Optional[int]) -> tuple:
        if not self.whole and not self.guard.start(uri):
            data = self.guard.crash_error()  # _inspected turns it into the error row
        elif self.faults:
            self.faults.maybe_kill("decode", uri)
        return _inspected(data, uri, storage_options, max_pixels)


def read_batch(batch: pa.Table, storage_options: Optional[dict] = None, max_pixels: Optional[int] = None,
               ledger=None, max_image_crashes: int = 3) -> pa.Table:
    """Ray map_batches function: shard rows (uri, optional data) -> rows with the encoded bytes
    and the header's facts, or error rows."""
    uris = batch.column("uri").to_pylist()
    carried = batch.column("data").to_pylist() if "data" in batch.column_names else [None] * len(uris)
    read = _GuardedRead(ledger, max_image_crashes)
    read.begin(uris)
    values = [read(data, uri, storage_options, max_pixels) for uri, data in zip(uris, carried)]
    read.guard.done()
    table = batch.drop_columns([c for c in ("data",) if c in batch.column_names])
    return _append_image_columns(table, values)


READ_ROWS = 16  # images per read batch: the unit the detector and SAM stages receive and progress moves by


def read_shards(batch: pa.Table, run_uri: str, run_storage_options: Optional[dict] = None,
                storage_options: Optional[dict] = None, max_pixels: Optional[int] = None, tars: bool = False,
                extensions: tuple[str, ...] = (".jpg",), ledger=None, max_image_crashes: int = 3) -> Iterator[pa.Table]:
    """Ray map_batches generator, one task per shard file (``shard_path`` rows): the shard's images
    read ``READ_ROWS`` at a time (or, for a tar shard, its members streamed), as bytes and header
    facts. One Ray block per shard, so every actor of every pool gets work however small the
    shard files are."""
    import pyarrow.parquet as pq

    from pipeline.run.timings import StageClock

    def batches() -> Iterator[pa.Table]:
        fs, _ = url_to_fs(run_uri, **(run_storage_options or {}))
        for path in batch.column("shard_path").to_pylist():
            with fs.open(path, "rb") as fh:
                shard = pq.read_table(fh)
            if tars:
                yield from read_tar_batch(shard, storage_options, tuple(extensions), max_pixels, READ_ROWS, ledger, max_image_crashes)
                continue
            for offset in range(0, shard.num_rows, READ_ROWS):
                yield read_batch(shard.slice(offset, READ_ROWS), storage_options, max_pixels, ledger, max_image_crashes)

    clock = StageClock()
    started = time.perf_counter()
    for out in batches():  # the time spent making each batch is its read time
        clock.add("read", time.perf_counter() - started)
        yield clock.stamp(out)
        started = time.perf_counter()


def read_tar_batch(
    batch: pa.Table, storage_options: Optional[dict] = None, extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png"),
    max_pixels: Optional[int] = None, rows_per_batch: int = 16, ledger=None, max_image_crashes: int = 3,
) -> Iterator[pa.Table]:
    """Ray map_batches generator: tar shard rows -> one row per image member (its bytes and
    header facts), yielded in batches of ``rows_per_batch`` so a big tar never sits in memory.

    A tar's member count is only known once it has been read, so each batch is held back until
    the next one is full; the tar's last batch carries ``shard_rows`` (the count) on its rows,
    which tells the driver when the shard is complete.
    """
    from pipeline.io.listing import image_id_for

    names = [n for n in ("shard_id", "uri", "image_id", "prompts", "meta", "base_uri")]
    carried = batch.column("data").to_pylist() if "data" in batch.column_names else [None] * batch.num_rows
    read = _GuardedRead(ledger, max_image_crashes)
    read.begin(batch.column("uri").to_pylist())
    pending: dict[str, list] = {n: [] for n in names}
    values: list[tuple] = []

    def flush(shard_rows: Optional[int] = None) -> pa.Table:
        table = pa.table({n: pa.array(pending[n], type=pa.string()) for n in names})
        table = table.append_column("shard_rows", pa.array([shard_rows] * table.num_rows, pa.int32()))
        out = _append_image_columns(table, values)
        for n in names:
            pending[n].clear()
        values.clear()
        return out

    for shard_id, tar_uri, data in zip(batch.column("shard_id").to_pylist(), batch.column("uri").to_pylist(), carried):
        held, count = None, 0
        for uri, payload in iter_tar_members(tar_uri, data, tuple(extensions), storage_options):
            for n, v in zip(names, (shard_id, uri, image_id_for(uri), None, None, None)):
                pending[n].append(v)
            values.append(read(payload, uri, storage_options, max_pixels))
            count += 1
            if len(values) == rows_per_batch:
                if held is not None:
                    yield held
                held = flush()
        if values:  # the full batch held back goes first; the partial last one carries the count
            if held is not None:
                yield held
            yield flush(count)
        elif held is not None:  # the last batch was a full one
            yield held.set_column(held.schema.get_field_index("shard_rows"), "shard_rows", pa.array([count] * held.num_rows, pa.int32()))
    read.guard.done()
