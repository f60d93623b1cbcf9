"""``autolabel export RUN --format coco|yolo|png|cutouts|labelstudio|ytvis|mot|labelstudio-video``: the run's masks in other tools' formats.

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
run/ownership.py for the proof asked before anything is deleted).

Objects whose mask is empty (area 0) are left out of every format (COCO, YOLO and pycocotools
cannot represent them) and counted in the result. Polygons (COCO ``--segmentation polygon`` and
YOLO) are the outer contours of the mask from ``cv2.findContours``: holes are dropped; COCO keeps
every contour, YOLO (one polygon per object) joins them with ultralytics' own
``merge_multi_segment``, as its COCO converter does.

Every format reads the run as reviewed (outputs/decisions.py): after ``autolabel review import``,
rejected objects are left out, corrected ones carry the person's mask and label and added ones are
included, both with ``source = "review"``. ``labelstudio`` writes Label Studio tasks with the masks
as brush predictions (outputs/labelstudio.py) for that review.

Video frames (images rows with ``video_uri``) are images to coco, yolo, png and cutouts; the
video formats gather them per video and track (videos.py): ``ytvis`` (YouTube-VIS, RLE per frame),
``mot`` (MOT Challenge boxes) and ``labelstudio-video`` (``videorectangle`` tracks: Label Studio has
no video masks). ``labelstudio`` leaves video frames out (Label Studio cannot open a frame inside a
video file) and says to use ``labelstudio-video``.

The parts: labels.py (the images and objects every format writes from), destination.py (the
export folder), videos.py (frames gathered per video), and one writer per format: coco.py, yolo.py,
png.py, cutouts.py, labelstudio.py, ytvis.py, mot.py, labelstudio_video.py.
"""
from __future__ import annotations

import logging
from typing import Optional

from pipeline.outputs.columns import UNLABELED
from pipeline.outputs.export.coco import CocoWriter
from pipeline.outputs.export.cutouts import CutoutWriter
from pipeline.outputs.export.destination import MARKER, Destination, remove_export
from pipeline.outputs.export.labels import (ExportError, ExportResult, count_ok_images, iter_images, mask_polygons, package_version,
                                            utc_now)
from pipeline.outputs.export.labelstudio import LabelStudioWriter, labelstudio_urls
from pipeline.outputs.export.labelstudio_video import LabelStudioVideoWriter
from pipeline.outputs.export.mot import MotWriter
from pipeline.outputs.export.png import PngWriter
from pipeline.outputs.export.yolo import YoloWriter
from pipeline.outputs.export.ytvis import YtvisWriter
from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.rundata import RunData, RunError, known_classes

log = logging.getLogger("autolabel.export")

FORMATS = ("coco", "yolo", "png", "cutouts", "labelstudio", "ytvis", "mot", "labelstudio-video")
VIDEO_FORMATS = ("ytvis", "mot", "labelstudio-video")  # video frames only, gathered per video and track


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
        "autolabel_export": 1, "format": fmt, "run": run.url(), "run_id": run.manifest.get("run_id"), "status": "writing", "started_at": utc_now(), "finished_at": None,
        "filters": filt.describe(), "autolabel": package_version(),
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
        elif fmt == "ytvis":
            writer = YtvisWriter(dest, run, categories)
        elif fmt == "mot":
            writer = MotWriter(dest, run)
        elif fmt == "labelstudio-video":
            urls = labelstudio_urls(run, image_root, image_root_url, result, uris=list(run.video_rows()))
            writer = LabelStudioVideoWriter(dest, run, classes, urls)
        else:
            urls = labelstudio_urls(run, image_root, image_root_url, result)
            writer = LabelStudioWriter(dest, run, classes, urls, every_image=not filt.active)
        result.reviewed = bool(run.review)
        total = count_ok_images(run)
        log.info("export %s: %d ok images from %s to %s (filters: %s)", fmt, total, run.url(), dest.url, filt.describe())
        _export_all(run, filt, classes, writer, fmt, total, progress, result)
        result.files = writer.close()
        if fmt in VIDEO_FORMATS:
            result.notes += writer.notes(fmt)
            if not writer.videos:
                result.notes.append(f"{fmt}: the run has no video frames to export")
        if fmt == "labelstudio" and writer.video_frames:
            result.notes.append(f"Label Studio: {writer.video_frames:,} video frames left out (Label Studio cannot open a frame "
                                "inside a video file); export the videos with --format labelstudio-video")
        if fmt in ("labelstudio", "labelstudio-video"):
            for scheme, n in sorted(writer.urls.as_is.items()):
                if scheme not in ("http", "https"):
                    result.notes.append(f"Label Studio: {n:,} tasks link their file as a {scheme}:// URI; add that bucket to the project "
                                        "as a source cloud storage (Label Studio then presigns the URIs), or pass --image-root/--image-root-url")
        if fmt == "labelstudio":
            result.images = writer.tasks
            if writer.urls.tar_members:
                result.notes.append(f"Label Studio: {writer.urls.tar_members:,} tasks show members of tar shards, which Label "
                                    "Studio cannot open; extract them and export with --image-root/--image-root-url")
        writer = None
        marker.update(status="complete", finished_at=utc_now(), images=result.images, objects=result.objects, failed_images=len(result.failed))
        dest.write_marker(marker)
    except BaseException:
        # Remove the half-written export rather than leave it looking whole; only what this export wrote.
        if writer is not None:
            writer.abort()
        dest.discard()
        raise
    return result


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
                if fmt in ("coco", "labelstudio", *VIDEO_FORMATS):  # they read no image: an error here is the export's, not one image's
                    raise
                why = f"{exc.error_class}: {exc}" if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
                log.warning("export %s: %s failed: %s", fmt, image.uri, why)
                result.failed.append((image.uri, why))
            bar.update(1)


__all__ = ["export", "ExportError", "ExportResult", "FORMATS", "VIDEO_FORMATS", "MARKER", "mask_polygons", "iter_images", "remove_export", "RunError"]
