"""Sink: per-image rows with nested objects -> ``RUN/images/shard-X.parquet`` and ``RUN/objects/shard-X.parquet``.

Two steps, so that a crash anywhere never leaves output that readers would take as data, and
a resumed run writes exactly what an uninterrupted one would:

1. ``write_batch`` (Ray tasks) stages each batch's rows per shard under
   ``RUN/_staging/shard-X/`` and returns one small row per image to the driver.
2. ``commit_shard`` (a Ray task the driver launches once every image of a shard is staged) merges the staged parts
   into the shard's two files, deterministic in name and content (one row per image however
   often a retried task staged it), and its summary (``RUN/summaries/shard-X.parquet``: the
   report's counts of the shard, outputs/report/summaries.py), then writes ``RUN/_done/shard-X.json``
   with the shard's totals. That marker is what makes the shard count as done on a resume.

Every file is written atomically (a temporary name and a rename on local disks; one PUT on an
object store), through fsspec, so the run folder can be local or remote. A write that fails
(disk full, read-only, permission) raises ``OutputWriteError`` with the path and the reason.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.io.listing import protocols_of
from pipeline.outputs.report.summaries import shard_summary
from pipeline.run.ownership import STAGED_PART, SUMMARIES_DIR, is_local
from pipeline.run.timings import COUNT_PREFIX, PREFIX as TIMING_PREFIX, StageClock
from pipeline.run.tables import OBJECTS_SCHEMA, images_schema

STAGING_DIR = "_staging"
DONE_DIR = "_done"
# What write_batch tells the driver per image: enough to know when a shard is complete, plus the
# stage timings (``t_*``) and counts (``n_*``), and which SAM actor did it (timings.py).
SUMMARY_COLUMNS = ("shard_id", "image_id", "shard_rows")
SAM_ACTOR_COLUMNS = ("sam_actor", "sam_node", "sam_dtype", "sam_busy_s", "sam_wall_s")


class OutputWriteError(RuntimeError):
    """The run folder cannot be written (disk full, read-only, no permission); says path and why."""


@dataclass
class Totals:
    """Counts over images-table rows; per shard in ``_done/shard-X.json``, summed for the run."""

    images: int = 0
    ok: int = 0
    errors_by_class: Counter = field(default_factory=Counter)
    objects: int = 0
    objects_by_class: Counter = field(default_factory=Counter)
    prompt_errors: int = 0
    flagged: int = 0
    flagged_by_reason: Counter = field(default_factory=Counter)

    def add(self, image_rows: Iterable[dict]) -> None:
        for row in image_rows:
            self.images += 1
            if row["status"] == "ok":
                self.ok += 1
            else:
                self.errors_by_class[row["error_class"]] += 1
            self.objects += row["num_objects"]
            self.prompt_errors += row["num_prompt_errors"]
            self.flagged += row.get("num_flagged") or 0
            for entry in row["class_counts"]:
                self.objects_by_class[entry["class_name"] or "(unlabeled)"] += entry["count"]

    def add_flags(self, objects: pa.Table) -> None:
        """Flagged objects by reason (an object may have several), from an objects table."""
        for row in objects.filter(pc.field("candidate") == 0).select(["flags"]).to_pylist():
            self.flagged_by_reason.update(row["flags"] or [])

    def merge(self, other: dict) -> None:
        """Add a shard's totals (``as_dict`` form, as read back from its done marker)."""
        self.images += other["images"]
        self.ok += other["ok"]
        self.errors_by_class.update(other["errors_by_class"])
        self.objects += other["objects"]
        self.objects_by_class.update(other["objects_by_class"])
        self.prompt_errors += other["prompt_errors"]
        self.flagged += other.get("flagged", 0)  # markers of earlier versions have none
        self.flagged_by_reason.update(other.get("flagged_by_reason", {}))

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "ok": self.ok,
            "error": sum(self.errors_by_class.values()),
            "errors_by_class": dict(self.errors_by_class.most_common()),
            "objects": self.objects,
            "objects_by_class": dict(self.objects_by_class.most_common()),
            "prompt_errors": self.prompt_errors,
            "flagged": self.flagged,
            "flagged_by_reason": dict(self.flagged_by_reason.most_common()),
        }


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
        row["num_flagged"] = sum(bool(o.get("needs_review")) and o["candidate"] == 0 for o in objects)
        row.update({name: _meta_value(meta.get(name)) for name in meta_columns})
        image_rows.append(row)
        for obj in objects:
            object_rows.append({"image_id": row["image_id"], "uri": row["uri"], **obj})
    return (
        pa.Table.from_pylist(image_rows, schema=images_schema(list(meta_columns))),
        pa.Table.from_pylist(object_rows, schema=OBJECTS_SCHEMA),
    )


