"""``autolabel export RUN --format coco|yolo|png|cutouts|labelstudio``: the run's masks in other tools' formats.

Exports stream image by image: the sink writes ``images/shard-X.parquet`` and
``objects/shard-X.parquet`` side by side, one image's objects in one part, so each images part is
read with its objects part (one shard at a time) and memory stays bounded however large the run. Each image's object count is checked against its ``num_objects`` before anything is
written for it, so a damaged run fails loudly instead of exporting with holes. Source and
destination are any fsspec URLs.

An export writes only into a new or empty folder, or replaces an earlier export (``--overwrite``),
which it recognises by the marker ``.autolabel-export.json`` it writes first (format, run, times,
status, and its binding: the folder's normalised URI and an export id; once complete, the list of
files it wrote), and only if the folder holds nothing else; never the run folder or a folder that
holds it. A failed export removes what it wrote and the folders it created, nothing else (see
ownership.py for the proof asked before anything is deleted).

Objects whose mask is empty (area 0) are left out of every format (COCO, YOLO and pycocotools
cannot represent them) and counted in the result. Polygons (COCO ``--segmentation polygon`` and
YOLO) are the outer contours of the mask from ``cv2.findContours``: holes are dropped; COCO keeps
every contour, YOLO (one polygon per object) joins them with ultralytics' own
``merge_multi_segment``, as its COCO converter does.

Every format reads the run as reviewed (pipeline/review.py): after ``autolabel review import``,
rejected objects are left out, corrected ones carry the person's mask and label and added ones are
included, both with ``source = "review"``. ``labelstudio`` writes Label Studio tasks with the masks
as brush predictions (pipeline/labelstudio.py) for that review.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.sam import masks as mask_codec
from pipeline.outputs import labelstudio as ls
from pipeline.io.credentials import redact
from pipeline.outputs.colors import class_color
from pipeline.outputs.columns import UNLABELED, normalize_objects
from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.rundata import RunData, RunError, known_classes, read_image, read_rgb
from pipeline.run.ownership import EXPORT_MARKER, export_bound_elsewhere, export_inventory, normalised_path, read_export_marker

log = logging.getLogger("autolabel.export")

FORMATS = ("coco", "yolo", "png", "cutouts", "labelstudio")
# Image suffixes ultralytics' loader accepts; anything else is re-encoded as PNG for YOLO.
YOLO_IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm"}
EXIF_ORIENTATION = 0x0112


class ExportError(ValueError):
    """The export cannot be done as asked (bad option, destination in use, damaged run)."""


@dataclass
class ExportResult:
    format: str
    out: str
    images: int = 0
    objects: int = 0
    skipped_empty: int = 0
    filtered_out: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason): images that could not be exported
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what to know to use the export (e.g. Label Studio's set-up)
    reviewed: bool = False  # the run had review decisions, and the export holds the reviewed objects

    def summary(self) -> str:
        lines = [
            f"autolabel export {self.format}: {self.images:,} images, {self.objects:,} objects -> {self.out}",
        ]
        if self.filtered_out:
            lines.append(f"  {self.filtered_out:,} objects left out by the filters")
        if self.skipped_empty:
            lines.append(f"  {self.skipped_empty:,} objects with an empty mask left out")
        if self.reviewed:
            lines.append("  with the review decisions imported into the run (autolabel review import)")
        lines += [f"  {note}" for note in self.notes]
        if self.failed:
            lines.append(f"  {len(self.failed):,} images FAILED (not exported):")
            lines += [f"    {uri}: {why}" for uri, why in self.failed[:20]]
            if len(self.failed) > 20:
                lines.append(f"    ... {len(self.failed) - 20} more")
            lines.append("  if the images need credentials or an endpoint (the run's input.storage_options), pass them with "
                         "--image-storage-option key=value (repeatable)")
        return "\n".join(lines)


@dataclass
class ImageLabels:
    """One ok image with its (filtered, non-empty) objects in object_id order."""

    image_id: str
    uri: str
    width: int
    height: int
    objects: list[dict]

    @property
    def name(self) -> str:
        """A readable, unique file stem: the image's own stem plus its image_id."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(self.uri.rstrip("/").rsplit("/", 1)[-1])[0])[:80] or "image"
        return f"{stem}-{self.image_id}"

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.uri.rsplit("/", 1)[-1])[1].lower()


