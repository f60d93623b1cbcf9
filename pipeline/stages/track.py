"""Track stage: a Ray actor holding SAM 2's video predictor (and, for detector-driven tracking, the
detector); one chunk of a video (its kept frames [start, stop), or the whole video) in -> its
frames' images and objects rows, its ``videos`` row and its ``tracks`` rows, written as the
chunk's files (run/video_chunks.py); the video's commit joins its chunks.

Two modes per video (issue 19):

- **prompted**: the manifest line's objects, each with ``"frame": N`` (the 0-based decoded frame
  it is drawn on), are added on that frame and propagated (``VideoTracker.track``, backwards too
  with ``video.reverse``);
- **detector-driven** (no prompts): the detector runs on every ``video.detect_every``-th kept
  frame and ``KeyframeTracker`` matches its boxes to the live tracks.

Every kept frame becomes an images row (``VIDEO#frame=N``), every non-empty mask an objects row
with its ``track_id`` (the chunk's own; the join renumbers them). A chunk starts a fresh SAM 2
state on its first frame, which is a keyframe of the whole video. A video that cannot be read becomes a ``videos`` row with its
``error_class``; frames tracked before a late error (a truncated file) are kept.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
import pyarrow as pa

from pipeline.io.listing import image_id_for
from pipeline.io.video import VideoError, kept_count, probe
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


class FrameMask(NamedTuple):
    """A tracked mask as the output keeps it: COCO RLE, box, area and score."""
    rle: dict
    box: list
    area: int
    score: float


def compact(found: dict) -> dict[int, FrameMask]:
    """A frame's tracked masks ({track id: TrackedMask}) as they are stored, the empty ones left out.
    Done as each frame comes, so a video's rows hold a few KB per mask, not every frame's
    frame-sized masks until the end (memory flat in the video's length, issue 19)."""
    return {track_id: FrameMask(rle.encode(t.mask[None])[0], _box(t.mask), int(t.mask.sum()), t.score)
            for track_id, t in found.items() if t.mask.any()}


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


# The video.* keys track_video takes (the others are the driver's: chunking, counting).
TRACK_KEYS = ("stride", "max_frames", "detect_every", "match_iou", "max_missing", "min_track_frames", "reverse", "offload_state_to_cpu")


def video_row(uri: str, shard_id: str, info: Optional[dict] = None) -> dict:
    """A videos row before tracking: ok, nothing processed; ``info``: the probe's facts."""
    video = {"uri": uri, "status": "ok", "error_class": None, "error": None, "width": None, "height": None, "fps": None,
             "frames": None, "frames_processed": 0, "duration_s": None, "num_tracks": 0, "class_counts": [], "shard_id": shard_id}
    video.update(info or {})
    return video


def track_video(predictor, uri: str, shard_id: str, *, stride: int = 1, max_frames: Optional[int] = None,
                detect_every: int = 5, match_iou: float = 0.5, max_missing: int = 30, min_track_frames: int = 3,
                reverse: bool = False, offload_state_to_cpu: bool = False, dtype: str = "auto",
                prompts_json: Optional[str] = None, base_uri: Optional[str] = None, class_names: Optional[dict] = None,
                detect: Optional[DetectFn] = None, storage_options: Optional[dict] = None, max_pixels: Optional[int] = None,
                manifest_roots: Optional[list] = None, cache_frames: int = 16, window: Optional[tuple] = None,
                info: Optional[dict] = None, faults=None) -> VideoRows:
    """Track one video, or the kept frames ``window`` = [start, stop) of it (a chunk, with the
    ``info`` its plan probed); never raises for a bad video (its ``videos`` row says what went
    wrong). ``faults``: the test-only fault injection (run/faults.py), asked on every frame."""
    class_names = class_names or {}
    out = VideoRows()
    video = out.video = video_row(uri, shard_id)
    tracker = source = keyer = None
    meta: dict[int, dict] = {}  # track id -> object_key, class, source
    per_frame: dict[int, dict] = {}  # kept frame -> {track id: FrameMask}, its non-empty masks only

    def tracked(frame: int, found: dict) -> None:
        if faults is not None:
            faults.maybe_kill("track", frame_uri(uri, source.decoded_index(frame)))
        per_frame[frame] = compact(found)

    try:
        if info is None or window is None or window[1] is None:
            probed = probe(uri, storage_options, max_pixels, count=True)
            info = {"width": probed.width, "height": probed.height, "fps": probed.fps, "frames": probed.frames,
                    "duration_s": probed.duration_s}
            window = (0, kept_count(probed.frames, stride, max_frames))
        video.update(info)
        first, num = window[0], window[1] - window[0]
        if num <= 0:
            raise VideoError("no_frames", f"{uri} has no frames to track")
        keyframe = (lambda i: i % detect_every == 0) if detect is not None and not prompts_json else None
        source = FrameSource.from_video(uri, predictor.image_size, stride=stride, start=first * stride, max_pixels=max_pixels,
                                        storage_options=storage_options, num_frames=num, cache_frames=cache_frames, keep_rgb=keyframe)
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
                                  "source": "manifest", "prompt": prompt.kind, "det_score": None, "votes": []}
            for frame, found in tracker.track(prompts, reverse=reverse) if prompts else ():
                tracked(frame, found)
        else:
            if detect is None:
                raise ValueError("detector-driven tracking needs a detector")
            keyer = KeyframeTracker(tracker, detect_every, match_iou, max_missing)
            for k in keyer.keyframes():  # a chunk starts on a keyframe: its keyframes are the whole video's
                for frame, found in keyer.step(k, detect(source.rgb(k))):
                    tracked(frame, found)
            _detector_meta(keyer, meta, class_names, source)
        _rows(out, uri, shard_id, source, range(len(source)), per_frame, meta, min_track_frames)
    except Exception as exc:  # noqa: BLE001 - one video's failure is its row, not the run's
        if isinstance(exc, VideoError):
            video.update(status="error", error_class=exc.error_class, error=str(exc))
        else:
            log.exception("%s: tracking failed", uri)
            video.update(status="error", error_class="track_error", error=f"{type(exc).__name__}: {exc}")
        if source is not None and per_frame and not out.images:  # a late error (truncated): the frames tracked are kept
            if keyer is not None:
                _detector_meta(keyer, meta, class_names, source)
            _rows(out, uri, shard_id, source, sorted(per_frame), per_frame, meta, min_track_frames)
    finally:
        if tracker is not None:
            tracker.close()
        elif source is not None:
            source.close()
    return out


