"""Where images come from: list ``input.uri`` (or read a prompt manifest) and cut it into shards.

The driver never holds the whole listing: it walks the storage lazily and writes each shard
(``shard_size`` image URIs) as a small Parquet file under ``RUN/_shards/``. Ray then reads the
shard files as its work units, so a bucket with millions of objects streams through in
constant driver memory, and a later resume can tell which shards are finished.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.io.credentials import redact_uri, stored_uri_problem
from pipeline.io.locations import is_within, normalise_uri, resolve_relative  # noqa: F401 - also imported from here

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
_GLOB_CHARS = "*?["


def _before_wildcard(path: str) -> Optional[str]:
    """The part of a glob before its first wildcard; None when ``path`` is not a glob."""
    found = [path.index(c) for c in _GLOB_CHARS if c in path]
    return path[: min(found)] if found else None


def _streams_glob(fs, fixed: str) -> bool:
    """An object-store glob whose wildcards lie below the bucket name (``fixed``: its part before
    them) is streamed page by page (``_glob_keys``); a wildcard in the bucket's name goes through
    ``fs.glob``."""
    return _pages_keys(fs) and "/" in fixed


class SourceError(ValueError):
    """``input.uri`` cannot be listed; the message says why."""


def no_images(uri: str, extensions: list[str]) -> SourceError:
    return SourceError(f"input.uri: no images with suffix {', '.join(extensions)} under {uri}")


def image_id_for(uri: str) -> str:
    """Stable id of an image: the same URI always gives the same id, across runs and machines."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def protocols_of(fs: fsspec.AbstractFileSystem) -> set[str]:
    """Every name a filesystem answers to (``fs.protocol`` is a string or a tuple)."""
    return set(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else {fs.protocol}


def is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "memory" in protocols_of(fs)


def iter_image_uris(uri: str, extensions: list[str], storage_options: dict | None = None) -> Iterator[str]:
    """Yield full URIs of the images under ``uri`` (folder, recursive; glob; or one file), lazily.

    Folders are walked directory by directory in sorted order, so the order (and thus the shard
    layout) is the same on every run over the same data. Object stores (s3://) are listed page
    by page instead, in key order (S3's own lexicographic order), holding one page at a time and
    leaving nothing in s3fs's listings cache: a bucket of any size lists in constant memory.
    """
    fs, path = url_to_fs(uri, **(storage_options or {}))
    wanted = tuple(e.lower() for e in extensions)

    def full(p: str) -> str:
        return fs.unstrip_protocol(p)

    head = _before_wildcard(path)
    if head is not None:
        fixed = head.rsplit("/", 1)[0]
        if _streams_glob(fs, head):
            matches: Iterable[str] = _glob_keys(fs, path)
            is_file = lambda match: True  # noqa: E731 - listed objects are files
        else:
            matches, is_file = sorted(fs.glob(path, detail=False)), fs.isfile
        for match in matches:
            if match.lower().endswith(wanted) and not _hidden(match[len(fixed):]) and is_file(match):
                yield full(match)
        return
    if _pages_keys(fs):
        yield from (full(p) for p in _object_store_images(fs, path, uri, wanted))
        return
    if fs.isfile(path):
        yield full(path)  # a single file named explicitly is taken whatever its suffix
        return
    if not fs.isdir(path):
        raise SourceError(f"input.uri: nothing found at {uri}")
    local = "file" in protocols_of(fs)
    for root, dirs, files in fs.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # prunes the walk: .git/, .thumbnails/ ...
        for name in sorted(files):
            if name.lower().endswith(wanted) and not name.startswith("."):
                yield full(f"{root.rstrip('/')}/{name}")
        if not local:  # remote back-ends cache each listing: drop a folder's once it is done
            fs.invalidate_cache(root)


def _hidden(relative: str) -> bool:
    """A path below the listing's root with a hidden part (``.thumbnails/a.jpg``, ``.a.jpg``)."""
    return any(part.startswith(".") for part in relative.split("/") if part)


# ------------------------------------------------------------------ object stores, page by page
#
# s3fs's own walk/find/glob keep every listing they make in the filesystem's dircache (and glob
# returns a list), so the driver would hold a whole bucket's keys. These list with
# ListObjectsV2 directly (through s3fs's call_s3: its credentials, endpoint, retries and
# requester-pays settings), one page of at most 1,000 keys at a time, never cached.

_AFTER_ALL = "\U0010ffff"  # sorts after every character a key can hold: "a/.git/" + this skips a/.git/


def _pages_keys(fs: fsspec.AbstractFileSystem) -> bool:
    return callable(getattr(fs, "call_s3", None)) and callable(getattr(fs, "split_path", None))


def _iter_keys(fs, bucket: str, prefix: str, delimiter: str = "", skip_hidden_below: Optional[str] = None) -> Iterator[str]:
    """``bucket/key`` of every object whose key starts with ``prefix``, in key order, one page at a
    time. ``delimiter="/"``: only keys with no further "/" after the prefix. ``skip_hidden_below``:
    a page that ends inside a hidden folder under that key prefix (``x/.git/...``) is not followed
    by the rest of that folder: the listing starts again after it (hidden keys are still dropped
    by the caller, this only saves listing them)."""
    kwargs = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    resume: dict = {}
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs, **resume)
        contents = page.get("Contents") or []
        for obj in contents:
            if not obj["Key"].endswith("/"):  # "folder/" placeholder objects are not files
                yield f"{bucket}/{obj['Key']}"
        if not page.get("IsTruncated"):
            return
        resume = {"ContinuationToken": page["NextContinuationToken"]}
        if skip_hidden_below is not None and contents:
            last = contents[-1]["Key"]
            parts = last[len(skip_hidden_below):].split("/")[:-1]  # the folders the last key is in
            hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
            if hidden is not None:
                resume = {"StartAfter": skip_hidden_below + "/".join(parts[: hidden + 1]) + "/" + _AFTER_ALL}


