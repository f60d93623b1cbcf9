"""Manifests (.jsonl, .csv or .parquet): one line per image with its prompts and metadata, read as
a stream and checked (every ``uri`` under an allowed folder, no credentials in a stored URI);
lines that name the same image are merged in bounded memory.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.io.credentials import redact_uri, stored_uri_problem
from pipeline.io.listing import SourceError, WorkItem
from pipeline.io.locations import is_within, resolve_relative

RESERVED_KEYS = {"uri", "objects", "image_id", "width", "height", "status", "error_class", "error",
                 "num_objects", "class_counts", "shard_id", "note", "num_prompt_errors", "num_flagged"}


def _refuse_credentials(key: str, number: int, written: str, uri: str, objects: list) -> None:
    """A manifest line whose image URI or mask path carries credentials is refused: the URI would be
    stored in the tables (and the mask path in the shard files) with them."""
    masks = [o["mask"] for o in objects if isinstance(o, dict) and isinstance(o.get("mask"), str)]
    for what, shown, full in [("uri", written, uri), *(("mask", m, m) for m in masks)]:
        problem = stored_uri_problem(full)
        if problem:
            raise SourceError(
                f"{key} line {number}: {what} {redact_uri(shown)} {problem}; stored URIs never carry credentials: "
                "give them in input.storage_options (the manifest and what it names are read with those)"
            )


def normalise_object(obj):
    """A manifest object with numeric ``label``/``object_key`` turned into text (``3`` -> ``"3"``),
    as the objects table's string columns need; other wrong types are left for the segment stage
    to reject as that object's error row."""
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for name in ("label", "object_key"):
        value = out.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[name] = str(int(value)) if isinstance(value, int) or value.is_integer() else repr(value)
    return out


def iter_manifest(manifest_uri: str, storage_options: dict | None = None, key: str = "prompts.manifest",
                  roots: Optional[list[str]] = None) -> Iterator[WorkItem]:
    """Stream a manifest (.jsonl, .csv, or .parquet with the same columns), one item per line.

    Used for prompt manifests and for input manifests (``input.format=manifest``; without an
    ``objects`` column such a manifest just lists images). ``uri`` may be relative to the
    manifest's folder; keys other than ``uri`` and ``objects`` are carried to the images table as
    metadata. In a .csv, ``objects`` (if any) is a JSON string and every other value a string.
    ``roots``: folders every ``uri`` must lie under (the manifest's own folder is always one);
    None allows any location (``prompts.allow_any_uri``). Lines that repeat a URI come out as
    separate items: ``merge_repeated_uris`` joins them.
    """
    fs, path = url_to_fs(manifest_uri, **(storage_options or {}))
    base = fs.unstrip_protocol(path.rsplit("/", 1)[0]) if "/" in path else fs.unstrip_protocol(".")
    if not fs.isfile(path):
        raise SourceError(f"{key}: file not found: {manifest_uri}")
    allowed = None if roots is None else [base, *roots]

    def rows() -> Iterator[tuple[int, dict]]:
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as fh:
                number = 0
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024):
                    for row in batch.to_pylist():
                        number += 1
                        yield number, row
            return
        if path.lower().endswith(".csv"):
            with fs.open(path, "rt", encoding="utf-8", newline="") as fh:
                for number, row in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
                    row = {k: (v if v != "" else None) for k, v in row.items() if k is not None}
                    if isinstance(row.get("objects"), str):
                        try:
                            row["objects"] = json.loads(row["objects"])
                        except json.JSONDecodeError as exc:
                            raise SourceError(f"{key} line {number}: objects is not valid JSON ({exc.msg})") from None
                    yield number, row
            return
        with fs.open(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"{key} line {number}: not valid JSON ({exc.msg})") from None

    for number, row in rows():
        if not isinstance(row, dict) or not isinstance(row.get("uri"), str):
            raise SourceError(f"{key} line {number}: needs a \"uri\" string")
        objects = row.get("objects") or []
        if not isinstance(objects, list):
            raise SourceError(f"{key} line {number}: \"objects\" must be a list")
        meta = {k: v for k, v in row.items() if k not in ("uri", "objects")}
        clash = sorted(set(meta) & RESERVED_KEYS)
        if clash:
            raise SourceError(f"{key} line {number}: keys {clash} clash with images-table columns; rename them")
        uri = resolve_relative(row["uri"], base)
        _refuse_credentials(key, number, row["uri"], uri, objects)
        if allowed is not None and not is_within(uri, allowed, storage_options):
            raise SourceError(
                f"{key} line {number}: uri {redact_uri(row['uri'])} is outside the manifest's folder {redact_uri(base)}"
                f"{' and ' + ', '.join(redact_uri(r) for r in roots) if roots else ''}; "
                "set prompts.allow_any_uri=true to let a manifest name other locations"
            )
        item_fs, item_path = url_to_fs(uri, **(storage_options or {}))
        yield WorkItem(item_fs.unstrip_protocol(item_path), json.dumps([normalise_object(o) for o in objects]),
                       json.dumps(meta, default=str) if meta else None, base, (number,))


