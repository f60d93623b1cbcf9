"""Proof of what autolabel wrote, asked for before anything is deleted.

``run --overwrite``, a resume's clean-up and ``export --overwrite`` delete only files that a run or an
export wrote itself. The proof has two parts:

1. A record bound to its place. run.json and an export's ``.autolabel-export.json`` carry an id and
   ``location``: the normalised URI of the folder they were written to. A record that was copied or
   moved names another place, so it proves nothing where it is now, and that folder is refused.
2. Names. Every file a run writes has a name it chose (``images/shard-000012.parquet`` for a shard
   its listing made, ``_done/shard-000012.json`` ...); an export lists its files in its marker when it
   completes (an interrupted one is recognised by the names its format writes).

What is neither, where the run or export would write, is in the way: the command refuses, touches
nothing and names it. Symlinks are never followed: one found there is in the way too.
Records written before this module existed have no ``location``: they are recognised by names alone.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from pipeline.io.listing import protocols_of

SHARD = r"(?P<shard>\d{6,})"  # write_shards' ids: 000000, 000001, ...
TMP = r"(?:\.tmp-[0-9a-f]{32}-)?"  # sink.atomic_write's temporary name on local disks
SUMMARIES_DIR = "summaries"  # a shard's counts, written by its commit beside images/ and objects/ (outputs/report/summaries.py)
CHUNKS_DIR = "_chunks"  # a video's plan and its chunks' files until the video is committed (run/video_chunks.py)
RUN_DATA = ("_shards", "_staging", "_done", "images", "objects", "videos", "tracks", SUMMARIES_DIR, CHUNKS_DIR)  # the run's own folders: all of it must be the run's
# _chunks/: shard-X.plan.json, shard-X-cNNNN.{objects,images,tracks}.parquet and the chunk's marker shard-X-cNNNN.json
CHUNK_FILE = re.compile(rf"{TMP}shard-{SHARD}(?:\.plan\.json|-c(?P<chunk>\d{{4,}})(?P<kind>\.json|\.(?:images|objects|tracks)\.parquet))")
RUN_FILE_NAMES = {
    "_shards": re.compile(rf"shard-{SHARD}\.parquet"),
    "images": re.compile(rf"{TMP}shard-{SHARD}\.parquet"),
    "objects": re.compile(rf"{TMP}shard-{SHARD}\.parquet"),
    "videos": re.compile(rf"{TMP}shard-{SHARD}\.parquet"),  # video shards only (stages/track.py)
    "tracks": re.compile(rf"{TMP}shard-{SHARD}\.parquet"),
    SUMMARIES_DIR: re.compile(rf"{TMP}shard-{SHARD}\.parquet"),
    "_done": re.compile(rf"{TMP}shard-{SHARD}\.json"),
    CHUNKS_DIR: CHUNK_FILE,
}
STAGED_FOLDER = re.compile(rf"shard-{SHARD}")
STAGED_PART = re.compile(rf"{TMP}(?:images|objects|videos|tracks)-[0-9a-f]{{16}}\.parquet")
CLASS_EMBEDDINGS = "class_embeddings.npz"  # an open-vocabulary run's classes (models/detector.py), beside run.json
RUN_RECORDS = re.compile(rf"{TMP}(?:run\.json|class_embeddings\.npz)")  # the run's own files at its top level
REPORT_FILES = ("report.html", "counts.csv", "summary.json")
IMPORT = re.compile(r"import-\d{8}T\d{12}Z(?:-\d{3})?")  # review._new_import_id


class OwnershipError(ValueError):
    """Something that is not ours is in the way (or a record is not bound here); nothing was touched."""


def is_local(fs) -> bool:
    return bool(protocols_of(fs) & {"file", "local"})


def normalised_path(fs, path: str) -> str:
    """The folder ``path`` names, spelled one way: ``..``, ``.``, repeated and trailing ``/`` resolved
    (fsspec has removed ``file://`` by now). A local path becomes absolute with its symlinks resolved,
    as the OS resolves them when it writes there; an object-store key is resolved as text, and may
    not climb out of its bucket."""
    if is_local(fs):
        return os.path.realpath(path or ".")
    if not path.strip("/"):
        return path
    norm = posixpath.normpath(path)
    bucket = path.lstrip("/").split("/", 1)[0]
    if norm.startswith("..") or norm in (".", "/") or (not path.startswith("/") and norm.split("/", 1)[0] != bucket):
        raise ValueError(f"'..' in {path} climbs out of the bucket {bucket}")
    return norm


def location_of(fs, path: str) -> str:
    """The URI a record binds itself to: the normalised folder, with its protocol."""
    return fs.unstrip_protocol(normalised_path(fs, path))


@dataclass(frozen=True)
class Entry:
    rel: str  # "/"-separated path under the folder looked at
    kind: str  # file | directory | link | other (a device, a socket, ...)

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


def _kind(info: dict) -> str:
    if info.get("islink"):
        return "link"
    return info.get("type") if info.get("type") in ("file", "directory") else "other"


def listing(fs, folder: str, recursive: bool = True) -> list[Entry]:
    """What is under ``folder`` ([] when it does not exist), sorted; symlinks are reported as links
    and never entered (fsspec's walk descends only into real directories)."""
    fs.invalidate_cache(folder)
    try:
        if recursive:
            found = fs.find(folder, withdirs=True, detail=True)
        else:
            found = {e["name"]: e for e in fs.ls(folder, detail=True)}
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = folder.rstrip("/") + "/"
    out = {}
    for name, info in found.items():
        name = name.rstrip("/")
        if name.startswith(prefix) and name != folder:
            out[name[len(prefix):]] = Entry(name[len(prefix):], _kind(info))
    return [out[k] for k in sorted(out)]


@dataclass
class Inventory:
    """What a run's or an export's folder holds, sorted out: ``files`` are ours (to delete), ``folders``
    are ours to delete once empty, ``foreign`` are in the way (refuse). Everything else is left alone.
    Paths are relative to ``root``."""

    root: str
    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def add_foreign(self, entry: Entry) -> None:
        self.foreign.append(entry.rel + {"directory": "/", "link": " (a symlink)", "other": " (not a file)"}.get(entry.kind, ""))

    def merge(self, other: "Inventory", under: str) -> None:
        self.files += [f"{under}/{p}" for p in other.files]
        self.folders += [f"{under}/{p}" for p in other.folders] + [under]
        self.foreign += [f"{under}/{p}" for p in other.foreign]

    def shown_foreign(self, limit: int = 8) -> str:
        """The foreign entries, for a message; a folder only when nothing under it is named."""
        names = sorted(n for n in self.foreign if not (n.endswith("/") and any(o.startswith(n) and o != n for o in self.foreign)))
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

    def remove(self, fs) -> int:
        """Delete ``files``, then ``folders`` that are empty, deepest first (object stores have none).
        Returns how many files were deleted."""
        paths = [f"{self.root}/{p}" for p in self.files]
        for start in range(0, len(paths), 1000):  # one request per 1000 keys on object stores
            fs.rm(paths[start:start + 1000])
        if is_local(fs):
            for rel in sorted(set(self.folders), key=lambda p: -(p.count("/") + 1 if p else 0)):  # "" is the root itself
                try:
                    os.rmdir(f"{self.root}/{rel}" if rel else self.root)  # only ever removes an empty folder (never follows a link)
                except OSError:
                    pass
        fs.invalidate_cache(self.root)
        return len(paths)


# ------------------------------------------------------------------------------------------ runs


def run_inventory(fs, root: str, manifest: dict, everything: bool = True) -> Inventory:
    """The run folder ``root`` sorted out, for the run whose run.json is ``manifest`` (already checked
    to be bound here). Its own folders (``RUN_DATA``) must hold only its files; ``everything`` also
    takes the report's files, the exports in ``exports/`` and the review decisions of this run."""
    inv = Inventory(root)
    num_shards = (manifest.get("input") or {}).get("num_shards")
    limit = num_shards if isinstance(num_shards, int) and manifest.get("status") != "listing" else None

    def listed(match: Optional[re.Match]) -> bool:
        return match is not None and (limit is None or int(match["shard"]) < limit)

    extras = ("report", "exports", "review") if everything else ()
    for entry in listing(fs, root, recursive=False):
        if entry.name in RUN_DATA or entry.name in extras:
            if entry.kind != "directory":
                inv.add_foreign(entry)
                continue
            inv.folders.append(entry.name)
            if entry.name in RUN_DATA:
                _run_data(fs, root, entry.name, inv, listed)
            else:
                {"report": _report, "exports": _exports, "review": _review}[entry.name](fs, root, inv, manifest)
        elif RUN_RECORDS.fullmatch(entry.name) and entry.kind == "file":
            if everything or entry.name != "run.json":
                inv.files.append(entry.name)
        elif entry.kind in ("link", "other"):
            inv.add_foreign(entry)
    return inv


def _run_data(fs, root: str, folder: str, inv: Inventory, listed: Callable) -> None:
    for entry in listing(fs, f"{root}/{folder}"):
        rel, parts = f"{folder}/{entry.rel}", entry.rel.split("/")
        if folder == "_staging":
            ours = (listed(STAGED_FOLDER.fullmatch(parts[0])) and
                    (entry.kind == "directory" if len(parts) == 1 else len(parts) == 2 and entry.kind == "file"
                     and STAGED_PART.fullmatch(parts[1]) is not None))
        else:
            ours = len(parts) == 1 and entry.kind == "file" and listed(RUN_FILE_NAMES[folder].fullmatch(entry.name))
        if not ours:
            inv.add_foreign(Entry(rel, entry.kind))
        elif entry.kind == "directory":
            inv.folders.append(rel)
        else:
            inv.files.append(rel)


def _report(fs, root: str, inv: Inventory, manifest: dict) -> None:
    for entry in listing(fs, f"{root}/report", recursive=False):
        if entry.kind in ("link", "other"):
            inv.add_foreign(Entry(f"report/{entry.rel}", entry.kind))
        elif entry.name in REPORT_FILES and entry.kind == "file":
            inv.files.append(f"report/{entry.rel}")


def _exports(fs, root: str, inv: Inventory, manifest: dict) -> None:
    """RUN/exports/*: the exports bound to their folder (their recorded files); anything else stays."""
    for entry in listing(fs, f"{root}/exports", recursive=False):
        if entry.kind in ("link", "other"):
            inv.add_foreign(Entry(f"exports/{entry.rel}", entry.kind))
        elif entry.kind == "directory":
            export = export_inventory(fs, f"{root}/exports/{entry.rel}", strict=False)
            if export is not None:
                inv.merge(export, f"exports/{entry.rel}")


def decision_run_id(fs, path: str) -> tuple[bool, Optional[str]]:
    """(has a run_id column, its value) of a review decisions file; review decisions made before
    runs had ids have none. An empty file counts as having the column with no value."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as fh:
        table = pq.read_table(io.BytesIO(fh.read()))
    if "run_id" not in table.column_names:
        return False, None
    values = set(table.column("run_id").to_pylist())
    return True, values.pop() if len(values) == 1 else None


def _review(fs, root: str, inv: Inventory, manifest: dict) -> None:
    """RUN/review: the decisions ``autolabel review import`` made on this run (by run id; by name for
    a run made before runs had ids), their logs and temporary files; anything else stays."""
    run_id = manifest.get("run_id")
    ours_imports: set[str] = set()
    entries = listing(fs, f"{root}/review")
    for entry in entries:
        rel = f"review/{entry.rel}"
        if entry.kind in ("link", "other"):
            inv.add_foreign(Entry(rel, entry.kind))
        elif entry.kind == "file" and entry.name.endswith(".parquet") and IMPORT.fullmatch(entry.name[:-8]) and "/" not in entry.rel:
            has_id, value = decision_run_id(fs, f"{root}/{rel}")
            if run_id is None or (has_id and value == run_id):
                inv.files.append(rel)
                ours_imports.add(entry.name[:-8])
        elif entry.kind == "file" and "/" not in entry.rel and re.fullmatch(r"\.import-.+\.parquet\.tmp", entry.name):
            inv.files.append(rel)
        elif entry.kind == "directory" and entry.rel == "_logs":
            inv.folders.append(rel)
    for entry in entries:
        if entry.kind == "file" and entry.rel.startswith("_logs/") and entry.rel.count("/") == 1 and entry.name.endswith(".json"):
            stem = entry.name[:-5]
            if stem in ours_imports or (IMPORT.fullmatch(stem) and _log_run_id(fs, f"{root}/review/{entry.rel}", run_id)):
                inv.files.append(f"review/{entry.rel}")


def _log_run_id(fs, path: str, run_id: Optional[str]) -> bool:
    """An import log whose decisions file is gone: ours when it names this run (any, for a run without an id)."""
    if run_id is None:
        return True
    try:
        return json.loads(fs.cat_file(path)).get("run_id") == run_id
    except (OSError, ValueError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------ exports

EXPORT_MARKER = ".autolabel-export.json"
NAME = r"[A-Za-z0-9._-]{1,80}-[0-9a-f]{16}"  # export.labels.ImageLabels.name: the image's stem and its image_id
# The names each format writes (besides the marker), for an export that did not complete (its marker
# lists no files) and for exports made before markers listed them.
EXPORT_NAMES = {
    "coco": re.compile(r"instances\.json"),
    "yolo": re.compile(rf"data\.yaml|(?:images/(?:train|val)/{NAME}\.[A-Za-z0-9]{{1,5}})|(?:labels/(?:train|val)/{NAME}\.txt)"),
    "png": re.compile(rf"index\.csv|(?:instances|classes)/{NAME}\.png"),
    "cutouts": re.compile(rf"index\.csv|{NAME}/\d{{4,}}_[A-Za-z0-9._-]+\.png"),
    "labelstudio": re.compile(r"tasks\.json|labeling-config\.xml"),
    "ytvis": re.compile(r"instances\.json"),
    "mot": re.compile(rf"sequences\.json|{NAME}\.txt"),
    "labelstudio-video": re.compile(r"tasks\.json|labeling-config\.xml"),
}
EXPORT_FORMATS = tuple(EXPORT_NAMES)


def read_export_marker(fs, folder: str) -> Optional[dict]:
    """The folder's export marker, if it is one autolabel wrote (None: none, or not ours)."""
    try:
        marker = json.loads(fs.cat_file(f"{folder}/{EXPORT_MARKER}"))
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("autolabel_export") and marker.get("format") in EXPORT_FORMATS:
        return marker
    return None


def export_bound_elsewhere(fs, folder: str, marker: dict) -> Optional[str]:
    """The place a marker was written to, when that is not ``folder`` (a copied or moved marker)."""
    where = marker.get("location")
    if where is None:
        return None  # written before markers were bound: recognised by names alone
    return None if where == fs.unstrip_protocol(folder) and marker.get("export_id") else str(where)


def export_inventory(fs, folder: str, strict: bool, marker: Optional[dict] = None) -> Optional[Inventory]:
    """The export in ``folder`` (a normalised path) sorted out; None when the folder holds no export
    marker bound to it. Its files are those its marker lists (those its format's names match while
    it has none). ``strict`` (the folder is to be written again): everything else is in the way;
    otherwise it stays, and only symlinks are."""
    marker = marker or read_export_marker(fs, folder)
    if marker is None or export_bound_elsewhere(fs, folder, marker) is not None:
        return None
    recorded = set(marker["files"]) if isinstance(marker.get("files"), list) else None
    names = EXPORT_NAMES[marker["format"]]

    def ours(rel: str) -> bool:
        return rel in recorded if recorded is not None else names.fullmatch(rel) is not None

    inv = Inventory(folder)
    parents: set[str] = set()
    entries = listing(fs, folder)
    for entry in entries:
        if entry.kind == "file" and (entry.rel == EXPORT_MARKER or ours(entry.rel)):
            inv.files.append(entry.rel)
            parts = entry.rel.split("/")
            parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for entry in entries:
        if entry.rel in inv.files:
            continue
        if entry.kind == "directory" and entry.rel in parents:
            inv.folders.append(entry.rel)
        elif strict or entry.kind in ("link", "other"):
            inv.add_foreign(entry)
    return inv


__all__ = ["EXPORT_MARKER", "Inventory", "OwnershipError", "export_inventory", "location_of", "normalised_path",
           "read_export_marker", "run_inventory"]
