"""Segment stage: a Ray actor holding one SAM 2.1 image predictor, prompts -> masks -> COCO RLE.

Per image: one encoder pass (``set_image``), then the prompts go through the decoder in batches
of equal shape, ``sam.box_chunk`` at a time, so memory stays bounded however many objects an
image holds.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import numpy as np
import pyarrow as pa

from . import masks as mask_codec
from .config import SamConfig
from .decode import ImageError, pixels_of, with_errors
from .faults import CrashGuard, InjectedFaults
from .prompts import Candidates, Prompt, manifest_prompts, run_prompts

log = logging.getLogger(__name__)

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
OBJECT_TYPE = pa.struct(
    [
        ("object_id", pa.int32()),
        ("object_key", pa.string()),  # the manifest's key; null for detector objects
        ("source", pa.string()),  # detector | manifest
        ("prompt", pa.string()),  # box, points, box+points, mask, ...
        ("candidate", pa.int32()),  # 0 = SAM's best-scoring mask; 1, 2 with sam.candidates=all
        ("status", pa.string()),  # ok | error (an invalid prompt)
        ("error", pa.string()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("det_score", pa.float32()),
        ("mask_score", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("area", pa.int64()),
        ("mask", MASK_TYPE),
    ]
)


class SegmentOOM(ImageError):
    """The GPU ran out of memory on this image even with the smallest decoder batches."""

    def __init__(self, message: str):
        super().__init__("oom", message)


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_dtype(requested: str, device) -> str:
    """``sam.dtype=auto``: bfloat16 autocast on CUDA, float32 elsewhere (bf16 is slow on CPUs)."""
    if requested == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return requested


def autocast(dtype: str, device):
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SamModel:
    """One SAM 2.1 image predictor with its device, dtype and thread settings; shared by the Ray
    segment stage, ``autolabel predict`` and the Python API."""

    def __init__(self, cfg: SamConfig, cpu_threads: Optional[int] = None):
        import torch

        from .models import build_sam_predictor, pick_device, resolve_sam_checkpoint

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif cpu_threads:
            # Ray pins a fractional-CPU actor to one thread; on a CPU-only node SAM is the
            # bottleneck by far, so it gets the threads the job planned for it.
            torch.set_num_threads(min(cpu_threads, os.cpu_count() or 1))
        self.weights = resolve_sam_checkpoint(cfg.size, cfg.checkpoint)
        self.predictor = build_sam_predictor(self.weights, cfg.image_size, self.device)
        self.faults = InjectedFaults.from_env()
        self._uri: Optional[str] = None  # the image being segmented, for test faults
        if self.faults:
            self._inject_test_faults()
        log.info("SAM 2.1 %s (%s) on %s, %s", cfg.size, self.weights.path or "random weights", self.device, self.dtype)

    def segment(self, image: np.ndarray, prompts: list[Prompt], multimask=None, uri: Optional[str] = None) -> list[Optional[Candidates]]:
        """One encoder pass for ``image``, then every valid prompt through the decoder.

        ``multimask`` None follows ``sam.multimask``. Out of GPU memory, the decoder batches are
        halved until one prompt at a time (the answers do not depend on the batching); the
        encoder is retried once. ``SegmentOOM`` when that is still too much.
        """
        import torch

        if not any(p.error is None for p in prompts):
            return [None] * len(prompts)
        self._uri = uri
        policy = self.cfg.multimask if multimask is None else multimask
        with torch.inference_mode(), autocast(self.dtype, self.device):
            for attempt in (1, 2):
                try:
                    self.predictor.set_image(image)
                    break
                except torch.OutOfMemoryError as exc:
                    _free_gpu_memory()
                    if attempt == 2:
                        raise SegmentOOM(f"out of GPU memory in the image encoder ({_short(exc)})") from None
            chunk = self.cfg.box_chunk
            while True:
                try:
                    return run_prompts(self.predictor, prompts, chunk, policy)
                except torch.OutOfMemoryError as exc:
                    _free_gpu_memory()
                    if chunk == 1:
                        raise SegmentOOM(
                            f"out of GPU memory even one prompt at a time ({len(prompts)} prompts; {_short(exc)})"
                        ) from None
                    log.warning("out of GPU memory with %d prompts per decoder call on %s; retrying with %d", chunk, uri or "an image", chunk // 2)
                    chunk //= 2

    def _inject_test_faults(self) -> None:
        """TEST ONLY (``AUTOLABEL_TEST_FAULTS``): make the decoder raise CUDA OOM on demand."""
        real_predict = self.predictor.predict

        def predict(**kwargs):
            batched = next((v for k, v in kwargs.items() if k in ("box", "point_coords", "mask_input") and v is not None), None)
            self.faults.maybe_oom(self._uri, 1 if batched is None else len(batched))
            return real_predict(**kwargs)

        self.predictor.predict = predict


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def object_rows(prompts: list[Prompt], answers: list[Optional[Candidates]], keep_all: bool) -> list[dict]:
    """Prompts and SAM's answers -> objects-table rows (error rows for rejected prompts)."""
    rows = []
    for object_id, (prompt, answer) in enumerate(zip(prompts, answers)):
        base = {
            "object_id": object_id, "object_key": prompt.object_key, "source": prompt.source, "prompt": prompt.kind,
            "class_id": prompt.class_id, "class_name": prompt.class_name, "det_score": prompt.det_score,
        }
        if answer is None:
            rows.append({**base, "candidate": 0, "status": "error", "error": prompt.error or "not segmented",
                         "mask_score": None, "box": None, "area": None, "mask": None})
            continue
        count = len(answer.scores) if keep_all else 1
        rles = mask_codec.encode(answer.masks[:count])
        for rank in range(count):
            mask = answer.masks[rank]
            rows.append({
                **base, "candidate": rank, "status": "ok", "error": None, "mask_score": float(answer.scores[rank]),
                "box": [float(v) for v in prompt.box] if prompt.box is not None else _bbox(mask),
                "area": int(mask.sum()), "mask": rles[rank],
            })
    return rows