def iter_images(run: RunData, filt: ObjectFilter, result: ExportResult, unlabeled_id: Optional[int] = None) -> Iterator[ImageLabels]:
    """Every ok image of the run, part by part, with its objects; checks counts against the images table.

    Objects without a class get ``unlabeled_id`` (named ``(unlabeled)``) so every format can hold them.
    """
    afs = run.arrow_fs()
    objects_by_name = {p.rsplit("/", 1)[-1]: p for p in run.object_files}
    expr = filt.expression()
    counted = run.counted_expression()
    shown = run.counted_expression(filt.include_duplicates)
    review = run.review
    for images_path in run.image_files:
        name = images_path.rsplit("/", 1)[-1]
        images = pq.read_table(images_path, filesystem=afs, columns=["image_id", "uri", "width", "height", "status", "num_objects"])
        images = images.filter(pc.field("status") == "ok")
        if not images.num_rows:
            continue
        objects_path = objects_by_name.get(name)
        if objects_path is None:
            if pc.sum(images.column("num_objects")).as_py():
                raise ExportError(f"{run.url('images', name)} lists objects but objects/{name} is missing: the run is damaged")
            grouped, found = {}, {}
        else:
            table = normalize_objects(pq.read_table(objects_path, filesystem=afs))
            # invalid-prompt rows, extra SAM candidates and duplicates are not objects (num_objects counts none of them)
            counted_rows = table if counted is None else table.filter(counted)
            found = {r["values"]: r["counts"] for r in pc.value_counts(counted_rows.column("image_id")).to_pylist()}
            table = review.apply(table, shown, filt.include_duplicates) if review else (table if shown is None else table.filter(shown))
            if expr is not None:
                kept = table.filter(expr)
                result.filtered_out += table.num_rows - kept.num_rows
                table = kept
            grouped = {}
            for row in table.sort_by([("image_id", "ascending"), ("object_id", "ascending")]).to_pylist():
                grouped.setdefault(row["image_id"], []).append(row)
        for row in images.to_pylist():
            expected, got = row["num_objects"] or 0, found.get(row["image_id"], 0)
            if expected != got:
                raise ExportError(f"{row['uri']}: images table says {expected} objects, objects/{name} has {got}: the run is damaged")
            objects = []
            for obj in grouped.get(row["image_id"], []):
                if obj["class_id"] is None:
                    obj["class_id"], obj["class_name"] = unlabeled_id, UNLABELED
                if not obj["area"] or obj["mask"] is None:
                    result.skipped_empty += 1
                else:
                    objects.append(obj)
            yield ImageLabels(row["image_id"], row["uri"], int(row["width"]), int(row["height"]), objects)


def count_ok_images(run: RunData) -> int:
    return run.dataset("images").count_rows(filter=pc.field("status") == "ok")


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours of a binary mask as (k, 2) float arrays of x, y pixel coordinates (k >= 3)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = contour.reshape(-1, 2).astype(np.float64)
        if len(points) < 3:  # a dot or a straight line of pixels has no area between pixel centres: take its pixel rectangle
            (x0, y0), (x1, y1) = points.min(0), points.max(0) + 1
            points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
        polygons.append(points)
    return polygons


def _score(value) -> Optional[float]:
    """A score as written to the exports; null stays null (manifest objects have no detector score)."""
    return None if value is None else round(float(value), 6)


def _score_cell(value) -> str:
    """A score as a CSV cell: empty when null."""
    return "" if value is None else f"{value:.6f}"


def _local_name(uri: str) -> str:
    """COCO ``file_name``: a plain path for local files (joins with an image root), else the URI."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


MARKER = EXPORT_MARKER  # written first into every export folder: its record (see ownership.py)


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


def _close_quietly(*handles) -> None:
    """Close a failed export's open files (before they are removed); their own errors do not matter."""
    for handle in handles:
        try:
            handle.close()
        except Exception:  # noqa: BLE001
            pass


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ formats


