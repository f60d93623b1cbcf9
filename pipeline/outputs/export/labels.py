"""What every export format writes from: the run's ok images one at a time, each with its objects
(filtered, as reviewed, empty masks left out) and checked against the images table; the export's
result; and the helpers the writers share.
"""
from __future__ import annotations

import datetime as dt
import io
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.outputs.columns import UNLABELED, normalize_objects
from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.rundata import RunData

FRAME_COLUMNS = ("video_uri", "frame_index", "time_s")  # run/tables.py's FRAME_COLUMNS: a video frame's images row


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
    video_uri: Optional[str] = None  # a video frame's video (its objects carry track_id); None for still images
    frame_index: Optional[int] = None  # the decoded frame's 0-based index
    time_s: Optional[float] = None

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
    frame_columns = [c for c in FRAME_COLUMNS if c in run.schema("images").names]  # runs made before videos have none
    for images_path in run.image_files:
        name = images_path.rsplit("/", 1)[-1]
        images = pq.read_table(images_path, filesystem=afs,
                               columns=["image_id", "uri", "width", "height", "status", "num_objects", *frame_columns])
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
            yield ImageLabels(row["image_id"], row["uri"], int(row["width"]), int(row["height"]), objects,
                              row.get("video_uri"), row.get("frame_index"), row.get("time_s"))


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


def close_quietly(*handles) -> None:
    """Close a failed export's open files (before they are removed); their own errors do not matter."""
    for handle in handles:
        try:
            handle.close()
        except Exception:  # noqa: BLE001
            pass


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("autolabel")
    except metadata.PackageNotFoundError:
        return None