class Segmenter:
    """Constructed once per actor (one per GPU); ``__call__`` adds an ``objects`` column.

    Prompts per image: the detector's boxes (``prompts.source`` detector or both) followed by the
    manifest's objects (manifest or both), all answered after one encoder pass.
    """

    def __init__(self, cfg: SamConfig, class_names: dict[int, str], cpu_threads: Optional[int] = None,
                 storage_options: Optional[dict] = None, ledger=None, max_image_crashes: int = 3):
        self.sam = SamModel(cfg, cpu_threads)
        self.class_names = class_names
        self.class_ids = {name: cid for cid, name in class_names.items()}
        self.storage_options = storage_options
        self.keep_all = cfg.candidates == "all"
        self.guard = CrashGuard(ledger, "segment", max_image_crashes)

    def prompts_for(self, row: dict) -> list[Prompt]:
        prompts = [
            Prompt(box=np.asarray(box, np.float32), class_id=cls, class_name=self.class_names.get(cls, str(cls)),
                   det_score=score, source="detector")
            for box, cls, score in zip(row.get("det_boxes") or [], row.get("det_class_ids") or [], row.get("det_scores") or [])
        ]
        if row.get("prompts"):
            prompts += manifest_prompts(row["prompts"], row.get("base_uri"), row["width"], row["height"],
                                        self.class_ids, self.storage_options)
        return prompts

    def __call__(self, batch: pa.Table) -> pa.Table:
        wanted = [c for c in ("uri", "status", "width", "height", "det_boxes", "det_class_ids", "det_scores", "prompts",
                              "base_uri") if c in batch.column_names]
        rows = batch.select(wanted).to_pylist()
        pixels = batch.column("pixels")
        objects_per_image = []
        errors: dict[int, ImageError] = {}  # images that fail here become error rows
        for i, row in enumerate(rows):
            if row["status"] != "ok":
                objects_per_image.append([])
                continue
            if not self.guard.start(row["uri"]):  # this image killed the worker again and again
                errors[i] = self.guard.crash_error()
                objects_per_image.append([])
                continue
            if self.sam.faults:
                self.sam.faults.maybe_kill("segment", row["uri"])
            prompts = self.prompts_for(row)
            try:
                image = pixels_of(pixels[i].as_py(), row["width"], row["height"]) if prompts else None
                answers = self.sam.segment(image, prompts, uri=row["uri"]) if prompts else []
            except SegmentOOM as exc:
                errors[i] = exc
                objects_per_image.append([])
                continue
            objects_per_image.append(object_rows(prompts, answers, self.keep_all))
        self.guard.done()
        batch = with_errors(batch, errors)
        batch = batch.drop_columns([c for c in ("pixels", "det_boxes", "det_class_ids", "det_scores", "prompts", "base_uri")
                                    if c in batch.column_names])
        return batch.append_column(pa.field("objects", pa.list_(OBJECT_TYPE)), pa.array(objects_per_image, type=pa.list_(OBJECT_TYPE)))