def _detector_meta(keyer: KeyframeTracker, meta: dict, class_names: dict, source: FrameSource) -> None:
    """Each detector track's majority class and mean detection score, and the detections matched
    to it (a chunk's tracks rows carry them: the join counts each keyframe's once)."""
    for track_id, track in keyer.tracks.items():
        cid = track.class_id
        votes = [{"frame": source.decoded_index(f), "class_id": c, "class_name": class_names.get(c, str(c)), "score": score}
                 for f, c, score in track.votes]
        meta[track_id] = {"object_key": None, "class_id": None if cid < 0 else cid,
                          "class_name": None if cid < 0 else class_names.get(cid, str(cid)),
                          "source": "detector", "prompt": "box", "det_score": track.mean_det_score, "votes": votes}


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
            info = meta[track_id]
            objects.append({
                "image_id": image_id_for(furi), "uri": furi, "object_id": len(objects), "object_key": info["object_key"],
                "source": info["source"], "prompt": info["prompt"], "candidate": 0, "status": "ok", "error": None,
                "class_id": info["class_id"], "class_name": info["class_name"], "det_score": info["det_score"],
                "mask_score": tracked.score, "box": tracked.box, "area": tracked.area, "mask": tracked.rle,
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
            "shard_id": shard_id, "votes": info["votes"],
        })
    counted = [{"status": "ok", "candidate": 0, "class_id": r["class_id"], "class_name": r["class_name"]}
               for r in out.tracks if r["num_frames"] >= min_track_frames]
    out.video.update(frames_processed=len(out.images), num_tracks=len(out.tracks), class_counts=class_counts(counted))


