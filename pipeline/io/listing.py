"""What ``input.uri`` names: the images under a folder, a glob or an object-store prefix, or the
tar shards of a brace pattern, listed lazily (object stores page by page, never cached), so a
bucket of any size lists in constant driver memory; and the ``WorkItem`` each image becomes.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import fsspec
from fsspec.core import url_to_fs

from pipeline.io.locations import normalise_uri

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
