"""The host's share of SAM's answers, done off the device loop: quality metrics, clean-up, RLE.

The device loop (``sam/model.py``) hands over, per decoder call, one ``HostChunk``: what the
host needs of its masks (scores, areas, tight boxes, stability scores, and the masks as COCO run
boundaries or RLE), copied from the device in one transfer per encoder batch
(``sam/reduction.py``). Each prompt's answer is a ``Pending`` until ``finish`` turns it into
``Candidates``: the quality metrics of every mask come from its bounding-box crop, rebuilt here
from the run boundaries (no mask bitmap crosses from the device), with SAM's clean-up when asked.
The segment stage runs ``finish`` and the rows on a ``HostPool`` while the device loop issues
the next batch; ``SamModel.segment`` and the automatic generator call it inline.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from pipeline.config import QaConfig
from pipeline.sam import masks as mask_codec


def rles_of(runs: list, size) -> list[dict]:
    """COCO RLE dicts from a mask list's runs: (first value, change positions) pairs, or RLE dicts
    already (a cleaned mask), as the answers of this model and the automatic generator hold them."""
    return [run if isinstance(run, dict) else mask_codec.rle_from_changes(*run, *size) for run in runs]


@dataclass
class Candidates:
    """SAM's answer for one prompt: candidate masks ranked best first (three with multimask, or
    only the best of them when the caller keeps one), with their area and tight box. The masks
    arrive as COCO run boundaries from the device; the RLE strings are made on first use (by
    the thread that builds the rows, while the device works on the next batch)."""

    scores: np.ndarray  # (C,) float32, descending
    areas: np.ndarray  # (C,) int64
    boxes: np.ndarray  # (C, 4) float32 xyxy, the masks' tight boxes (zeros when empty)
    size: tuple[int, int]  # (h, w) of the image
    runs: list = field(repr=False)  # C (first pixel value, change positions) pairs, or an RLE dict (a cleaned mask)
    logits: Optional[np.ndarray] = None  # (C, h, w) low-res logits, when asked for: reusable as mask_input
    quality: Optional[list] = None  # C dicts of quality.py's metrics, when the model was given a QaConfig
    _rles: Optional[list] = field(default=None, repr=False)
    _masks: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def rles(self) -> list[dict]:
        """C dicts ``{"size": [h, w], "counts": str}``, exactly as ``pycocotools.mask.encode`` gives."""
        if self._rles is None:
            self._rles = rles_of(self.runs, self.size)
        return self._rles

    @property
    def masks(self) -> np.ndarray:
        """(C, H, W) bool, decoded from the RLE on first use (the pipeline itself never needs them)."""
        if self._masks is None:
            self._masks = np.stack([mask_codec.decode(r) for r in self.rles])
        return self._masks


@dataclass
class HostChunk:
    """One decoder call's answers on the host: n prompts, C candidates each, best first."""

    scores: np.ndarray  # (n, C) float32
    areas: np.ndarray  # (n, C) int64
    boxes: np.ndarray  # (n, C, 4) float32 xyxy
    runs: list  # n lists of C runs: (first value, change positions) or RLE dicts
    sizes: list  # n (h, w)
    prompt_boxes: list  # n prompt boxes (xyxy) or None
    stability: Optional[np.ndarray] = None  # (n, C) float32, with quality control
    logits: Optional[np.ndarray] = None  # (n, C, h, w) low-res logits, when asked for


@dataclass
class Pending:
    """Prompt ``n`` of a ``HostChunk``: an answer whose host work is still to do (``finish``)."""

    chunk: HostChunk
    n: int


def finish(answer, qa: Optional[QaConfig]):
    """A ``Pending`` answer -> ``Candidates`` (quality metrics and clean-up with ``qa``); a
    finished answer (``Candidates``, None) as it is."""
    if not isinstance(answer, Pending):
        return answer
    chunk, n = answer.chunk, answer.n
    size = tuple(chunk.sizes[n])
    runs, areas, boxes = list(chunk.runs[n]), chunk.areas[n].copy(), chunk.boxes[n].copy()
    quality = None
    if qa is not None:
        quality = []
        for k in range(len(runs)):
            metrics = quality_of(qa, runs[k], size, boxes[k], chunk.prompt_boxes[n], float(chunk.stability[n, k]))
            if "cleaned" in metrics:
                runs[k], areas[k], boxes[k] = metrics.pop("cleaned")
            quality.append(metrics)
    return Candidates(chunk.scores[n], areas, boxes, size, runs, None if chunk.logits is None else chunk.logits[n], quality)


