"""Track stage: a Ray actor holding SAM 2's video predictor (and, for detector-driven tracking, the
detector); one video in -> its frames' images and objects rows, its ``videos`` row and its
``tracks`` rows out.

Two modes per video (issue 19):

- **prompted**: the manifest line's objects, each with ``"frame": N`` (the 0-based decoded frame
  it is drawn on), are added on that frame and propagated (``VideoTracker.track``, backwards too
  with ``video.reverse``);
- **detector-driven** (no prompts): the detector runs on every ``video.detect_every``-th kept
  frame and ``KeyframeTracker`` matches its boxes to the live tracks.

Every kept frame becomes an images row (``VIDEO#frame=N``), every non-empty mask an objects row
with its ``track_id``. A video that cannot be read becomes a ``videos`` row with its
``error_class``; frames tracked before a late error (a truncated file) are kept.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline.io.listing import image_id_for
from pipeline.io.video import VideoError, iter_frames, kept_count, probe
from pipeline.sam import masks as rle
from pipeline.sam.prompts import PromptError, from_manifest
from pipeline.sam.tracks import Detection, KeyframeTracker
from pipeline.sam.video import FrameSource, ObjectPrompt, VideoTracker

log = logging.getLogger(__name__)

# detect(rgb HxWx3 uint8) -> [Detection]: the detector on one keyframe
DetectFn = Callable[[np.ndarray], list]


def frame_uri(video_uri: str, frame_index: int) -> str:
    return f"{video_uri}#frame={frame_index}"


@dataclass
class VideoRows:
    """One video's rows, in the output tables' columns (run/tables.py)."""
    images: list = field(default_factory=list)
    objects: list = field(default_factory=list)
    video: dict = field(default_factory=dict)
    tracks: list = field(default_factory=list)


def video_prompts(objects_json: Optional[str], base_uri: Optional[str], class_ids: dict[str, int], storage_options=None,
                  roots=None) -> list[tuple[int, object, Optional[str]]]:
    """A manifest line's objects -> (decoded frame, pipeline Prompt, error); ``frame`` defaults to 0."""
    out = []
    for obj in json.loads(objects_json) if objects_json else []:
        fields = dict(obj) if isinstance(obj, dict) else obj
        frame = fields.pop("frame", 0) if isinstance(fields, dict) else 0
        try:
            if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
                raise PromptError(f"frame must be a 0-based frame number, got {frame!r}")
            out.append((frame, from_manifest(fields, base_uri, class_ids, storage_options, roots), None))
        except PromptError as exc:
            out.append((frame, fields if isinstance(fields, dict) else {}, str(exc)))
    return out


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class _Keyframes:
    """The original RGB of keyframes, by a second forward-only decode (the detector needs full frames)."""

    def __init__(self, frames: Iterator):
        self.frames, self.pos = frames, -1

    def rgb(self, position: int) -> np.ndarray:
        for frame in self.frames:
            self.pos += 1
            if self.pos == position:
                return frame.rgb
        raise VideoError("truncated", f"the video ended before kept frame {position}")