SPOOL_SCHEMA = pa.schema([("uri", pa.string()), ("line", pa.int64()), ("prompts", pa.string()), ("meta", pa.string()),
                          ("base_uri", pa.string())])


def merge_repeated_uris(items: Iterable[WorkItem], key: str = "prompts.manifest") -> Iterator[WorkItem]:
    """Join the manifest lines that name the same image into one item, in the order of each
    image's first line: objects in line order, metadata merged (lines that disagree on a value
    are refused), an ``object_key`` used twice for one image refused, with the line numbers.

    One object per line is a common layout, and two rows with one image_id would break the run.
    The lines are spooled to a local Parquet file and grouped by duckdb, which spills to disk, so
    a manifest of any length is merged in bounded memory.
    """
    import duckdb

    tmp = tempfile.mkdtemp(prefix="autolabel-manifest-")
    try:
        spool = f"{tmp}/lines.parquet"
        columns: dict[str, list] = {name: [] for name in SPOOL_SCHEMA.names}
        with pq.ParquetWriter(spool, SPOOL_SCHEMA) as writer:
            def flush() -> None:
                writer.write_table(pa.table(columns, schema=SPOOL_SCHEMA))
                for values in columns.values():
                    values.clear()

            for item in items:
                for name, value in zip(SPOOL_SCHEMA.names, (item.uri, item.lines[0], item.prompts, item.meta, item.base_uri)):
                    columns[name].append(value)
                if len(columns["uri"]) == 8192:
                    flush()
            flush()
        con = duckdb.connect(config={"memory_limit": "1GB", "temp_directory": tmp, "threads": 1})
        try:
            reader = con.sql(
                "SELECT uri, list(line ORDER BY line), list(prompts ORDER BY line), list(meta ORDER BY line), any_value(base_uri) "
                "FROM read_parquet(?) GROUP BY uri ORDER BY min(line)", params=[spool],
            ).to_arrow_reader(1024)
            for batch in reader:
                for uri, lines, prompts, metas, base in zip(*(batch.column(i).to_pylist() for i in range(5))):
                    yield _merged(uri, lines, prompts, metas, base, key)
        finally:
            con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merged(uri: str, lines: list[int], prompts: list[Optional[str]], metas: list[Optional[str]], base: Optional[str],
            key: str) -> WorkItem:
    objects: list = []
    key_line: dict[str, int] = {}
    for line, text in zip(lines, prompts):
        for obj in json.loads(text) if text else []:
            object_key = obj.get("object_key") if isinstance(obj, dict) else None
            if isinstance(object_key, str):
                if object_key in key_line:
                    where = f"line {line}" if key_line[object_key] == line else f"lines {key_line[object_key]} and {line}"
                    raise SourceError(f"{key} {where}: object_key {object_key!r} is used twice for {redact_uri(uri)}; "
                                      "object keys must be unique within an image")
                key_line[object_key] = line
            objects.append(obj)
    meta: dict = {}
    meta_line: dict[str, int] = {}
    for line, text in zip(lines, metas):
        for name, value in (json.loads(text) if text else {}).items():
            if meta.get(name) is None:  # not given yet, or given as null: no disagreement
                meta[name], meta_line[name] = value, line
            elif value is not None and meta[name] != value:
                raise SourceError(f"{key} lines {meta_line[name]} and {line}: {redact_uri(uri)} has {name}={meta[name]!r} and "
                                  f"{name}={value!r}; lines naming the same image must agree")
    any_prompts = any(p is not None for p in prompts)
    return WorkItem(uri, json.dumps(objects) if any_prompts else None, json.dumps(meta) if meta else None, base, tuple(lines))