# ---------------------------------------------------------------- quality of one mask, from its crop

def mask_crop(run, size: tuple, bbox) -> tuple[np.ndarray, int, int]:
    """A mask's bounding-box crop (bool) and its top-left pixel (x0, y0), from its run
    boundaries (only the columns of the box are rebuilt) or its RLE dict."""
    h, w = size
    x0, y0, x1, y1 = (int(v) for v in bbox)
    if x1 <= x0:
        return np.zeros((0, 0), bool), x0, y0
    if isinstance(run, dict):
        return mask_codec.decode(run)[y0:y1, x0:x1], x0, y0
    first, changes = run
    changes = np.asarray(changes)
    lo, hi = x0 * h, x1 * h  # the box's columns, in COCO's column-major pixel order
    before = int(np.searchsorted(changes, lo, side="right"))  # value changes at or before pixel lo
    bounds = np.concatenate([[lo], changes[before:int(np.searchsorted(changes, hi, side="left"))], [hi]])
    values = np.arange(len(bounds) - 1) % 2 == (0 if bool(first) ^ (before % 2) else 1)  # runs alternate
    columns = np.repeat(values, np.diff(bounds)).reshape(x1 - x0, h)
    return columns.T[y0:y1], x0, y0


def crop_quality(qa: QaConfig, crop: np.ndarray, x0: int, y0: int, size: tuple, prompt_box, stability: float) -> dict:
    """A mask's shape metrics and the pixels inside its prompt box, from its bounding-box crop
    (top-left pixel (x0, y0) of an image of ``size``); with clean-up on, the cleaned mask too
    (``cleaned``: RLE, area, box)."""
    from pipeline.sam import quality

    out: dict = {"stability": stability}
    if crop.size and (qa.remove_islands_below or qa.fill_holes_below):
        cleaned, changed = quality.clean(crop, qa.remove_islands_below, qa.fill_holes_below)
        if changed:
            full = np.zeros(size, bool)
            full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = cleaned
            ys, xs = np.nonzero(cleaned)
            box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float32) if len(xs) else np.zeros(4, np.float32)
            out["cleaned"] = (mask_codec.encode(full[None])[0], int(cleaned.sum()), box)
            crop = cleaned
    out["regions"], out["largest_region"], out["hole_area"] = quality.shape(crop)
    out["inside"] = quality.pixels_inside(crop, x0, y0, prompt_box) if prompt_box is not None else None
    return out


def quality_of(qa: QaConfig, run, size: tuple, bbox, prompt_box, stability: float) -> dict:
    """``crop_quality`` of a mask given as run boundaries or RLE with its tight box."""
    crop, x0, y0 = mask_crop(run, size, bbox)
    return crop_quality(qa, crop, x0, y0, size, prompt_box, stability)


# ---------------------------------------------------------------- the host thread pool

class HostPool:
    """Host work beside the device loop: ``threads`` threads (0: inline, in the caller's thread),
    and at most ``ahead`` jobs submitted and not finished, so the device loop cannot run ahead of
    the host and pile up answers (memory stays flat): ``submit`` waits for a slot."""

    def __init__(self, threads: int, ahead: int):
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="host") if threads else None
        self.slots = threading.Semaphore(max(1, ahead))
        self.ahead = max(1, ahead)
        self.waits = 0  # submits that found every slot taken (the device loop waited for the host)
        self.most_pending = 0  # the most jobs submitted and not finished at once
        self._pending = 0
        self._lock = threading.Lock()
        self.lock = threading.Lock()  # for the jobs' own shared state (a stage clock)

    def submit(self, fn: Callable, *args) -> Future:
        if self.pool is None:
            future: Future = Future()
            future.set_result(fn(*args))
            return future
        if not self.slots.acquire(blocking=False):
            with self._lock:
                self.waits += 1
            self.slots.acquire()
        with self._lock:
            self._pending += 1
            self.most_pending = max(self.most_pending, self._pending)
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self._release)
        return future

    def _release(self, _future) -> None:
        with self._lock:
            self._pending -= 1
        self.slots.release()