def _object_store_images(fs, path: str, uri: str, wanted: tuple[str, ...]) -> Iterator[str]:
    """One object named explicitly (whatever its suffix), or every image under a prefix."""
    bucket, key, _ = fs.split_path(path)
    try:
        info = fs.info(path)  # HEAD object, else a one-key listing: nothing is cached
    except FileNotFoundError:
        raise SourceError(f"input.uri: nothing found at {uri}") from None
    if info["type"] != "directory":
        yield path
        return
    prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""
    for name in _iter_keys(fs, bucket, prefix, skip_hidden_below=prefix):
        if name.lower().endswith(wanted) and not _hidden(name[len(bucket) + 1 + len(prefix):]):
            yield name


def _glob_keys(fs, pattern: str) -> Iterator[str]:
    """The objects matching a glob, as ``fs.glob`` matches them (fsspec's own pattern translation:
    ``*``, ``?``, ``[...]``, ``**`` for any depth), in key order, streamed from the listing of the
    pattern's fixed prefix; a pattern with one level below that prefix and no ``**`` lists with a
    delimiter, so sub-folders are not listed at all."""
    from fsspec.utils import glob_translate

    bucket, key, _ = fs.split_path(pattern)
    prefix = _before_wildcard(key)
    rest = key[len(prefix):]
    regex = re.compile(glob_translate(f"{bucket}/{key}"))
    flat = "/" not in rest and "**" not in rest
    for name in _iter_keys(fs, bucket, prefix, delimiter="/" if flat else ""):
        if regex.match(name):
            yield name


MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace patterns: ``shard-{000000..000123}.tar`` (zero padding kept) and
    ``{a,b}`` lists, any number of them, expanded in order. A pattern without braces is itself."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise SourceError(f"input.uri: brace range {{{body}}} must be two numbers, e.g. {{000000..000123}}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def input_format(uri: str, declared: str = "auto") -> str:
    """``input.format``, or what ``input.uri`` looks like: tar shards, a manifest, or images."""
    if declared != "auto":
        return declared
    bare = uri.split("?", 1)[0].lower()
    if bare.endswith(".tar") or _BRACE.search(uri):
        return "tar"
    if bare.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return "images"


def iter_tar_uris(uri: str, storage_options: dict | None = None) -> Iterator[str]:
    """Yield the tar shards ``uri`` names (brace pattern, glob, or one file), without opening them.

    Brace patterns are expanded without listing storage (a shard that is not there becomes a
    ``not_found`` error row, like a file that disappears); globs are listed.
    """
    for pattern in expand_braces(uri):
        fs, path = url_to_fs(pattern, **(storage_options or {}))
        fixed = _before_wildcard(path)
        if fixed is not None:
            for match in _glob_keys(fs, path) if _streams_glob(fs, fixed) else sorted(fs.glob(path, detail=False)):
                yield fs.unstrip_protocol(match)
        else:
            yield fs.unstrip_protocol(path)


RESERVED_KEYS = {"uri", "objects", "image_id", "width", "height", "status", "error_class", "error",
                 "num_objects", "class_counts", "shard_id", "note", "num_prompt_errors", "num_flagged"}


@dataclass
class WorkItem:
    """One image to label: its URI, and for manifest inputs its prompts and metadata (JSON)."""

    uri: str
    prompts: Optional[str] = None  # JSON list of manifest objects
    meta: Optional[str] = None  # JSON object of the line's extra keys
    base_uri: Optional[str] = None  # folder relative mask paths are resolved against
    lines: tuple[int, ...] = ()  # the manifest lines it came from (several when lines repeat a URI)


def root_of(uri: str, storage_options: dict | None = None) -> str:
    """The folder a URI names or sits in, as a full URI: globs are cut at their first wildcard, a
    name with a file suffix gives its parent. Used as a root that manifest paths must stay under."""
    fs, path = url_to_fs(uri, **(storage_options or {}))
    head = _before_wildcard(path)
    if head is not None:
        path = head.rsplit("/", 1)[0]
    elif re.search(r"\.[A-Za-z0-9]{1,5}$", path.rsplit("/", 1)[-1]):
        path = path.rsplit("/", 1)[0] if "/" in path else ""
    return fs.unstrip_protocol(normalise_uri(path))  # an http(s) path is the whole URL: normpath would eat its '//'


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


@dataclass
class ShardListing:
    shards_uri: str
    num_shards: int
    num_images: int
    meta_columns: list[str] = field(default_factory=list)  # extra manifest keys, in first-seen order
    labels: list[str] = field(default_factory=list)  # class names the manifest's objects use


def write_shards(
    items: Iterable[WorkItem],
    shard_size: int,
    run_fs: fsspec.AbstractFileSystem,
    run_path: str,
    storage_options: dict | None = None,
    tars: bool = False,
) -> ShardListing:
    """Write the work items as one Parquet file per shard under ``RUN/_shards``
    (``tars``: each item is a tar shard whose image count is not known yet)."""
    shards_path = f"{run_path.rstrip('/')}/{SHARDS_DIR}"
    run_fs.makedirs(shards_path, exist_ok=True)
    listing = ShardListing(run_fs.unstrip_protocol(shards_path), 0, 0)
    meta_columns: dict[str, None] = {}
    labels: set[str] = set()
    batch: list[WorkItem] = []

    def flush() -> None:
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
