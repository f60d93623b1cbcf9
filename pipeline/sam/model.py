"""SAM 2.1 in batches: several images through the image encoder at once, the prompts of all of
them through the mask decoder together, every mask finished on the model's device, and one copy
to the host per encoder batch.

The arithmetic is the SAM 2 tutorial's (``SAM2ImagePredictor.set_image`` + ``predict``), done
so that a GPU stays busy: images are resized and normalised on the device (antialiased
bilinear, exactly ``SAM2Transforms``), ``sam.batch_size`` of them per encoder pass; prompts of
one shape are gathered across those images (each with its own image's features) into decoder
calls of ``sam.box_chunk``; the low-res logits are upsampled, thresholded and reduced to area,
box, stability and COCO run boundaries on the device (sam/reduction.py). Nothing in the device
loop waits for the device until the batch's one packed copy to the host; what is left (quality
metrics, clean-up, RLE strings) is host work (sam/host_work.py), which the segment stage runs on
a thread pool while this loop issues the next batch. Only scores and run boundaries reach the
host, so memory per image stays bounded however many objects it holds.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from pipeline.config import QaConfig, SamConfig
from pipeline.io.decode import ImageError
from pipeline.sam import reduction
from pipeline.sam.host_work import Candidates, Pending, finish, rles_of
from pipeline.sam.prompts import Prompt
from pipeline.sam.reduction import MASK_PIXELS, stability_score
from pipeline.run.timings import StageClock

__all__ = ["Candidates", "MASK_PIXELS", "SamModel", "SegmentOOM", "rles_of", "stability_score"]  # their old home

log = logging.getLogger(__name__)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM2Transforms' normalisation


class SegmentOOM(ImageError):
    """The GPU ran out of memory on this image even one image and one prompt at a time."""

    def __init__(self, message: str):
        super().__init__("oom", message)


def resolve_dtype(requested: str, device) -> str:
    """``sam.dtype=auto``: bfloat16 autocast on CUDA, float32 elsewhere (bf16 is slow on CPUs).
    ``device``: a torch.device or its type ("cuda", "cpu")."""
    if requested == "auto":
        return "bfloat16" if getattr(device, "type", device) == "cuda" else "float32"
    return requested


def autocast(dtype: str, device):
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warn_if_ray_gpu_is_not_visible(device) -> None:
    """Ray gave this actor a GPU but torch runs on the CPU: a node without a working CUDA setup."""
    try:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker
        gpu_ids = []
    if gpu_ids and device.type != "cuda":
        log.warning("Ray gave this actor GPU %s, but torch sees no CUDA device: SAM runs on the CPU here", gpu_ids)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


@dataclass
class _Job:
    """One valid prompt of one image in the batch."""

    image: int  # index into the encoder batch
    index: int  # position in that image's prompt list
    prompt: Prompt
    multi: bool


class SamModel:
    """One SAM 2.1 model with its device, dtype and thread settings; shared by the Ray segment
    stage, ``autolabel predict`` and the Python API."""

    def __init__(self, cfg: SamConfig, cpu_threads: Optional[int] = None, qa: Optional[QaConfig] = None,
                 expected_sha256: Optional[str] = None):
        import torch

        from pipeline.run.faults import InjectedFaults
        from pipeline.models.weights import build_sam_model, pick_device, resolve_sam_checkpoint

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device.type == "cpu" and cpu_threads:
            # Ray pins a fractional-CPU actor to one thread; on a CPU-only node SAM is the
            # bottleneck by far, so it gets the threads the job planned for it.
            torch.set_num_threads(min(cpu_threads, os.cpu_count() or 1))
        _warn_if_ray_gpu_is_not_visible(self.device)
        # expected_sha256: the driver's copy's digest, so every node runs the very same weights
        self.weights = resolve_sam_checkpoint(cfg.size, cfg.checkpoint, expected_sha256, cfg.storage_options)
        self.model = build_sam_model(self.weights, cfg.image_size, self.device, compile_encoder=cfg.compile)
        self.qa = qa  # quality metrics and clean-up of every mask (None: masks only)
        self.size = cfg.image_size
        self.low_res = cfg.image_size // 4
        self.feat_sizes = [(self.size // 4,) * 2, (self.size // 8,) * 2, (self.size // 16,) * 2]
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        # A fixed encoder batch on a GPU (the last one padded to the current step): one shape for
        # cuDNN and torch.compile, until an out-of-memory halves the step.
        self.pad_batches = self.device.type == "cuda" or cfg.compile
        # Masks reduced to run boundaries with torch on a GPU; on a CPU pycocotools' C encoder is cheaper.
        self.reduce_on_device = self.device.type == "cuda"
        self.faults = InjectedFaults.from_env()
        self.clock = StageClock()  # encode and masks seconds, for the stage timings
        self.busy_s = 0.0  # seconds the device spent in the model (CUDA events on a GPU), for its busy fraction
        self._events: list = []
        log.info("SAM 2.1 %s (%s) on %s, %s, %d images per encoder pass%s", cfg.size, self.weights.path or "random weights",
                 self.device, self.dtype, cfg.batch_size, ", compiled" if cfg.compile else "")

    # ------------------------------------------------------------------ one image (API, predict)

    def segment(self, image: np.ndarray, prompts: list[Prompt], multimask=None, uri: Optional[str] = None) -> list[Optional[Candidates]]:
        """One image, every candidate, with low-res logits (the Python API and ``autolabel predict``)."""
        (answer,) = self.segment_batch([image], [prompts], multimask, [uri], keep_all=True, keep_logits=True)
        if isinstance(answer, SegmentOOM):
            raise answer
        return answer

    # ------------------------------------------------------------------ many images

    def segment_batch(self, images: Sequence[np.ndarray], prompts: Sequence[list[Prompt]], multimask=None,
                      uris: Optional[Sequence[Optional[str]]] = None, keep_all: bool = False,
                      keep_logits: bool = False, pad: bool = True, pending: bool = False) -> list:
        """Answer every valid prompt of every image: per image a list (None for rejected
        prompts), or a ``SegmentOOM`` when the GPU ran out of memory on that image even alone.

        ``multimask`` None follows ``sam.multimask``; ``keep_all`` keeps all three candidates of
        a multimask prompt (else the best one), ``keep_logits`` the low-res logits too; ``pad``
        False pads no encoder batch (one image at a time after a worker crash: no extra memory).
        Answers are ``Candidates``; with ``pending``, ``host_work.Pending`` answers whose host
        work (quality metrics, clean-up: ``host_work.finish``) the caller does, off this loop.

        An encoder pass out of GPU memory halves the images per pass (padding follows the step,
        so the pass really shrinks) down to one image, which is tried once more after the cache
        was emptied; each retry starts after the failed pass's tensors were released.
        """
        import torch

        uris = list(uris) if uris is not None else [None] * len(images)
        policy = self.cfg.multimask if multimask is None else multimask
        results: list = [[None] * len(p) for p in prompts]
        wanted = [i for i, p in enumerate(prompts) if any(q.error is None for q in p)]
        with torch.inference_mode(), autocast(self.dtype, self.device):
            step = self.cfg.batch_size
            start = 0
            retried = False  # the lone image at ``start`` failed once already
            while start < len(wanted):
                group = wanted[start:start + step]
                features, oom = self._try_encode([images[i] for i in group], step if pad else None)
                if features is None:
                    _free_gpu_memory()  # outside the handler: the failed pass's tensors are gone now
                    passed = max(len(group), step if pad and self.pad_batches else 0)  # images in the pass, padding included
                    if passed > 1:
                        step = max(1, passed // 2)
                        log.warning("out of GPU memory encoding %d images at once; retrying %d at a time", passed, step)
                    elif not retried:  # one image alone, once more after emptying the cache
                        retried = True
                    else:
                        results[group[0]] = SegmentOOM(f"out of GPU memory in the image encoder ({oom})")
                        retried = False
                        start += 1
                    continue
                retried = False
                jobs = [_Job(k, j, p, self._multimask_for(p, policy)) for k, i in enumerate(group)
                        for j, p in enumerate(prompts[i]) if p.error is None]
                answers, failed = self._decode(features, jobs, [uris[i] for i in group], keep_all, keep_logits)
                for k, i in enumerate(group):
                    if k in failed:
                        results[i] = failed[k]
                for job, answer in zip(jobs, answers):
                    if job.image not in failed:
                        results[group[job.image]][job.index] = answer
                del features
                start += len(group)
        self._settle()
        if not pending:
            results = [r if isinstance(r, SegmentOOM) else [finish(a, self.qa) for a in r] for r in results]
        return results

    def _event(self):
        """A timing event recorded on the model's device's current stream (not the current
        device's: ``predict --device cuda:1`` runs on GPU 1 while GPU 0 is current)."""
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _mark(self):
        """A start mark for ``_elapsed``: a CUDA event on a GPU (its work is asynchronous)."""
        if self.device.type == "cuda":
            return self._event()
        return time.perf_counter()

    def _elapsed(self, started, stage: str) -> None:
        """Add the time since ``started`` to ``stage`` and ``busy_s``; on a GPU device time,
        read once the batch is done (``_settle``), so timing never makes the host wait."""
        if self.device.type == "cuda":
            self._events.append((stage, started, self._event()))
            return
        seconds = time.perf_counter() - started
        self.clock.add(stage, seconds)
        self.busy_s += seconds

    def _settle(self) -> None:
        for stage, started, end in self._events:
            end.synchronize()
            seconds = started.elapsed_time(end) / 1000.0
            self.clock.add(stage, seconds)
            self.busy_s += seconds
        self._events.clear()

    @staticmethod
    def _multimask_for(prompt: Prompt, policy) -> bool:
        return prompt.wants_multimask() if policy == "auto" else bool(policy)

    # ------------------------------------------------------------------ encoder

    def _preprocess(self, image: np.ndarray):
        """HxWx3 uint8 -> 1x3xSxS normalised, on the device: ``SAM2Transforms`` (ToTensor,
        antialiased bilinear resize, Normalize) computed where the model is."""
        import torch
        import torch.nn.functional as F

        # from_numpy shares the array's memory, and a decoded image is read-only (Pillow's buffer):
        # torch warns about a tensor over memory it may not write, so such an image is copied.
        pixels = torch.from_numpy(np.require(image, requirements=("C_CONTIGUOUS", "WRITEABLE")))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        x = pixels.permute(2, 0, 1).contiguous()[None].float() / 255.0  # contiguous, as ToTensor makes it: the same conv kernels
        x = F.interpolate(x, (self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def _try_encode(self, images: list[np.ndarray], pad_to: Optional[int]) -> tuple[Optional[dict], Optional[str]]:
        """``_encode``, or (None, what the GPU said) when out of memory; the exception and its
        traceback (holding the failed pass's tensors) are gone on return, so the caller frees."""
        import torch

        try:
            return self._encode(images, pad_to), None
        except torch.OutOfMemoryError as exc:
            return None, _short(exc)

    def _encode(self, images: list[np.ndarray], pad_to: Optional[int] = None) -> dict:
        """``set_image_batch``'s features for these images; with ``pad_batches``, the batch is
        padded with blank images to ``pad_to`` (the current encoder step)."""
        import torch

        started = self._mark()
        batch = torch.cat([self._preprocess(im) for im in images])
        if self.pad_batches and pad_to and len(images) < pad_to:
            batch = torch.cat([batch, batch.new_zeros(pad_to - len(images), *batch.shape[1:])])
        backbone_out = self.model.forward_image(batch)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        n = batch.shape[0]
        feats = [feat.permute(1, 2, 0).view(n, -1, *size) for feat, size in zip(vision_feats[::-1], self.feat_sizes[::-1])][::-1]
        self._elapsed(started, "encode")
        return {"image_embed": feats[-1][: len(images)], "high_res_feats": [f[: len(images)] for f in feats[:-1]],
                "orig_hw": [im.shape[:2] for im in images]}

    # ------------------------------------------------------------------ decoder

    def _decode(self, features: dict, jobs: list[_Job], uris: list, keep_all: bool, keep_logits: bool) -> tuple[list, dict]:
        """All prompts of the encoded images through the decoder, grouped by shape across images,
        ``sam.box_chunk`` at a time; a chunk out of GPU memory is split in halves down to one
        prompt, and an image whose single prompt still does not fit is failed on its own. Every
        call's masks reach the host together, in one copy (``reduction.to_host``), as ``Pending``
        answers."""
        import torch

        answers: list[Optional[Pending]] = [None] * len(jobs)
        failed: dict[int, SegmentOOM] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for n, job in enumerate(jobs):
            p = job.prompt
            # SAM's decoder only batches mask-only prompts as a single object (no batched points)
            groups[(p.signature, job.multi, n if p.signature == (False, 0, True) else None)].append(n)
        chunk = self.cfg.box_chunk
        queue = [members[i:i + chunk] for members in groups.values() for i in range(0, len(members), chunk)]
        issued = []  # (device chunk, its jobs' slots)
        while queue:
            part = [n for n in queue.pop(0) if jobs[n].image not in failed]
            if not part:
                continue
            try:
                issued.append((self._decode_chunk(features, [jobs[n] for n in part], [uris[jobs[n].image] for n in part],
                                                  keep_all, keep_logits), part))
                continue
            except torch.OutOfMemoryError as exc:
                oom = _short(exc)
            _free_gpu_memory()  # after the handler, as for the encoder: the failed call's tensors are released
            if len(part) > 1:
                log.warning("out of GPU memory with %d prompts per decoder call; retrying with %d", len(part), len(part) // 2)
                queue[:0] = [part[: len(part) // 2], part[len(part) // 2:]]
                continue
            image = jobs[part[0]].image
            count = sum(j.image == image for j in jobs)
            failed[image] = SegmentOOM(f"out of GPU memory even one prompt at a time ({count} prompts; {oom})")
        for host, (_, part) in zip(self._to_host([c for c, _ in issued]), issued):
            for n, slot in enumerate(part):
                answers[slot] = Pending(host, n)
        return answers, failed

    def _to_host(self, chunks: list) -> list:
        """The device chunks of one encoder batch -> ``HostChunk``s: one copy, one sync."""
        return reduction.to_host(chunks, self.device)

    def _upload(self, array, dtype):
        """A host array -> a tensor on the device, without waiting for it (pinned, non-blocking on a GPU)."""
        import torch

        tensor = torch.as_tensor(array, dtype=dtype)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _prompt_tensors(self, jobs: list[_Job], orig_hw: list):
        """The tutorial's ``_prep_prompts`` + the box/point concatenation of ``_predict``, for
        prompts of several images (each scaled by its own image's size). Built on the host and
        uploaded without waiting (``_upload``), so the device loop never waits here."""
        import torch

        # (x / w) * size, in this order, as SAM2Transforms.transform_coords computes it (bit for bit)
        wh = self._upload([[orig_hw[j.image][1], orig_hw[j.image][0]] for j in jobs], torch.float32)[:, None, :]
        coords, labels = [], []
        first = jobs[0].prompt
        if first.box is not None:
            boxes = self._upload(np.stack([j.prompt.box for j in jobs]), torch.float32)
            coords.append(boxes.reshape(-1, 2, 2) / wh * self.size)
            labels.append(self._upload(np.tile(np.array([[2, 3]], np.int32), (len(jobs), 1)), torch.int))
        if first.points is not None:
            points = self._upload(np.stack([j.prompt.points for j in jobs]), torch.float32)
            coords.append(points / wh * self.size)
            labels.append(self._upload(np.stack([j.prompt.point_labels for j in jobs]), torch.int))
        points = (torch.cat(coords, dim=1), torch.cat(labels, dim=1)) if coords else None
        masks = None
        if first.has_mask:
            from pipeline.sam.prompts import mask_to_logits

            masks = self._upload(np.stack([mask_to_logits(j.prompt.mask, self.low_res) if j.prompt.mask is not None
                                           else j.prompt.mask_input[None] for j in jobs]), torch.float32)
        return points, masks

    def _decode_chunk(self, features: dict, jobs: list[_Job], uris: list, keep_all: bool, keep_logits: bool) -> reduction.DeviceChunk:
        """One decoder call and its masks' reduction, issued on the device (nothing waited for)."""
        import torch

        if self.faults:
            self.faults.maybe_oom(uris, len(jobs))
        started = self._mark()
        points, mask_input = self._prompt_tensors(jobs, features["orig_hw"])
        sparse, dense = self.model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        # Each prompt's own image's features, laid out in memory as the tutorial's predict passes
        # them (a view for one prompt; a contiguous copy, as its repeat_interleave makes, for
        # several), so the same kernels run and the logits agree to the last bit.
        if len(jobs) == 1:
            k = jobs[0].image
            embed, high_res = features["image_embed"][k:k + 1], [level[k:k + 1] for level in features["high_res_feats"]]
        else:
            index = self._upload([j.image for j in jobs], torch.int64)
            embed = features["image_embed"].index_select(0, index)
            high_res = [level.index_select(0, index) for level in features["high_res_feats"]]
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=embed,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=jobs[0].multi,
            repeat_image=False,
            high_res_features=high_res,
        )
        low_res, iou = low_res.float(), iou.float()
        order = torch.sort(-iou, dim=1, stable=True).indices  # candidates best first
        if not keep_all:
            order = order[:, :1]
        low_res = torch.gather(low_res, 1, order[:, :, None, None].expand(-1, -1, *low_res.shape[-2:]))
        scores = torch.gather(iou, 1, order)
        sizes = [tuple(int(v) for v in features["orig_hw"][j.image]) for j in jobs]
        chunk = reduction.reduce(low_res, scores, sizes, [j.prompt.box for j in jobs], self.reduce_on_device,
                                 self.qa is not None, keep_logits)
        self._elapsed(started, "masks")
        return chunk
