"""Segment stage: a Ray actor holding one SAM 2.1 model (``sam/model.py``); prompts -> masks
-> objects-table rows.

Per batch of images: their pixels are decoded in threads as the batch arrives, the images go
through the encoder ``sam.batch_size`` at a time and their prompts through the decoder together,
and their masks reach the host in one copy per encoder batch. That is all the device loop does:
while it issues the next images, host threads (``HostPool``) finish each image's masks (quality
metrics, clean-up: sam/host_work.py) and turn them into COCO RLE strings and rows. At most
``2 * sam.batch_size`` images wait for the host, so memory stays flat when the host is the slower
side, and bounded per batch however many objects an image holds.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.sam import quality
from pipeline.config import QaConfig, SamConfig
from pipeline.run.console import worker_logging
from pipeline.io.decode import (ImageDecoder, ImageError, PixelBudget, decode_budget, fit_groups, pixels_or_error,
                                 with_errors)
from pipeline.run.faults import CrashGuard
from pipeline.sam.prompts import Prompt, manifest_prompts
from pipeline.sam.host_work import Candidates, HostPool, finish
from pipeline.sam.model import SamModel, SegmentOOM
from pipeline.run.timings import StageClock

log = logging.getLogger(__name__)

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
OBJECT_TYPE = pa.struct(
    [
        ("object_id", pa.int32()),
        ("object_key", pa.string()),  # the manifest's key; null for detector objects
        ("source", pa.string()),  # detector | manifest | automatic (automatic.enabled: no prompt, no class)
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
        # quality control (quality.py); null for error rows and when a run recorded none
        ("stability", pa.float32()),  # SAM's stability score
        ("box_iou", pa.float32()),  # the mask's tight box vs the prompt box (null without a box prompt)
        ("outside_box", pa.float32()),  # share of the mask outside the prompt box (null without a box prompt)
        ("regions", pa.int32()),  # connected regions
        ("largest_region", pa.float32()),  # the largest region's share of the area
        ("hole_area", pa.int64()),  # background pixels enclosed by the mask
        ("flags", pa.list_(pa.string())),  # low_score, unstable, leaks_box, fragmented, tiny, duplicate
        ("needs_review", pa.bool_()),
        ("duplicate_of", pa.int32()),  # status=duplicate: the object_id kept in its place
    ]
)
QUALITY_FIELDS = ("stability", "box_iou", "outside_box", "regions", "largest_region", "hole_area", "flags", "needs_review",
                  "duplicate_of")


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
                         "mask_score": None, "box": None, "area": None, "mask": None, **dict.fromkeys(QUALITY_FIELDS)})
            continue
        count = len(answer.scores) if keep_all else 1
        for rank in range(count):
            area = int(answer.areas[rank])
            row = {
                **base, "candidate": rank, "status": "ok", "error": None, "mask_score": float(answer.scores[rank]),
                "box": [float(v) for v in prompt.box] if prompt.box is not None else [float(v) for v in answer.boxes[rank]],
                "area": area, "mask": answer.rles[rank], **dict.fromkeys(QUALITY_FIELDS),
            }
            if answer.quality is not None:
                metrics = answer.quality[rank]
                box_iou, outside = quality.box_agreement(answer.boxes[rank], prompt.box, area, metrics["inside"] or 0)
                row.update(stability=metrics["stability"], box_iou=box_iou, outside_box=outside, regions=metrics["regions"],
                           largest_region=metrics["largest_region"], hole_area=metrics["hole_area"])
            rows.append(row)
    return rows


class Segmenter:
    """Constructed once per actor (one per GPU); ``__call__`` adds an ``objects`` column.

    Prompts per image: the detector's boxes (``prompts.source`` detector or both) followed by the
    manifest's objects (manifest or both), all answered after one encoder pass.
    """

    def __init__(self, cfg: SamConfig, class_names: dict[int, str], cpu_threads: Optional[int] = None,
                 storage_options: Optional[dict] = None, ledger=None, max_image_crashes: int = 3,
                 manifest_roots: Optional[list[str]] = None, max_pixels: Optional[int] = None, decode_threads: int = 4,
                 qa: Optional[QaConfig] = None, expected_sha256: Optional[str] = None, automatic: Optional[dict] = None,
                 host_threads: int = 2):
        worker_logging()
        self.qa = qa
        self.sam = SamModel(cfg, cpu_threads, qa, expected_sha256)
        if self.sam.device.type == "cuda":
            allow_tf32()  # this actor's process is the job's own: the setting stays inside it
        self.automatic = None  # automatic.enabled: segment everything (the generator's arguments), beside any manifest prompts
        if automatic is not None:
            from pipeline.sam.automatic import AutomaticArgs, AutomaticMaskGenerator

            self.automatic = AutomaticMaskGenerator(self.sam, AutomaticArgs(**automatic))
        self.cfg = cfg
        self.class_names = class_names
        self.class_ids = {name: cid for cid, name in class_names.items()}
        self.storage_options = storage_options
        self.manifest_roots = manifest_roots  # where manifest mask paths may point (None: anywhere)
        self.keep_all = cfg.candidates == "all"
        self.ledger, self.max_image_crashes = ledger, max_image_crashes  # a CrashGuard per call: two may be in flight
        self.entry = threading.Lock()  # calls start one at a time (a batch that runs alone holds it throughout)
        self.device_gate = threading.Lock()  # held by the one call that uses the device
        self.finishing = threading.Condition()  # calls started and not ended
        self.active = 0
        # decoded pixels held at once by all calls (sam.decode_ahead_mp; null: two encoder batches of 12-MP photos)
        self.pixels = PixelBudget(decode_budget(cfg.decode_ahead_mp, 2 * cfg.batch_size))
        self.decoder = ImageDecoder(decode_threads, max_pixels)
        # the host side of the images the device is done with (0 threads: in the device loop, one after the other)
        self.host = HostPool(host_threads, 2 * cfg.batch_size)
        self.clock = StageClock()
        self.identity = _actor_identity()
        self.started: Optional[float] = None

    def prompts_for(self, row: dict) -> list[Prompt]:
        prompts = [
            Prompt(box=np.asarray(box, np.float32), class_id=cls, class_name=self.class_names.get(cls, str(cls)),
                   det_score=score, source="detector")
            for box, cls, score in zip(row.get("det_boxes") or [], row.get("det_class_ids") or [], row.get("det_scores") or [])
        ]
        if row.get("prompts"):
            prompts += manifest_prompts(row["prompts"], row.get("base_uri"), row["width"], row["height"],
                                        self.class_ids, self.storage_options, self.manifest_roots)
        return prompts

    def _rows(self, prompts: list[Prompt], answers: list) -> list[dict]:
        """One image's objects-table rows from its answers (``Pending`` ones finished first: quality
        metrics and clean-up), with duplicates marked and flags set (a host thread)."""
        started = time.perf_counter()
        try:
            rows = object_rows(prompts, [finish(a, self.qa) for a in answers], self.keep_all)
            if self.qa is not None:
                quality.mark_duplicates(rows, self.qa)
                for row in rows:
                    quality.flag(row, self.qa)
            return rows
        finally:
            with self.host.lock:  # several host threads add to the one clock
                self.clock.add("rle", time.perf_counter() - started)

    def _add_automatic(self, images: list, prompts: list[list[Prompt]], answers: list, uris: list) -> list:
        """Each image's automatic masks after its prompts' answers (``prompts`` grows in place); an
        image out of GPU memory in either becomes that ``SegmentOOM``, the one error-row path."""
        found = self.automatic.generate_batch(images, uris=uris)
        out = []
        for own, answer, auto in zip(prompts, answers, found):
            if isinstance(answer, SegmentOOM) or isinstance(auto, SegmentOOM):
                out.append(answer if isinstance(answer, SegmentOOM) else auto)
                continue
            more_prompts, more_answers = auto.as_prompts()
            own.extend(more_prompts)
            out.append([*answer, *more_answers])
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One Ray batch. Two calls may run at once (the job's ``max_concurrent_calls_per_actor=2``):
        while one uses the device (``device_gate``), the next decodes its first images (within the
        actor's one pixel budget) and the one before finishes on the host, so the device waits
        neither for decoding nor for a batch's last images to be finished. A batch a worker died
        on runs alone (one image at a time, nothing else in flight), so an image that kills the
        worker is the only one blamed."""
        if self.started is None:
            self.started = time.perf_counter()
        wanted = [c for c in ("uri", "status", "width", "height", "det_boxes", "det_class_ids", "det_scores", "prompts",
                              "base_uri") if c in batch.column_names]
        rows = batch.select(wanted).to_pylist()
        objects: list = [[] for _ in rows]
        errors: dict[int, ImageError] = {}  # images that fail here become error rows
        guard = CrashGuard(self.ledger, "segment", self.max_image_crashes)
        self.entry.acquire()
        alone = counted = False
        try:
            ok = [i for i, row in enumerate(rows) if row["status"] == "ok"]
            # One ledger call for the batch, before any of its images is decoded; after a worker died
            # on it, one image at a time (faults.py), each decoded only once it is announced.
            whole = not ok or guard.start_batch([rows[i]["uri"] for i in ok])
            with self.finishing:
                if not whole:
                    alone = True
                    self.finishing.wait_for(lambda: self.active == 0)  # the other calls end first
                self.active += 1
                counted = True
            plan = self._plan(batch, rows, ok, whole)
        except BaseException:
            if counted:
                with self.finishing:
                    self.active -= 1
                    self.finishing.notify_all()
            self.entry.release()
            raise
        if not alone:
            self.entry.release()  # the next call may start decoding
        try:
            with self.device_gate:
                try:
                    built = self._segment(batch, rows, plan, whole, guard, errors)
                finally:
                    if whole:
                        plan[2].close()  # nothing held any more (a failed batch gives its pixels back)
                with self.host.lock:
                    for stage, seconds in self.sam.clock.spent.items():
                        self.clock.add(stage, seconds)
                    self.sam.clock.spent.clear()
            for i, future in built:
                objects[i] = future.result()
            guard.done()
        finally:
            with self.finishing:
                self.active -= 1
                self.finishing.notify_all()
            if alone:
                self.entry.release()
        batch = with_errors(batch, errors)
        batch = batch.drop_columns([c for c in ("data", "det_boxes", "det_class_ids", "det_scores", "prompts", "base_uri")
                                    if c in batch.column_names])
        batch = batch.append_column(pa.field("objects", pa.list_(OBJECT_TYPE)), pa.array(objects, type=pa.list_(OBJECT_TYPE)))
        with self.host.lock:
            self.clock.add("decode", self.decoder.take_seconds())
            batch = self.clock.stamp(batch)
        identity = {"sam_actor": self.identity[0], "sam_node": self.identity[1], "sam_dtype": self.sam.dtype,
                    "sam_busy_s": self.sam.busy_s, "sam_wall_s": time.perf_counter() - self.started}
        for name, value in identity.items():
            typ = pa.string() if isinstance(value, str) or value is None else pa.float64()
            batch = batch.append_column(name, pa.array([value] * batch.num_rows, typ))
        return batch

    def _plan(self, batch: pa.Table, rows: list[dict], ok: list[int], whole: bool) -> tuple:
        """Prompts, encoder groups, and (whole batches) their decoding started ahead of the device
        within the actor's pixel budget (``sam.decode_ahead_mp``: decoded pixels held at once, in
        the encoder and decoded ahead, by all calls; huge images make smaller encoder passes, and
        one image always goes)."""
        prompts = {i: self.prompts_for(rows[i]) for i in ok}
        need = [i for i in ok if prompts[i] or self.automatic is not None]
        sizes = {i: rows[i]["width"] * rows[i]["height"] for i in need}
        groups = fit_groups(need, sizes, self.cfg.batch_size, self.pixels.pixels) if whole else [[i] for i in need]
        pending = self.decoder.ahead(batch, groups, sizes, self.pixels) if whole else {}
        return prompts, groups, pending

    def _segment(self, batch: pa.Table, rows: list[dict], plan: tuple, whole: bool, guard: CrashGuard, errors: dict) -> list:
        """The device loop over one batch: encoder and decoder, masks to the host; each image's host
        work goes to the host threads. Returns (row index, future of its objects rows)."""
        prompts, groups, pending = plan
        built = []
        for group in groups:
            if not whole:
                if not guard.start(rows[group[0]]["uri"]):  # this image killed the worker again and again
                    errors[group[0]] = guard.crash_error()
                    continue
                pending.update(self.decoder.decode_rows(batch, group))
            if self.sam.faults:
                for i in group:
                    self.sam.faults.maybe_kill("segment", rows[i]["uri"])
            images = {}
            for i in group:
                pixels = pixels_or_error(pending.pop(i), (rows[i]["height"], rows[i]["width"]))
                if isinstance(pixels, ImageError):
                    errors[i] = pixels
                else:
                    images[i] = pixels
            order = list(images)
            # One image at a time after a crash: no padding either (a padded batch could be what killed the worker).
            answers = self.sam.segment_batch([images[i] for i in order], [prompts[i] for i in order],
                                             uris=[rows[i]["uri"] for i in order], keep_all=self.keep_all, pad=whole, pending=True)
            if self.automatic is not None:
                answers = self._add_automatic([images[i] for i in order], [prompts[i] for i in order], answers,
                                              [rows[i]["uri"] for i in order])
            images.clear()
            if whole:
                pending.release(group)  # the next images decode while these are finished
            for i, answer in zip(order, answers):
                if isinstance(answer, SegmentOOM):
                    errors[i] = answer
                else:
                    built.append((i, self.host.submit(self._rows, prompts[i], answer)))
        return built


def allow_tf32() -> None:
    """TF32 for float32 matmuls and convolutions (tensor-core speed on Ampere and newer, about
    1e-3 relative precision). These are process-wide settings: only the job's own SAM actors
    switch them on, never ``predict`` or a Python API user's process."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _actor_identity() -> tuple[Optional[str], Optional[str]]:
    """(actor id, node id) of this Ray actor, as Ray names them; (None, None) outside Ray (where
    ``ray.get_runtime_context`` would start a local Ray instance just to answer)."""
    try:
        import ray

        if not ray.is_initialized():
            return None, None
        context = ray.get_runtime_context()
        return context.get_actor_id() or None, context.get_node_id() or None
    except Exception:  # noqa: BLE001 - only for the record
        return None, None