def track_video(predictor, uri: str, shard_id: str, *, stride: int = 1, max_frames: Optional[int] = None,
                detect_every: int = 5, match_iou: float = 0.5, max_missing: int = 30, min_track_frames: int = 3,
                reverse: bool = False, offload_state_to_cpu: bool = False, dtype: str = "auto",
                prompts_json: Optional[str] = None, base_uri: Optional[str] = None, class_names: Optional[dict] = None,
                detect: Optional[DetectFn] = None, storage_options: Optional[dict] = None, max_pixels: Optional[int] = None,
                manifest_roots: Optional[list] = None, cache_frames: int = 16) -> VideoRows:
    """Track one video; never raises for a bad video (its ``videos`` row says what went wrong)."""
    class_names = class_names or {}
    out = VideoRows()
    video = {"uri": uri, "status": "ok", "error_class": None, "error": None, "width": None, "height": None, "fps": None,
             "frames": None, "frames_processed": 0, "duration_s": None, "num_tracks": 0, "class_counts": [], "shard_id": shard_id}
    out.video = video
    tracker = source = keyer = None
    meta: dict[int, dict] = {}  # track id -> object_key, class, source
    per_frame: dict[int, dict] = {}  # kept frame -> {track id: TrackedMask}
    try:
        info = probe(uri, storage_options, max_pixels, count=True)
        video.update(width=info.width, height=info.height, fps=info.fps, frames=info.frames, duration_s=info.duration_s)
        num = kept_count(info.frames, stride, max_frames)
        if not num:
            raise VideoError("no_frames", f"{uri} has no frames to track")
        source = FrameSource.from_video(uri, predictor.image_size, stride=stride, max_frames=max_frames, max_pixels=max_pixels,
                                        storage_options=storage_options, num_frames=num, cache_frames=cache_frames)
        tracker = VideoTracker(predictor, source, dtype, offload_state_to_cpu)
        if prompts_json:
            prompted = video_prompts(prompts_json, base_uri, {n: c for c, n in class_names.items()}, storage_options, manifest_roots)
            prompts = []
            for track_id, (frame, prompt, error) in enumerate(prompted, start=1):
                if error is not None:
                    log.warning("%s: object %d not tracked: %s", uri, track_id, error)
                    continue
                try:
                    position = source.kept_index(frame)
                except ValueError as exc:
                    log.warning("%s: object %d not tracked: %s", uri, track_id, exc)
                    continue
                prompts.append(ObjectPrompt(track_id, position, box=None if prompt.box is None else prompt.box.tolist(),
                                            points=None if prompt.points is None else prompt.points.tolist(),
                                            point_labels=None if prompt.point_labels is None else prompt.point_labels.tolist(),
                                            mask=prompt.mask))
                meta[track_id] = {"object_key": prompt.object_key, "class_id": prompt.class_id, "class_name": prompt.class_name,
                                  "source": "manifest", "prompt": prompt.kind, "det_score": None}
            for frame, found in tracker.track(prompts, reverse=reverse) if prompts else ():
                per_frame[frame] = found
        else:
            if detect is None:
                raise ValueError("detector-driven tracking needs a detector")
            keyer = KeyframeTracker(tracker, detect_every, match_iou, max_missing)
            keyframes = _Keyframes(iter_frames(uri, stride=stride, max_frames=num, max_pixels=max_pixels, storage_options=storage_options))
            for k in keyer.keyframes():
                for frame, found in keyer.step(k, detect(keyframes.rgb(k))):
                    per_frame[frame] = found
            _detector_meta(keyer, meta, class_names)
        _rows(out, uri, shard_id, source, range(len(source)), per_frame, meta, min_track_frames)
    except Exception as exc:  # noqa: BLE001 - one video's failure is its row, not the run's
        if isinstance(exc, VideoError):
            video.update(status="error", error_class=exc.error_class, error=str(exc))
        else:
            log.exception("%s: tracking failed", uri)
            video.update(status="error", error_class="track_error", error=f"{type(exc).__name__}: {exc}")
        if source is not None and per_frame and not out.images:  # a late error (truncated): the frames tracked are kept
            if keyer is not None:
                _detector_meta(keyer, meta, class_names)
            _rows(out, uri, shard_id, source, sorted(per_frame), per_frame, meta, min_track_frames)
    finally:
        if tracker is not None:
            tracker.close()
    return out


def _detector_meta(keyer: KeyframeTracker, meta: dict, class_names: dict) -> None:
    """Each detector track's majority class and mean detection score."""
    for track_id, track in keyer.tracks.items():
        cid = track.class_id
        meta[track_id] = {"object_key": None, "class_id": None if cid < 0 else cid,
                          "class_name": None if cid < 0 else class_names.get(cid, str(cid)),
                          "source": "detector", "prompt": "box", "det_score": track.mean_det_score}