class Tracker:
    """Ray actor (``map_batches`` over the chunks of the videos: run/video_flow.py): SAM 2's video
    predictor, built once, and the detector when videos are tracked from detections. Each chunk's
    rows are written under ``RUN/_chunks/`` with its marker last (run/video_chunks.py); a chunk
    already marked is not tracked again (a task retried after it finished). The driver gets one
    summary row per chunk, as the sink gives one per image, with the frames it adds."""

    def __init__(self, sam_cfg, video: dict, class_names: dict, run_uri: str, run_storage_options: Optional[dict] = None,
                 storage_options: Optional[dict] = None, max_pixels: Optional[int] = None, detector_cfg=None,
                 expected_sha256: Optional[dict] = None, class_embeddings=None, manifest_roots: Optional[list] = None,
                 cpu_threads: Optional[int] = None, meta_columns: Optional[list] = None, ledger=None, max_image_crashes: int = 3):
        from pipeline.models.weights import pick_device, resolve_sam_checkpoint
        from pipeline.run.console import worker_logging
        from pipeline.run.faults import CrashGuard, InjectedFaults
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
        self.video = {k: v for k, v in video.items() if k in TRACK_KEYS}
        self.class_names = class_names
        self.run_uri, self.run_storage_options = run_uri, run_storage_options
        self.storage_options, self.max_pixels, self.manifest_roots = storage_options, max_pixels, manifest_roots
        self.meta_columns = list(meta_columns or [])
        self.guard = CrashGuard(ledger, "track", max_image_crashes)
        self.faults = InjectedFaults.from_env()
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

        from pipeline.run.timings import StageClock
        from pipeline.run.video_chunks import chunk_done, chunk_key

        fs, root = url_to_fs(self.run_uri, **(self.run_storage_options or {}))
        root = root.rstrip("/")
        summary = []
        clock = StageClock()
        for item in batch.to_pylist():
            with fs.open(item["shard_path"], "rb") as fh:
                (row,) = pq.read_table(fh).to_pylist()
            k = item["chunk"]
            frames = item["frames"]
            if not chunk_done(fs, root, row["shard_id"], k):
                started = time.perf_counter()
                processed = self.track_chunk(fs, root, row, item)
                clock.add("track", time.perf_counter() - started)
                frames = frames or processed  # a video whose plan could not count its frames: what was tracked
            summary.append({"shard_id": row["shard_id"], "image_id": chunk_key(row["image_id"], k), "shard_rows": item["chunks"],
                            "video_frames": frames})
        out = pa.Table.from_pylist(summary, schema=pa.schema([("shard_id", pa.string()), ("image_id", pa.string()),
                                                               ("shard_rows", pa.int32()), ("video_frames", pa.int64())]))
        return clock.stamp(out)

    def track_chunk(self, fs, root: str, row: dict, item: dict) -> int:
        """Track one chunk (or a whole video) and write its files; returns the frames tracked.
        A chunk that killed its worker ``ray.max_image_crashes`` times is not tried again: its
        videos row says ``worker_crash`` (the video's other chunks are kept)."""
        from pipeline.run.faults import WORKER_CRASH
        from pipeline.run.sink import _meta_value
        from pipeline.run.video_chunks import chunk_key, write_chunk

        uri, shard_id, k = row["uri"], row["shard_id"], item["chunk"]
        info = json.loads(item["info"]) if item.get("info") else None
        window = (item["start"], item["stop"])
        if not self.guard.start(chunk_key(uri, k)):
            rows = VideoRows(video=video_row(uri, shard_id, info))
            rows.video.update(status="error", error_class=WORKER_CRASH,
                              error=f"the track worker died {self.guard.max_crashes} times while tracking frames "
                                    f"{window[0]}..{window[1]} (kept frames) of this video")
        else:
            rows = track_video(self.predictor, uri, shard_id, **self.video, dtype=self.dtype, prompts_json=row.get("prompts"),
                               base_uri=row.get("base_uri"), class_names=self.class_names,
                               detect=self.detect if self.detector is not None and not row.get("prompts") else None,
                               storage_options=self.storage_options, max_pixels=self.max_pixels, manifest_roots=self.manifest_roots,
                               window=window, info=info, faults=self.faults)
        meta = json.loads(row.get("meta") or "{}")
        for image in rows.images:  # an input manifest's metadata, on every frame of its video
            image.update({name: _meta_value(meta.get(name)) for name in self.meta_columns})
        write_chunk(fs, root, shard_id, k, window, rows.images, rows.objects, rows.tracks, rows.video, self.meta_columns)
        self.guard.done()
        return len(rows.images)
