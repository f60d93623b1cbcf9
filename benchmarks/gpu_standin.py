"""A GPU stand-in for SAM (a named fake): the device of benchmarks/gpu_sim.py and of
tests/test_host_overlap.py.

No GPU can be used here. ``SimulatedSam`` is the real ``SamModel`` with only its device work
replaced: the image encoder, the mask decoder and the reduction of the masks on the device. Like
a CUDA stream, the stand-in queues that work (``FakeStream.launch``: so many milliseconds per
image and per prompt) and returns at once; the batch's one copy to the host waits for the stream
(a sleep, so the GIL is free for the host threads meanwhile), as the real one-copy-one-sync does.
Everything else is the real code: the device loop's prompt grouping and prompt tensors, the
out-of-memory halving, ``Pending`` answers, and in the segment stage decode threads, quality
control, RLE strings, Arrow rows.

What the stand-in answers is realistic, but it is not SAM's: SAM's weights cannot be downloaded
here, so logits saved from the real model cannot be had. Each box's low-res logits (256 x 256,
what SAM at 1024 gives) are made from the photo itself instead (``object_logits``): likeness to
the colour at the box's centre, an ellipse filling the box, and smooth noise, blurred. The masks
follow the photo's edges, with the ragged outlines, islands and holes that make RLE strings and
quality control work. They are reduced ahead of the run by the real code (``reduction.reduce`` and
``to_host`` on the CPU: upsampled to the photo, stability score, run boundaries) and replayed.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import numpy as np

from pipeline.config import QaConfig, SamConfig
from pipeline.run.timings import StageClock
from pipeline.sam import reduction
from pipeline.sam.host_work import HostChunk
from pipeline.sam.model import SamModel

LOW_RES = 256  # SAM's low-res logits at image size 1024


class FakeStream:
    """Stands in for a CUDA stream: work is queued (``launch``) and runs one item after another
    from when it was queued, while the host goes on; ``synchronize`` waits (sleeping) until the
    stream is idle. Counts what it did, for tests: ``launches``, ``syncs``, ``busy_s``."""

    def __init__(self):
        self.busy_until = 0.0
        self.busy_s = 0.0
        self.launches = 0
        self.syncs = 0
        self._lock = threading.Lock()

    def launch(self, seconds: float) -> None:
        with self._lock:
            now = time.perf_counter()
            self.busy_until = max(now, self.busy_until) + seconds
            self.busy_s += seconds
            self.launches += 1

    def synchronize(self) -> None:
        with self._lock:
            self.syncs += 1
            wait = self.busy_until - time.perf_counter()
        if wait > 0:
            time.sleep(wait)


def object_logits(small: np.ndarray, box, rng: np.random.Generator) -> np.ndarray:
    """Low-res logits (LOW_RES x LOW_RES float32) of an object in ``box`` (xyxy, low-res pixels)
    of ``small`` (the photo as SAM sees it, LOW_RES x LOW_RES x 3 uint8): positive where the
    pixel looks like the box's centre and lies in the box's ellipse, with smooth noise; not SAM's."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1.0), max((y1 - y0) / 2, 1.0)
    yy, xx = np.mgrid[0:LOW_RES, 0:LOW_RES].astype(np.float32)
    ellipse = 1.0 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2
    image = small.astype(np.float32)
    core = image[int(cy - ry / 3):int(cy + ry / 3) + 1, int(cx - rx / 3):int(cx + rx / 3) + 1].reshape(-1, 3)
    inside = image[int(y0):int(y1) + 1, int(x0):int(x1) + 1].reshape(-1, 3)
    spread = float(inside.std()) + 8.0
    likeness = 1.0 - np.linalg.norm(image - core.mean(axis=0), axis=2) / (1.5 * spread)
    noise = cv2.GaussianBlur(rng.standard_normal((LOW_RES, LOW_RES)).astype(np.float32), (0, 0), 2.0)
    prior = np.clip(1.5 * (ellipse + 0.25), -1.5, 0.5)  # +0.5 in the box's core, 0 near its edge, -1.5 outside
    logits = 6.0 * prior + 8.0 * likeness + 3.0 * noise - 1.0
    return np.clip(cv2.GaussianBlur(logits, (0, 0), 0.7), -20.0, 20.0).astype(np.float32)


def box_key(uri, box) -> tuple:
    return (uri, tuple(np.asarray(box, np.float32).tolist()))