def _rows(out: VideoRows, uri: str, shard_id: str, source: FrameSource, frames, per_frame: dict, meta: dict,
          min_track_frames: int) -> None:
    """Images rows for ``frames`` (kept frames, in order; untracked ones have no objects), objects
    and tracks rows from the tracked masks."""
    from pipeline.run.sink import class_counts

    tracks: dict[int, dict] = {}
    fps = out.video["fps"]
    for frame in frames:
        decoded = source.decoded_index(frame)
        furi = frame_uri(uri, decoded)
        time_s = source.time_s(frame)
        if time_s is None and fps:
            time_s = decoded / fps
        objects = []
        found = per_frame.get(frame, {})
        for track_id in sorted(found):
            tracked = found[track_id]
            if not tracked.mask.any():
                continue
            info = meta[track_id]
            mask_rle = rle.encode(tracked.mask[None])[0]
            objects.append({
                "image_id": image_id_for(furi), "uri": furi, "object_id": len(objects), "object_key": info["object_key"],
                "source": info["source"], "prompt": info["prompt"], "candidate": 0, "status": "ok", "error": None,
                "class_id": info["class_id"], "class_name": info["class_name"], "det_score": info["det_score"],
                "mask_score": tracked.score, "box": _box(tracked.mask), "area": int(tracked.mask.sum()), "mask": mask_rle,
                "track_id": track_id,
            })
            t = tracks.setdefault(track_id, {"first": decoded, "last": decoded, "n": 0, "score": 0.0})
            t["last"], t["n"], t["score"] = decoded, t["n"] + 1, t["score"] + tracked.score
        out.objects.extend(objects)
        out.images.append({
            "image_id": image_id_for(furi), "uri": furi, "width": source.width, "height": source.height, "status": "ok",
            "error_class": None, "error": None, "note": None, "num_objects": len(objects), "class_counts": class_counts(objects),
            "num_prompt_errors": 0, "num_flagged": 0, "shard_id": shard_id, "video_uri": uri, "frame_index": decoded,
            "time_s": time_s,
        })
    for track_id in sorted(meta):  # every track, one whose mask was never seen too (num_frames 0)
        t, info = tracks.get(track_id, {"first": None, "last": None, "n": 0, "score": None}), meta[track_id]
        out.tracks.append({
            "video_uri": uri, "track_id": track_id, "object_key": info["object_key"], "class_id": info["class_id"],
            "class_name": info["class_name"], "first_frame": t["first"], "last_frame": t["last"], "num_frames": t["n"],
            "mean_mask_score": t["score"] / t["n"] if t["n"] else None, "mean_det_score": info["det_score"], "source": info["source"],
            "shard_id": shard_id,
        })
    counted = [{"status": "ok", "candidate": 0, "class_id": r["class_id"], "class_name": r["class_name"]}
               for r in out.tracks if r["num_frames"] >= min_track_frames]
    out.video.update(frames_processed=len(out.images), num_tracks=len(out.tracks), class_counts=class_counts(counted))