class CocoWriter:
    """COCO instances JSON, streamed: images go straight out, annotations via a local temp file."""

    def __init__(self, dest: Destination, run: RunData, categories: dict[int, str], segmentation: str):
        self.dest, self.segmentation = dest, segmentation
        self.out = dest.open("instances.json", "w")
        self.tmp = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.image_id = self.annotation_id = 0
        info = {
            "description": f"autolabel export of {run.url()}",
            "date_created": _now(),
            "version": str((run.manifest.get("versions") or {}).get("autolabel")),
            "random_weights": bool(run.manifest.get("random_weights")),
        }
        cats = [{"id": cid + 1, "name": name, "supercategory": "object", "class_id": cid} for cid, name in sorted(categories.items())]
        self.out.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ' + json.dumps(cats) + ', "images": [')

    def add(self, image: ImageLabels) -> int:
        self.image_id += 1
        entry = {"id": self.image_id, "file_name": _local_name(image.uri), "width": image.width, "height": image.height,
                 "uri": image.uri, "autolabel_image_id": image.image_id}
        self.out.write(("" if self.image_id == 1 else ", ") + json.dumps(entry))
        written = 0
        for obj in image.objects:
            if self.segmentation == "polygon":
                polys = mask_polygons(mask_codec.decode(obj["mask"]))
                segmentation = [[round(float(v), 2) for v in p.reshape(-1)] for p in polys]
            else:
                segmentation = {"size": [int(s) for s in obj["mask"]["size"]], "counts": obj["mask"]["counts"]}
            self.annotation_id += 1
            ann = {
                "id": self.annotation_id, "image_id": self.image_id, "category_id": int(obj["class_id"]) + 1,
                "segmentation": segmentation, "area": int(obj["area"]), "bbox": mask_codec.bbox_xywh(obj["mask"]), "iscrowd": 0,
                "score": _score(obj["det_score"]), "mask_score": _score(obj["mask_score"]),
                "object_id": int(obj["object_id"]),
                "det_box": [round(float(v), 2) for v in (obj["box"][0], obj["box"][1], obj["box"][2] - obj["box"][0], obj["box"][3] - obj["box"][1])],
                "source": obj.get("source"),
            }
            for key in ("flags", "review"):  # QA reasons (runs that recorded them); review decision (after an import)
                if obj.get(key) is not None:
                    ann[key] = obj[key]
            self.tmp.write(("" if self.annotation_id == 1 else ", ") + json.dumps(ann))
            written += 1
        return written

    def abort(self) -> None:
        _close_quietly(self.out, self.tmp)

    def close(self) -> list[str]:
        self.out.write('], "annotations": [')
        self.tmp.seek(0)
        shutil.copyfileobj(self.tmp, self.out, 1 << 20)
        self.out.write("]}\n")
        self.out.close()
        self.tmp.close()
        return [self.dest.full("instances.json")]


class YoloWriter:
    """YOLO-seg: images/{train,val}/NAME.ext, labels/{train,val}/NAME.txt, data.yaml."""

    def __init__(self, dest: Destination, categories: dict[int, str], val_fraction: float, image_storage_options: Optional[dict] = None):
        from ultralytics.data.converter import merge_multi_segment  # YOLO's own joining of multi-part masks

        self.merge = merge_multi_segment
        self.dest, self.categories, self.val_fraction = dest, categories, val_fraction
        self.image_storage_options = image_storage_options
        self.splits: set[str] = set()

    def split_of(self, image_id: str) -> str:
        """Repeatable split from the image id (the same image always lands in the same split)."""
        return "val" if int(image_id[:8], 16) / 2**32 < self.val_fraction else "train"

    def _image_bytes(self, image: ImageLabels) -> tuple[bytes, str]:
        """The original file's bytes, unless its EXIF rotates it or YOLO cannot read its format: then a PNG of the pixels."""
        from pipeline.io.decode import open_image

        data = read_image(image.uri, self.image_storage_options)
        with open_image(data) as img:
            size = img.size
            rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
        if not rotated and image.suffix in YOLO_IMAGE_SUFFIXES and size == (image.width, image.height):
            return data, image.suffix
        rgb = read_rgb(image.uri, self.image_storage_options)
        if rgb.shape[:2] != (image.height, image.width):
            raise ExportError(f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run labeled it at {image.width}x{image.height}")
        return _png(rgb), ".png"

    def add(self, image: ImageLabels) -> int:
        data, suffix = self._image_bytes(image)
        split = self.split_of(image.image_id)
        self.splits.add(split)
        lines = []
        for obj in image.objects:
            polys = mask_polygons(mask_codec.decode(obj["mask"]))
            if len(polys) > 1:
                poly = np.concatenate(self.merge([p.reshape(-1).tolist() for p in polys]), axis=0)
            else:
                poly = polys[0]
            norm = np.clip(poly / np.array([image.width, image.height], np.float64), 0.0, 1.0)
            lines.append(f"{int(obj['class_id'])} " + " ".join(f"{v:.6f}" for v in norm.reshape(-1)))
        self.dest.write(f"images/{split}/{image.name}{suffix}", data)
        self.dest.write(f"labels/{split}/{image.name}.txt", ("\n".join(lines) + "\n" if lines else "").encode())
        return len(lines)

    def abort(self) -> None:
        pass

    def close(self) -> list[str]:
        import yaml

        n = max(self.categories) + 1 if self.categories else 0
        names = {i: self.categories.get(i, f"class_{i}") for i in range(n)}
        val = "images/val" if "val" in self.splits else "images/train"
        root = self.dest.path if self.dest.url.startswith("file://") else self.dest.url
        text = "# written by autolabel export --format yolo; class ids are the detector's\n" + yaml.safe_dump(
            {"path": root, "train": "images/train", "val": val, "names": names}, sort_keys=False
        )
        return [self.dest.write("data.yaml", text.encode())]


class PngWriter:
    """instances/NAME.png (uint16: object_id + 1, 0 = background) and optionally classes/NAME.png."""

    def __init__(self, dest: Destination, categories: dict[int, str], class_png: bool):
        self.dest, self.class_png = dest, class_png
        self.class_dtype = np.uint8 if (max(categories, default=0) + 1) <= 255 else np.uint16
        self.index = dest.open("index.csv", "w", newline="")
        self.csv = csv.writer(self.index)
        self.csv.writerow(["image_id", "uri", "instances_png", "classes_png", "objects"])

    def add(self, image: ImageLabels) -> int:
        instances = np.zeros((image.height, image.width), np.uint16)
        classes = np.zeros((image.height, image.width), self.class_dtype) if self.class_png else None
        # Overlaps: the best-scoring object (lowest object_id) is painted last and wins.
        for obj in sorted(image.objects, key=lambda o: -o["object_id"]):
            mask = mask_codec.decode(obj["mask"])
            instances[mask] = int(obj["object_id"]) + 1
            if classes is not None:
                classes[mask] = int(obj["class_id"]) + 1
        inst_rel = f"instances/{image.name}.png"
        self.dest.write(inst_rel, _png(instances))
        cls_rel = ""
        if classes is not None:
            cls_rel = f"classes/{image.name}.png"
            self.dest.write(cls_rel, _png(classes))
        self.csv.writerow([image.image_id, image.uri, inst_rel, cls_rel, len(image.objects)])
        return len(image.objects)

    def abort(self) -> None:
        _close_quietly(self.index)

    def close(self) -> list[str]:
        self.index.close()
        return [self.dest.full("index.csv")]


class CutoutWriter:
    """NAME/OBJECTID_CLASS.png: RGBA crop of each object's mask bounding box, alpha = the mask."""

    def __init__(self, dest: Destination, image_storage_options: Optional[dict] = None):
        self.dest, self.image_storage_options = dest, image_storage_options
        self.index = dest.open("index.csv", "w", newline="")
        self.csv = csv.writer(self.index)
        self.csv.writerow(["image_id", "uri", "object_id", "class_id", "class_name", "det_score", "mask_score", "area", "path", "source", "review"])

    def add(self, image: ImageLabels) -> int:
        if not image.objects:
            return 0
        rgb = read_rgb(image.uri, self.image_storage_options)
        if rgb.shape[:2] != (image.height, image.width):
            raise ExportError(f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run labeled it at {image.width}x{image.height}")
        for obj in image.objects:
            mask = mask_codec.decode(obj["mask"])
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            rgba = np.dstack([rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.uint8) * 255])
            safe_class = re.sub(r"[^A-Za-z0-9._-]+", "_", str(obj["class_name"]))
            rel = f"{image.name}/{int(obj['object_id']):04d}_{safe_class}.png"
            self.dest.write(rel, _png(rgba))
            self.csv.writerow([image.image_id, image.uri, obj["object_id"], obj["class_id"], obj["class_name"],
                               _score_cell(obj["det_score"]), _score_cell(obj["mask_score"]), obj["area"], rel,
                               obj.get("source") or "", obj.get("review") or ""])
        return len(image.objects)

    def abort(self) -> None:
        _close_quietly(self.index)

    def close(self) -> list[str]:
        self.index.close()
        return [self.dest.full("index.csv")]


class LabelStudioWriter:
    """Label Studio: ``tasks.json`` (one task per image, the masks as ``brushlabels`` predictions) and
    ``labeling-config.xml`` (the project's labeling config: every class of the run as a brush label)."""

    def __init__(self, dest: Destination, run: RunData, classes: dict[int, str], urls: ls.ImageUrls, every_image: bool):
        import uuid

        self.dest, self.run, self.urls, self.every_image = dest, run, urls, every_image
        self.export_id = f"{_now()}-{uuid.uuid4().hex[:8]}"
        self.fingerprint = (run.manifest.get("fingerprint") or {}).get("sha256")  # which run: review import checks it
        models = run.manifest.get("models") or {}
        self.model_version = " ".join(filter(None, [
            f"autolabel {(run.manifest.get('versions') or {}).get('autolabel') or _version() or ''}".strip(),
            f"SAM 2.1 {(models.get('sam') or {}).get('size')}" if (models.get("sam") or {}).get("size") else None,
            "(random weights)" if run.manifest.get("random_weights") else None,
        ]))
        names = list(dict.fromkeys(name for _, name in sorted(classes.items())))
        colors = {name: "#" + "".join(f"{int(round(c * 255)):02x}" for c in class_color(None if name == UNLABELED else cid))
                  for cid, name in classes.items()}
        self.config = ls.labeling_config(names, colors)
        self.out = dest.open("tasks.json", "w")
        self.out.write("[")
        self.tasks = 0

    def skips(self, image: ImageLabels) -> bool:
        """With a filter, images left without objects make no task (nothing to review); without, every image
        does (a person may draw what the model missed)."""
        return not image.objects and not self.every_image

    def add(self, image: ImageLabels) -> int:
        try:
            url = self.urls(image.uri)
        except ls.LabelStudioError as exc:
            raise ExportError(str(exc)) from None
        results = [ls.brush_result(obj["object_id"], mask_codec.decode(obj["mask"]), obj["class_name"], obj["mask_score"])
                   for obj in image.objects]
        note, reasons = ls.note_of(image.objects)
        task = {"data": {
            "image": url, ls.NOTE_KEY: note, ls.FLAGS_KEY: reasons,
            ls.DATA_KEY: {"format": ls.TASK_FORMAT_VERSION, "run": self.run.url(), "run_fingerprint": self.fingerprint, "export_id": self.export_id,
                          "image_id": image.image_id, "uri": image.uri, "width": image.width, "height": image.height,
                          "objects": {ls.result_id(o["object_id"]): int(o["object_id"]) for o in image.objects}},
        }, "predictions": []}
        if results:
            scores = [o["mask_score"] for o in image.objects if o["mask_score"] is not None]
            prediction = {"model_version": self.model_version, "result": results}
            if scores:
                prediction["score"] = round(float(min(scores)), 6)  # the least sure mask: sorting by it puts doubtful images first
            task["predictions"].append(prediction)
        self.out.write(("\n" if self.tasks == 0 else ",\n") + json.dumps(task, separators=(",", ":")))
        self.tasks += 1
        return len(results)

    def abort(self) -> None:
        _close_quietly(self.out)

    def close(self) -> list[str]:
        self.out.write("\n]\n")
        self.out.close()
        return [self.dest.full("tasks.json"), self.dest.write("labeling-config.xml", self.config.encode())]


def _labelstudio_urls(run: RunData, image_root: Optional[str], image_root_url: Optional[str], result: ExportResult) -> ls.ImageUrls:
    """How tasks point at the images (``ls.ImageUrls``); the default root is the folder holding every local image."""
    root = image_root
    if root is None:
        uris = run.dataset("images").to_table(columns=["uri"], filter=pc.field("status") == "ok").column("uri").to_pylist()
        root = ls.common_folder(uris)
    urls = ls.ImageUrls(root, image_root_url)
    if image_root_url is not None:
        result.notes.append(f"Label Studio: images under {root} are linked as {image_root_url}...")
    elif root is not None:
        result.notes.append(
            f"Label Studio: local images are linked as {ls.LOCAL_FILES_URL}<path under {root}>; start Label Studio with "
            f"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root} and add a "
            f"'Local files' source storage with the absolute path {root} to the project (no need to sync it)")
    result.notes.append("Label Studio: create the project with labeling-config.xml as its labeling interface, then import tasks.json")
    return urls


# ------------------------------------------------------------------------------------ driver


def export(
    run_uri: str,
    fmt: str,
    out_uri: Optional[str] = None,
    filt: Optional[ObjectFilter] = None,
    overwrite: bool = False,
    segmentation: str = "rle",
    class_png: bool = False,
    val_fraction: float = 0.0,
    progress: bool = True,
    storage_options: Optional[dict] = None,
    image_storage_options: Optional[dict] = None,
    image_root: Optional[str] = None,
    image_root_url: Optional[str] = None,
) -> ExportResult:
    """Export a run; raises RunError/ExportError/FilterError for what the user must fix.

    ``image_root``/``image_root_url`` (labelstudio): how tasks point at the images (``labelstudio.ImageUrls``).

    ``storage_options``: fsspec options of the run folder and of ``out_uri``; ``image_storage_options``:
    those of the images, which yolo and cutouts re-read (the run's ``input.storage_options``).
    ``overwrite`` replaces an earlier export (recognised by its marker file), never anything else."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if segmentation not in ("rle", "polygon"):
        raise ExportError(f"--segmentation {segmentation}: choose rle or polygon")
    if not 0.0 <= val_fraction < 1.0:
        raise ExportError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    filt = filt or ObjectFilter()
    run = RunData(run_uri, storage_options)
    classes = known_classes(run)
    filt.check_classes(classes)
    categories = {cid: name for cid, name in classes.items() if filt.keeps_class(cid, name)}
    dest = Destination(out_uri or run.url("exports", fmt), overwrite, storage_options, fmt, run)
    result = ExportResult(format=fmt, out=dest.url)
    marker = {
        "autolabel_export": 1, "format": fmt, "run": run.url(), "run_id": run.manifest.get("run_id"), "status": "writing", "started_at": _now(), "finished_at": None,
        "filters": filt.describe(), "autolabel": _version(),
    }
    writer = None
    try:
        dest.write_marker(marker)  # first, so even a killed export leaves a folder --overwrite can recognise
        if fmt == "coco":
            writer = CocoWriter(dest, run, categories, segmentation)
        elif fmt == "yolo":
            writer = YoloWriter(dest, classes, val_fraction, image_storage_options)
        elif fmt == "png":
            writer = PngWriter(dest, classes, class_png)
        elif fmt == "cutouts":
            writer = CutoutWriter(dest, image_storage_options)
        else:
            urls = _labelstudio_urls(run, image_root, image_root_url, result)
            writer = LabelStudioWriter(dest, run, classes, urls, every_image=not filt.active)
        result.reviewed = bool(run.review)
        total = count_ok_images(run)
        log.info("export %s: %d ok images from %s to %s (filters: %s)", fmt, total, run.url(), dest.url, filt.describe())
        _export_all(run, filt, classes, writer, fmt, total, progress, result)
        result.files = writer.close()
        if fmt == "labelstudio":
            result.images = writer.tasks
            for scheme, n in sorted(writer.urls.as_is.items()):
                if scheme not in ("http", "https"):
                    result.notes.append(f"Label Studio: {n:,} tasks link their image as a {scheme}:// URI; add that bucket to the project "
                                        "as a source cloud storage (Label Studio then presigns the URIs), or pass --image-root/--image-root-url")
            if writer.urls.tar_members:
                result.notes.append(f"Label Studio: {writer.urls.tar_members:,} tasks show members of tar shards, which Label "
                                    "Studio cannot open; extract them and export with --image-root/--image-root-url")
        writer = None
        marker.update(status="complete", finished_at=_now(), images=result.images, objects=result.objects, failed_images=len(result.failed))
        dest.write_marker(marker)
    except BaseException:
        # Remove the half-written export rather than leave it looking whole; only what this export wrote.
        if writer is not None:
            writer.abort()
        dest.discard()
        raise
    return result


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("autolabel")
    except metadata.PackageNotFoundError:
        return None


def _export_all(run: RunData, filt: ObjectFilter, classes: dict[int, str], writer, fmt: str, total: int, progress: bool,
                result: ExportResult) -> None:
    from tqdm import tqdm

    from pipeline.errors import ImageError

    with tqdm(total=total, unit="img", desc=f"export {fmt}", mininterval=1.0, disable=not progress) as bar:
        unlabeled_id = next((cid for cid, name in classes.items() if name == UNLABELED), None)
        skips = getattr(writer, "skips", None)
        for image in iter_images(run, filt, result, unlabeled_id):
            if skips is not None and skips(image):
                bar.update(1)
                continue
            try:
                result.objects += writer.add(image)
                result.images += 1
            except (OSError, ImageError, ExportError) as exc:  # a source image gone, unreadable or changed: record it, go on
                if fmt in ("coco", "labelstudio"):  # they read no image: an error here is the export's, not one image's
                    raise
                why = f"{exc.error_class}: {exc}" if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
                log.warning("export %s: %s failed: %s", fmt, image.uri, why)
                result.failed.append((image.uri, why))
            bar.update(1)


__all__ = ["export", "ExportError", "ExportResult", "FORMATS", "MARKER", "mask_polygons", "iter_images", "remove_export", "RunError"]
