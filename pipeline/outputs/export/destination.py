"""Where an export goes: a folder of its own on any fsspec filesystem, new or empty, or holding only
an earlier export bound to it (replaced with ``--overwrite``), never the run folder or one around
it; and removing an export (or a failed one's files) without touching anything else.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Optional

from fsspec.core import url_to_fs

from pipeline.io.credentials import redact
from pipeline.outputs.export.labels import ExportError
from pipeline.outputs.rundata import RunData
from pipeline.run.ownership import EXPORT_MARKER, export_bound_elsewhere, export_inventory, normalised_path, read_export_marker

log = logging.getLogger("autolabel.export")

MARKER = EXPORT_MARKER  # written first into every export folder: its record (see run/ownership.py)


def remove_export(fs, path: str) -> bool:
    """Remove the export in folder ``path``: the files its marker records (or, for an export that did
    not complete, the names its format writes), the marker, then the folders left empty, the export
    folder too. Anything else there stays. False (nothing removed) when the folder holds no export
    marker bound to it. ``autolabel run --overwrite`` removes RUN/exports/* this way."""
    path = normalised_path(fs, path)
    inventory = export_inventory(fs, path, strict=False)
    if inventory is None:
        return False
    if inventory.foreign:
        raise ExportError(f"{fs.unstrip_protocol(path)} holds {inventory.shown_foreign()}: symlinks are never followed; not removed")
    inventory.folders.append("")
    inventory.remove(fs)
    return True


def _listed(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Destination:
    """An export folder on any fsspec filesystem.

    An export writes only into a new or empty folder, or over an earlier export (with ``overwrite``),
    which it recognises by the marker file ``.autolabel-export.json`` it writes first, and only if
    the folder holds nothing but that export. It never writes into the run folder itself or a folder
    that contains the run. ``discard()`` removes what this export wrote, and nothing else."""

    def __init__(self, uri: str, overwrite: bool, storage_options: Optional[dict] = None, fmt: str = "",
                 run: Optional[RunData] = None):
        self.fmt = fmt
        self.storage_options = storage_options or {}
        try:
            self.fs, path = url_to_fs(uri, **self.storage_options)
        except Exception as exc:  # noqa: BLE001 - unknown protocol, options the filesystem does not take
            raise ExportError(redact(f"--out {uri}: cannot open ({type(exc).__name__}: {exc})", self.storage_options)) from None
        try:
            self.path = normalised_path(self.fs, path)  # `..`, `.`, trailing `/`: one folder, one spelling
        except ValueError as exc:
            raise ExportError(f"--out {uri}: {exc}") from None
        self.url = self.fs.unstrip_protocol(self.path)
        self.export_id = uuid.uuid4().hex  # with ``url``, binds the marker to this folder
        if run is not None:
            self._refuse_run_folder(run)
        self.created: list[str] = []  # folders this export made, outermost first
        self.written: set[str] = set()  # files this export wrote (relative): its record, and what discard() removes
        try:
            earlier = self._inspect(overwrite)
            if earlier is not None:
                marker, inventory = earlier
                log.info("export: replacing the earlier %s export in %s (--overwrite): %d files", marker.get("format"),
                         self.url, len(inventory.files))
                inventory.remove(self.fs)
            elif not self.fs.exists(self.path):
                self._note_created()
            self.fs.makedirs(self.path, exist_ok=True)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - storage errors (permissions, credentials) are the user's to fix
            raise ExportError(redact(f"{self.url}: cannot be used as the export folder ({type(exc).__name__}: {exc})",
                                     self.storage_options)) from None
        self._made: set[str] = {self.path}

    # ---------------------------------------------------------------- checks before anything is written

    def _refuse_run_folder(self, run: RunData) -> None:
        """DEST must not be RUN or a folder that holds it (an export there could replace or remove the run)."""
        same = set(_protocols(self.fs)) & set(_protocols(run.fs))
        if not same:
            return
        dest, root = self.path, run.root
        if _protocols(self.fs)[0] in ("file", "local"):
            dest, root = os.path.realpath(dest), os.path.realpath(root)
        dest = dest.rstrip("/")
        if root == dest or root.startswith(dest + "/") or not dest:
            what = "is the run folder itself" if root == dest else f"contains the run folder {run.url()}"
            raise ExportError(
                f"--out {self.url} {what}: an export may only write into a folder of its own, never over or around "
                f"the run; leave --out out (default {run.url('exports', self.fmt or 'FORMAT')}) or choose a new folder"
            )

    def _inspect(self, overwrite: bool):
        """None for a new or empty folder; (marker, inventory) of the earlier export for a folder that
        holds only an earlier export bound to it and ``overwrite`` is set; otherwise ExportError
        (nothing is touched), naming what is in the way."""
        if not self.fs.exists(self.path):
            return None
        if not self.fs.isdir(self.path):
            raise ExportError(f"--out {self.url} is a file, not a folder; choose a folder (new or empty)")
        entries = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._children())
        if not entries:
            return None
        marker = read_export_marker(self.fs, self.path) if MARKER in entries else None
        if marker is None:
            raise ExportError(
                f"--out {self.url} is not empty and is not an earlier autolabel export (it has no {MARKER}); it holds "
                f"{_listed(entries)}. An export writes only into a new or empty folder, or replaces an earlier "
                "export with --overwrite, so nothing there was touched; choose another --out (a new folder)"
            )
        elsewhere = export_bound_elsewhere(self.fs, self.path, marker)
        if elsewhere is not None:
            raise ExportError(
                f"--out {self.url} holds a {MARKER} written for {elsewhere}, not for this folder: it was copied or moved "
                "here, so nothing in the folder is known to be an autolabel export, and nothing there was touched; "
                "choose another --out (a new folder), or remove the folder yourself"
            )
        fmt = marker.get("format")
        inventory = export_inventory(self.fs, self.path, strict=True, marker=marker)
        made = f"an autolabel {fmt} export of {marker.get('run')} (started {marker.get('started_at')})"
        if inventory.foreign:
            raise ExportError(
                f"--out {self.url} holds {made} but also {inventory.shown_foreign()}, which are not part of it (the "
                "export's marker lists its files; symlinks are never followed); --overwrite only replaces a folder that "
                "holds nothing but an export, so nothing there was touched: move those away or choose another --out"
            )
        if not overwrite:
            raise ExportError(f"--out {self.url} already holds {made}; pass --overwrite to replace it, or choose another --out")
        return marker, inventory

    def _children(self) -> list[dict]:
        """``ls`` of the folder without the folder itself (object stores may list a folder marker)."""
        self.fs.invalidate_cache(self.path)
        return [e for e in self.fs.ls(self.path, detail=True) if e["name"].rstrip("/") not in (self.path, "")]

    def _note_created(self) -> None:
        """Record the folders makedirs is about to create (this one and missing parents), outermost first."""
        path, missing = self.path, []
        while path and path != "/" and not self.fs.exists(path):
            missing.append(path)
            path = path.rsplit("/", 1)[0] if "/" in path else ""
        self.created = missing[::-1]

    # ---------------------------------------------------------------- writing

    def full(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def _parent(self, rel: str) -> None:
        parent = self.full(rel).rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.makedirs(parent, exist_ok=True)
            self._made.add(parent)

    def write(self, rel: str, data: bytes) -> str:
        self._parent(rel)
        self.written.add(rel)
        self.fs.pipe_file(self.full(rel), data)
        return self.full(rel)

    def open(self, rel: str, mode: str = "w", **kwargs):
        self._parent(rel)
        self.written.add(rel)
        return self.fs.open(self.full(rel), mode, **kwargs)

    def write_marker(self, marker: dict) -> None:
        """The export's record: bound to this folder (``location``, ``export_id``); once complete it
        lists every file the export wrote (``files``), which is what --overwrite may remove."""
        marker = {**marker, "export_id": self.export_id, "location": self.url}
        if marker.get("status") == "complete":
            marker["files"] = sorted(self.written)
        self.fs.pipe_file(self.full(MARKER), (json.dumps(marker, indent=2) + "\n").encode())

    # ---------------------------------------------------------------- removing

    def discard(self) -> None:
        """After a failed export: remove what this export wrote (the files it recorded and the marker;
        the folder was new, empty, or held only the earlier export this one replaced), then the folders
        it created, if empty. Anything else in the folder is left alone."""
        from pipeline.run.ownership import Inventory, is_local

        try:
            inventory = Inventory(self.path, [rel for rel in sorted(self.written | {MARKER}) if self.fs.exists(self.full(rel))])
            inventory.folders = sorted({"/".join(rel.split("/")[:i]) for rel in self.written for i in range(1, rel.count("/") + 1)})
            inventory.remove(self.fs)
            for folder in reversed(self.created):
                if is_local(self.fs) and self.fs.exists(folder) and not self.fs.ls(folder):
                    self.fs.rmdir(folder)
        except Exception as exc:  # noqa: BLE001 - the export's own error is the one to report
            log.warning("export: could not remove the unfinished export in %s (%s)", self.url,
                        redact(f"{type(exc).__name__}: {exc}", self.storage_options))


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
