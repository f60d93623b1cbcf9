"""Detector-driven tracking: keyframe detections matched to SAM 2 video tracks by mask IoU.

Every ``detect_every`` frames the detector's detections are matched to the live tracks' masks on
that frame by an optimal assignment (``scipy.optimize.linear_sum_assignment`` on mask IoU, pairs
under ``match_iou`` not allowed). An unmatched detection starts a new track in the running sam2
state (sam2 takes new objects after tracking started: no reset). A track whose mask stays empty
for ``max_missing`` consecutive frames ends and leaves the state. Between keyframes the tracks are
propagated by ``VideoTracker.propagate``, so memory stays bounded as for prompted tracking.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from pipeline.sam.video import ObjectPrompt, TrackedMask, VideoTracker


class Detection(NamedTuple):
    """One detector box on a keyframe. ``mask`` (HxW bool, e.g. SAM's mask for the box) is what
    is matched; without one, the filled box is. A new track is prompted with the box if there is
    one, else with the mask."""
    box: Optional[Sequence[float]] = None  # x0, y0, x1, y1 in pixels of the frame
    mask: Optional[np.ndarray] = None
    class_id: int = -1
    score: float = 0.0


class Matches(NamedTuple):
    pairs: list  # (detection index, track index), IoU >= threshold, optimal in total IoU
    new: list  # detection indices matched to no track
    lost: list  # track indices matched to no detection


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of N and M boolean masks of one size (two empty masks: 0)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match(detection_masks: np.ndarray, track_masks: np.ndarray, iou_threshold: float) -> Matches:
    """The assignment of detections to tracks with the largest total IoU among pairs of IoU >=
    ``iou_threshold`` (pairs under it count as no match)."""
    return assign(mask_iou(np.asarray(detection_masks, bool), np.asarray(track_masks, bool)), iou_threshold)


def assign(iou: np.ndarray, iou_threshold: float) -> Matches:
    """Rows matched to columns of an (N, M) IoU matrix: the pairs of largest total IoU among those
    of IoU >= ``iou_threshold`` (``linear_sum_assignment``); also used to join tracks across chunks."""
    from scipy.optimize import linear_sum_assignment

    iou = np.asarray(iou, float)
    allowed = np.where(iou >= iou_threshold, iou, 0.0)
    pairs = []
    if allowed.size:
        rows, cols = linear_sum_assignment(allowed, maximize=True)
        pairs = [(int(r), int(c)) for r, c in zip(rows, cols) if allowed[r, c] > 0]
    matched_d, matched_t = {d for d, _ in pairs}, {t for _, t in pairs}
    return Matches(pairs, [d for d in range(iou.shape[0]) if d not in matched_d],
                   [t for t in range(iou.shape[1]) if t not in matched_t])


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.zeros((height, width), bool)
    mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return mask


@dataclass
class Track:
    """What the tracks table needs about one track (frames are FrameSource positions)."""
    track_id: int
    first_frame: int
    last_frame: int  # the last frame its mask was not empty
    num_frames: int = 0  # frames with a non-empty mask
    mask_score_sum: float = 0.0
    det_scores: list = field(default_factory=list)
    classes: Counter = field(default_factory=Counter)
    votes: list = field(default_factory=list)  # (frame, class id, score) of each matched detection: chunks are joined by them
    missing: int = 0  # consecutive empty frames so far
    ended: bool = False

    @property
    def mean_mask_score(self) -> Optional[float]:
        return self.mask_score_sum / self.num_frames if self.num_frames else None

    @property
    def mean_det_score(self) -> Optional[float]:
        return sum(self.det_scores) / len(self.det_scores) if self.det_scores else None

    @property
    def class_id(self) -> int:
        """The majority class over its matched detections (ties: the smallest id)."""
        return min(self.classes.items(), key=lambda kv: (-kv[1], kv[0]))[0] if self.classes else -1


class KeyframeTracker:
    """Detector-driven tracking on one ``VideoTracker``. Feed keyframes in order::

        for k in keyframer.keyframes():
            for frame, masks in keyframer.step(k, detections_on(k)):
                ...  # frames k .. k + detect_every - 1, every live track's TrackedMask
        keyframer.tracks  # Track per track id
    """

    def __init__(self, tracker: VideoTracker, detect_every: int, match_iou: float = 0.5, max_missing: int = 30,
                 first_track_id: int = 1):
        if detect_every < 1 or max_missing < 1:
            raise ValueError("detect_every and max_missing must be >= 1")
        self.tracker, self.detect_every, self.match_iou, self.max_missing = tracker, detect_every, match_iou, max_missing
        self.num_frames = len(tracker.frames)
        self.tracks: dict[int, Track] = {}
        self._next_id = first_track_id
        self._held: Optional[tuple[int, dict]] = None  # the masks on the next keyframe, propagated
        self._expect = 0  # the next keyframe

    def keyframes(self) -> range:
        return range(0, self.num_frames, self.detect_every)

    def live(self) -> list[int]:
        return [t for t, track in self.tracks.items() if not track.ended]

    def step(self, frame: int, detections: Sequence[Detection]) -> Iterator[tuple[int, dict[int, TrackedMask]]]:
        """Keyframe ``frame``: match, start tracks, then propagate up to the next keyframe."""
        if frame != self._expect:
            raise ValueError(f"keyframe {frame} out of order: expected {self._expect}")
        height, width = self.tracker.frames.height, self.tracker.frames.width
        held = self._held[1] if self._held else {}
        live = [t for t in self.live() if t in held]
        det_masks = np.array([d.mask if d.mask is not None else box_mask(d.box, height, width) for d in detections],
                             bool).reshape(len(detections), height, width)
        found = match(det_masks, np.array([held[t].mask for t in live], bool).reshape(len(live), height, width), self.match_iou)
        for d, t in found.pairs:
            self._vote(live[t], frame, detections[d])
        masks = {t: held[t] for t in live}
        for d in found.new:
            track_id, det = self._next_id, detections[d]
            self._next_id += 1
            prompt = ObjectPrompt(track_id, frame, box=det.box) if det.box is not None else ObjectPrompt(track_id, frame, mask=det_masks[d])
            masks[track_id] = self.tracker.add(prompt)[track_id]
            self.tracks[track_id] = Track(track_id, frame, frame)
            self._vote(track_id, frame, det)
        yield frame, self._account(frame, masks)
        self._held, self._expect = None, frame + self.detect_every
        last = min(frame + self.detect_every, self.num_frames - 1)
        if last > frame:
            yield from self._propagate(frame, last)
        self._drop_ended()

    def _propagate(self, frame: int, last: int) -> Iterator[tuple[int, dict[int, TrackedMask]]]:
        """Frames ``frame + 1 .. last``; the masks on ``last`` are held back when it is the next
        keyframe (they are reported by its own step, with the tracks it starts)."""
        hold = last == self._expect
        if not self.tracker.obj_ids:
            for f in range(frame + 1, last + (not hold)):
                yield f, {}
            self._held = (last, {}) if hold else None
            return
        for f, masks in self.tracker.propagate(start=frame + 1, count=last - frame - 1):
            masks = {t: m for t, m in masks.items() if t in self.tracks and not self.tracks[t].ended}
            if f == last and hold:
                self._held = (f, masks)
            else:
                yield f, self._account(f, masks)

    def _account(self, frame: int, masks: dict[int, TrackedMask]) -> dict[int, TrackedMask]:
        """Count frames, scores and misses; a track empty ``max_missing`` frames in a row ends."""
        for track_id, tracked in list(masks.items()):
            track = self.tracks[track_id]
            if tracked.mask.any():
                track.last_frame, track.missing = frame, 0
                track.num_frames += 1
                track.mask_score_sum += tracked.score
            else:
                track.missing += 1
                if track.missing >= self.max_missing:
                    track.ended = True
                    del masks[track_id]
        return masks

    def _vote(self, track_id: int, frame: int, det: Detection) -> None:
        track = self.tracks[track_id]
        track.classes[det.class_id] += 1
        track.det_scores.append(float(det.score))
        track.votes.append((frame, det.class_id, float(det.score)))

    def _drop_ended(self) -> None:
        for track_id in [t for t in self.tracker.obj_ids if self.tracks.get(t) and self.tracks[t].ended]:
            self.tracker.remove(track_id)