class Answers:
    """Per (uri, box): what the device would hand the host for that box (one candidate): score,
    area, tight box, run boundaries, stability; computed ahead by the real reduction code."""

    def __init__(self):
        self.table: dict[tuple, tuple] = {}

    def add_image(self, uri: str, rgb: np.ndarray, boxes: np.ndarray, seed: int) -> None:
        import cv2
        import torch

        h, w = rgb.shape[:2]
        rng = np.random.default_rng(seed)
        small = cv2.resize(rgb, (LOW_RES, LOW_RES), interpolation=cv2.INTER_AREA)
        scale = np.array([LOW_RES / w, LOW_RES / h] * 2, np.float32)
        low_res = torch.from_numpy(np.stack([object_logits(small, b * scale, rng) for b in boxes]))[:, None]
        scores = torch.from_numpy(rng.uniform(0.55, 0.99, (len(boxes), 1)).astype(np.float32))
        chunk = reduction.reduce(low_res, scores, [(h, w)] * len(boxes), list(boxes), on_device=True, stability=True,
                                 keep_logits=False)
        (host,) = reduction.to_host([chunk], "cpu")
        for n, box in enumerate(boxes):
            run = host.runs[n][0]
            self.table[box_key(uri, box)] = (float(host.scores[n, 0]), int(host.areas[n, 0]), host.boxes[n, 0].copy(),
                                             (run[0], run[1].copy()), float(host.stability[n, 0]))


class _SimChunk:
    """A decoder call queued on the stand-in: which boxes of which images it answers."""

    def __init__(self, keys: list, sizes: list, prompt_boxes: list):
        self.keys, self.sizes, self.prompt_boxes = keys, sizes, prompt_boxes


class SimulatedSam(SamModel):
    """``SamModel`` on a simulated GPU (see the module's docstring): ``image_s`` seconds of
    device time per image through the encoder (padded images included, as on a GPU), ``prompt_s``
    per prompt through the decoder and the masks' reduction. Box prompts, one candidate each."""

    def __init__(self, cfg: SamConfig, answers: Answers, image_s: float, prompt_s: float, qa: Optional[QaConfig] = None):
        import torch

        self.cfg = cfg
        self.device = torch.device("cpu")  # where the stand-in's few host tensors live
        self.dtype = "float32"
        self.qa = qa
        self.size, self.low_res = 1024, LOW_RES
        self.pad_batches = True  # as on a GPU
        self.reduce_on_device = True
        self.faults = None
        self.clock = StageClock()
        self.busy_s = 0.0
        self._events: list = []
        self.answers, self.image_s, self.prompt_s = answers, image_s, prompt_s
        self.stream = FakeStream()
        self.encoded_batches = 0  # encoder passes issued, for tests

    def _mark(self):
        return self.stream.busy_s

    def _elapsed(self, started, stage: str) -> None:
        seconds = self.stream.busy_s - started  # device time queued since ``started``
        self.clock.add(stage, seconds)
        self.busy_s += seconds

    def _encode(self, images: list, pad_to: Optional[int] = None) -> dict:
        started = self._mark()
        self.stream.launch(self.image_s * max(len(images), pad_to or 0))
        self.encoded_batches += 1
        self._elapsed(started, "encode")
        return {"orig_hw": [im.shape[:2] for im in images]}

    def _decode_chunk(self, features: dict, jobs: list, uris: list, keep_all: bool, keep_logits: bool) -> _SimChunk:
        if any(j.multi for j in jobs) or keep_logits or any(j.prompt.box is None for j in jobs):
            raise NotImplementedError("the GPU stand-in answers box prompts with one candidate, no logits")
        started = self._mark()
        self._prompt_tensors(jobs, features["orig_hw"])  # the device loop's own host work for a decoder call
        self.stream.launch(self.prompt_s * len(jobs))
        self._elapsed(started, "masks")
        sizes = [tuple(int(v) for v in features["orig_hw"][j.image]) for j in jobs]
        return _SimChunk([box_key(u, j.prompt.box) for u, j in zip(uris, jobs)], sizes, [j.prompt.box for j in jobs])

    def _to_host(self, chunks: list) -> list[HostChunk]:
        self.stream.synchronize()  # the batch's one wait for the device
        out = []
        for chunk in chunks:
            found = [self.answers.table[key] for key in chunk.keys]
            n = len(found)
            out.append(HostChunk(
                scores=np.array([[f[0]] for f in found], np.float32), areas=np.array([[f[1]] for f in found], np.int64),
                boxes=np.stack([f[2] for f in found]).reshape(n, 1, 4).astype(np.float32), runs=[[f[3]] for f in found],
                sizes=chunk.sizes, prompt_boxes=chunk.prompt_boxes,
                stability=np.array([[f[4]] for f in found], np.float32) if self.qa is not None else None))
        return out