# Object stores publish an object whole when its single PUT completes; a rename there is a copy.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


def atomic_write(fs, path: str, data: bytes) -> None:
    """All of ``data`` at ``path`` or nothing: one PUT on an object store (atomic there by
    itself), elsewhere a temporary dot-name (readers skip those) renamed into place."""
    try:
        if OBJECT_STORES & protocols_of(fs):
            fs.pipe_file(path, data)
            return
        parent, name = path.rsplit("/", 1)
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        except BaseException:
            try:
                fs.rm(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise OutputWriteError(f"cannot write {fs.unstrip_protocol(path)}: {exc.strerror or exc}") from exc


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _digest(image_ids: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:16]


def staging_path(root: str, shard_id: str) -> str:
    return f"{root}/{STAGING_DIR}/shard-{shard_id}"


def write_batch(batch: pa.Table, run_uri: str, storage_options: Optional[dict] = None, meta_columns: list[str] = ()) -> pa.Table:
    """Ray map_batches function: stage this batch's rows, per shard; return one row per image.

    Part names come from the images they hold, so a retried task overwrites its own parts.
    Objects are staged before images: an images part means its objects part is complete.
    """
    started = time.perf_counter()
    fs, root = url_to_fs(run_uri, **(storage_options or {}))
    shard_ids = batch.column("shard_id")
    for shard_id in pc.unique(shard_ids).to_pylist():
        images, objects = split_tables(batch.filter(pc.equal(shard_ids, shard_id)), meta_columns)
        name = _digest(images.column("image_id").to_pylist())
        folder = staging_path(root, shard_id)
        atomic_write(fs, f"{folder}/objects-{name}.parquet", _parquet_bytes(objects))
        atomic_write(fs, f"{folder}/images-{name}.parquet", _parquet_bytes(images))
    clock = StageClock()
    clock.add("write", time.perf_counter() - started)
    extra = [c for c in batch.column_names if c.startswith((TIMING_PREFIX, COUNT_PREFIX)) or c in SAM_ACTOR_COLUMNS]
    return clock.stamp(batch.select([*SUMMARY_COLUMNS, *extra]))


def _read(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def commit_shard(fs, root: str, shard_id: str, meta_columns: list[str] = ()) -> dict:
    """Merge a shard's staged parts into ``images/`` and ``objects/``, mark it done, return its totals.

    Only called once every image of the shard has been staged. An image staged twice (a task
    retried after it had written) is taken from the first part, by name, that holds it. A shard
    already marked done is not touched again (a commit task retried after it had finished, and
    removed the staged parts, must not write the shard anew from nothing).
    """
    marker_path = f"{root}/{DONE_DIR}/shard-{shard_id}.json"
    try:
        return json.loads(fs.cat_file(marker_path))
    except FileNotFoundError:
        pass
    folder = staging_path(root, shard_id)
    fs.invalidate_cache(folder)  # object-store listings are cached; workers wrote here since
    try:
        names = sorted(fs.ls(folder, detail=False))
    except FileNotFoundError:
        names = []
    image_parts, object_parts = [], []
    seen: set[str] = set()
    for part in (n for n in names if n.rsplit("/", 1)[-1].startswith("images-")):
        images = _read(fs, part)
        ids = images.column("image_id")
        fresh = pc.invert(pc.is_in(ids, value_set=pa.array(sorted(seen), pa.string())))
        images = images.filter(fresh)
        if not images.num_rows:
            continue
        kept = images.column("image_id")
        objects = _read(fs, part.replace("/images-", "/objects-"))
        object_parts.append(objects.filter(pc.is_in(objects.column("image_id"), value_set=kept)))
        image_parts.append(images)
        seen.update(kept.to_pylist())
    schema = images_schema(list(meta_columns))
    images = pa.concat_tables([t.cast(schema) for t in image_parts]) if image_parts else schema.empty_table()
    objects = pa.concat_tables([t.cast(OBJECTS_SCHEMA) for t in object_parts]) if object_parts else OBJECTS_SCHEMA.empty_table()
    marker = write_shard(fs, root, shard_id, images, objects, meta_columns)
    staged = [n for n in names if STAGED_PART.fullmatch(n.rsplit("/", 1)[-1])]  # the parts it merged: nothing else
    if staged:
        try:
            fs.rm(staged)
            if is_local(fs):
                os.rmdir(folder)
        except OSError:
            pass  # the shard is committed; the end of the run (or a resume) removes _staging
    return marker


def write_shard(fs, root: str, shard_id: str, images: pa.Table, objects: pa.Table, meta_columns: list[str] = ()) -> dict:
    """A shard's committed files from its rows (sorted here, so name and content are deterministic):
    ``objects/``, ``images/``, its summary, and last its done marker, whose totals it returns."""
    images = images.sort_by([("uri", "ascending"), ("image_id", "ascending")])
    objects = objects.sort_by([("uri", "ascending"), ("image_id", "ascending"), ("object_id", "ascending"), ("candidate", "ascending")])
    name = f"shard-{shard_id}.parquet"
    atomic_write(fs, f"{root}/objects/{name}", _parquet_bytes(objects))
    atomic_write(fs, f"{root}/images/{name}", _parquet_bytes(images))
    # The report's counts of this shard, so a report merges summaries instead of scanning every row.
    summary = shard_summary(images, objects, list(meta_columns), f"shard-{shard_id}")
    atomic_write(fs, f"{root}/{SUMMARIES_DIR}/{name}", _parquet_bytes(summary))
    totals = Totals()
    totals.add(images.select(["status", "error_class", "num_objects", "class_counts", "num_prompt_errors", "num_flagged"]).to_pylist())
    totals.add_flags(objects)
    marker = {"shard_id": shard_id, **totals.as_dict()}
    atomic_write(fs, f"{root}/{DONE_DIR}/shard-{shard_id}.json", json.dumps(marker).encode())
    return marker


def commit_shard_task(run_uri: str, storage_options: Optional[dict], shard_id: str, meta_columns: list[str] = ()) -> dict:
    """``commit_shard`` as a Ray task: it runs on a worker, next to the data, not in the driver."""
    fs, root = url_to_fs(run_uri, **(storage_options or {}))
    return commit_shard(fs, root.rstrip("/"), shard_id, meta_columns)


class ShardCommits:
    """The driver's side of committing: each complete shard's commit is launched as a Ray task
    (retried if its worker dies: a commit is idempotent), and the driver only collects the done
    markers, so no shard data passes through it however large the cluster."""

    def __init__(self, run_uri: str, storage_options: Optional[dict], meta_columns: list[str], retries: int,
                 runtime_env: Optional[dict] = None):
        import ray

        self.args = (run_uri, storage_options, list(meta_columns))
        self.task = ray.remote(commit_shard_task).options(num_cpus=0.25, max_retries=retries, runtime_env=runtime_env)
        self.pending: dict = {}

    def launch(self, shard_id: str) -> None:
        run_uri, options, meta = self.args
        self.pending[self.task.remote(run_uri, options, shard_id, meta)] = shard_id

    def finished(self, block: bool) -> list[dict]:
        """The done markers of the commits that finished (at least one when ``block``); a commit
        that failed raises its error (OutputWriteError for a write that failed)."""
        import ray

        if not self.pending:
            return []
        refs = list(self.pending)
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        markers = []
        for ref in ready:
            self.pending.pop(ref)
            markers.append(ray.get(ref))
        return markers