class Tracker:
    """Ray actor (``map_batches`` over video shard files): SAM 2's video predictor, built once, and
    the detector when videos are tracked from detections. Each video's rows are staged under
    ``RUN/_staging/shard-X/`` (images, objects, videos, tracks parts; run/video_flow.py commits
    them); the driver gets one summary row per video, as the sink gives one per image."""

    def __init__(self, sam_cfg, video: dict, class_names: dict, run_uri: str, run_storage_options: Optional[dict] = None,
                 storage_options: Optional[dict] = None, max_pixels: Optional[int] = None, detector_cfg=None,
                 expected_sha256: Optional[dict] = None, class_embeddings=None, manifest_roots: Optional[list] = None,
                 cpu_threads: Optional[int] = None, meta_columns: Optional[list] = None):
        from pipeline.models.weights import pick_device, resolve_sam_checkpoint
        from pipeline.run.console import worker_logging
        from pipeline.sam.video import build_video_predictor

        worker_logging()
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        expected = expected_sha256 or {}
        self.device = pick_device(sam_cfg.device)
        weights = resolve_sam_checkpoint(sam_cfg.size, sam_cfg.checkpoint, expected.get("sam"), sam_cfg.storage_options)
        self.predictor = build_video_predictor(weights, sam_cfg.image_size, self.device)
        self.dtype = sam_cfg.dtype
        self.video, self.class_names = dict(video), class_names
        self.run_uri, self.run_storage_options = run_uri, run_storage_options
        self.storage_options, self.max_pixels, self.manifest_roots = storage_options, max_pixels, manifest_roots
        self.meta_columns = list(meta_columns or [])
        self.detector = None
        if detector_cfg is not None:
            from pipeline.models.detector import load_detector
            from pipeline.models.weights import resolve_detector_weights

            path = resolve_detector_weights(detector_cfg.weights, expected.get("detector"), detector_cfg.storage_options)
            self.detector = load_detector(detector_cfg, path, pick_device(detector_cfg.device), class_embeddings)

    def detect(self, rgb: np.ndarray) -> list:
        """The detector on one keyframe, as the detect stage runs it (BGR numpy, its predict kwargs)."""
        from pipeline.stages.detect import detections_of

        model, kwargs = self.detector
        boxes, classes, scores = detections_of(model.predict([rgb[:, :, ::-1]], **kwargs)[0])
        return [Detection(box=[float(v) for v in b], class_id=int(c), score=float(sc)) for b, c, sc in zip(boxes, classes, scores)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.parquet as pq
        from fsspec.core import url_to_fs

        from pipeline.run.sink import _meta_value
        from pipeline.run.timings import StageClock

        fs, root = url_to_fs(self.run_uri, **(self.run_storage_options or {}))
        summary = []
        clock = StageClock()
        for path in batch.column("shard_path").to_pylist():
            with fs.open(path, "rb") as fh:
                shard = pq.read_table(fh).to_pylist()
            for row in shard:
                started = time.perf_counter()
                uri = row["uri"]
                rows = track_video(self.predictor, uri, row["shard_id"], **self.video, dtype=self.dtype,
                                   prompts_json=row.get("prompts"), base_uri=row.get("base_uri"), class_names=self.class_names,
                                   detect=self.detect if self.detector is not None and not row.get("prompts") else None,
                                   storage_options=self.storage_options, max_pixels=self.max_pixels, manifest_roots=self.manifest_roots)
                clock.add("track", time.perf_counter() - started)
                meta = json.loads(row.get("meta") or "{}")
                for image in rows.images:  # an input manifest's metadata, on every frame of its video
                    image.update({name: _meta_value(meta.get(name)) for name in self.meta_columns})
                stage_video(fs, root.rstrip("/"), rows, row["image_id"], row["shard_id"], self.meta_columns)
                summary.append({"shard_id": row["shard_id"], "image_id": row["image_id"], "shard_rows": row["shard_rows"]})
        out = pa.Table.from_pylist(summary, schema=pa.schema([("shard_id", pa.string()), ("image_id", pa.string()),
                                                               ("shard_rows", pa.int32())]))
        return clock.stamp(out)


def stage_video(fs, root: str, rows: VideoRows, video_id: str, shard_id: str, meta_columns: Optional[list] = None) -> None:
    """One video's parts under ``RUN/_staging/shard-X/``, named by the video (a retry overwrites
    its own parts); objects first and the videos part last: a videos part means the rest is there."""
    from pipeline.run.sink import _parquet_bytes, atomic_write, staging_path
    from pipeline.run.tables import OBJECTS_SCHEMA, TRACKS_SCHEMA, VIDEOS_SCHEMA, images_schema

    folder = staging_path(root, shard_id)
    for name, table in (("objects", pa.Table.from_pylist(rows.objects, schema=OBJECTS_SCHEMA)),
                        ("tracks", pa.Table.from_pylist(rows.tracks, schema=TRACKS_SCHEMA)),
                        ("images", pa.Table.from_pylist(rows.images, schema=images_schema(list(meta_columns or [])))),
                        ("videos", pa.Table.from_pylist([rows.video], schema=VIDEOS_SCHEMA))):
        atomic_write(fs, f"{folder}/{name}-{video_id}.parquet", _parquet_bytes(table))
