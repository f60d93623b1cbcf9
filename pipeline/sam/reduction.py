"""SAM's masks finished where they are made, and one copy to the host per encoder batch.

The mask decoder's low-res logits are upsampled to the image (``postprocess_masks``: bilinear),
thresholded at 0 and reduced on the model's device ``MASK_PIXELS`` at a time (``reduce``):
stability score, area, tight box and COCO run boundaries (``masks.device_stats``) on a GPU;
pycocotools on a CPU, where its C encoder is the cheaper reduction. Nothing there waits for the
device: run boundaries go into buffers of fixed capacity (``torch.nonzero_static``). Then
``to_host`` packs every tensor the host needs from an encoder batch into one buffer, copies it
into pinned memory with one non-blocking copy and synchronises once; a slice whose masks had more
run boundaries than its capacity (``RUNS_PER_COLUMN`` per image column and mask) is redone exactly
after that sync. What reaches the host is a ``HostChunk`` per decoder call (sam/host_work.py).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.sam import masks as mask_codec
from pipeline.sam.host_work import HostChunk

MASK_PIXELS = 1 << 26  # upsampled float32 logits per slice (256 MB), whatever the image size
RUNS_PER_COLUMN = 8  # run boundaries per image column and mask that a slice's buffer holds


def stability_score(logits, offset: float = 1.0):
    """SAM's stability score (``sam2.utils.amg.calculate_stability_score`` at threshold 0): the
    IoU of the mask at logit > +offset and > -offset; 1.0 for a mask empty at both (as SAM's
    decoder defines it)."""
    import torch

    inside = (logits > offset).sum(dim=(-2, -1), dtype=torch.int64)
    union = (logits > -offset).sum(dim=(-2, -1), dtype=torch.int64)
    return torch.where(union > 0, inside / union.clamp(min=1), torch.ones_like(inside, dtype=torch.float32))


@dataclass
class MaskSlice:
    """Masks of one size upsampled and reduced together: ``part`` lists (prompt, candidate)."""

    part: list
    size: tuple
    stability: object = None  # (m,) tensor, with quality control
    stats: Optional[dict] = None  # on the device: ``device_stats`` tensors (changes in a buffer of ``capacity``)
    capacity: int = 0
    rles: Optional[list] = None  # on a CPU: pycocotools' RLE dicts, areas and boxes already on the host
    areas: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None


@dataclass
class DeviceChunk:
    """One decoder call's answers, still on the device (nothing waited for)."""

    scores: object  # (n, C) tensor
    low_res: object  # (n, C, h, w) tensor: the masks' source, kept for a slice that must be redone
    sizes: list
    prompt_boxes: list
    slices: list = field(default_factory=list)
    logits: object = None  # (n, C, h, w) clamped tensor, when asked for


def reduce(low_res, scores, sizes: list, prompt_boxes: list, on_device: bool, stability: bool, keep_logits: bool) -> DeviceChunk:
    """(n, C, h, w) low-res logits -> a ``DeviceChunk``: upsampled to each image's size and
    thresholded ``MASK_PIXELS`` at a time, reduced (``on_device``: with torch, into fixed
    buffers; else pycocotools), with the stability score when ``stability``."""
    import torch

    chunk = DeviceChunk(scores, low_res, sizes, prompt_boxes)
    if keep_logits:
        chunk.logits = torch.clamp(low_res, -32.0, 32.0)
    c = low_res.shape[1]
    by_size: dict[tuple, list[int]] = defaultdict(list)
    for i, hw in enumerate(sizes):
        by_size[hw].append(i)
    for (h, w), members in by_size.items():
        flat = [(i, k) for i in members for k in range(c)]
        step = max(1, MASK_PIXELS // (h * w))
        for start in range(0, len(flat), step):
            part = flat[start:start + step]
            logits = _upsampled(low_res, part, (h, w))
            piece = MaskSlice(part, (h, w), stability=stability_score(logits) if stability else None)
            masks = logits > 0.0
            del logits
            if on_device:  # on a GPU: only run boundaries will cross to the host
                piece.capacity = len(part) * RUNS_PER_COLUMN * w
                piece.stats = mask_codec.device_stats(masks, capacity=piece.capacity)
            else:  # the host is the device: pycocotools' C encoder is the cheapest reduction here
                piece.rles = mask_codec.encode(masks.numpy())
                piece.areas = np.array([mask_codec.area(r) for r in piece.rles], np.int64)
                piece.boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (mask_codec.bbox_xywh(r) for r in piece.rles)],
                                       np.float32).reshape(-1, 4)
            del masks
            chunk.slices.append(piece)
    return chunk


def _upsampled(low_res, part: list, size: tuple):
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.stack([low_res[i, k] for i, k in part])[:, None], size, mode="bilinear", align_corners=False)[:, 0]


def to_host(chunks: list[DeviceChunk], device) -> list[HostChunk]:
    """Every tensor of these chunks to the host in one copy (pinned, non-blocking on a GPU) and
    one sync; then each chunk's masks as run boundaries (or RLE), areas and boxes."""
    tensors = []
    for chunk in chunks:
        tensors.append(chunk.scores)
        if chunk.logits is not None:
            tensors.append(chunk.logits)
        for piece in chunk.slices:
            if piece.stability is not None:
                tensors.append(piece.stability)
            if piece.stats is not None:
                tensors += [piece.stats[key] for key in ("area", "bbox", "first", "changes", "num_changes")]
    arrays = iter(_copy(tensors, device))
    out = []
    for chunk in chunks:
        scores = next(arrays)
        n, c = scores.shape
        logits = next(arrays) if chunk.logits is not None else None
        runs: list = [[None] * c for _ in range(n)]
        areas = np.zeros((n, c), np.int64)
        boxes = np.zeros((n, c, 4), np.float32)
        stability = np.zeros((n, c), np.float32) if any(p.stability is not None for p in chunk.slices) else None
        for piece in chunk.slices:
            if piece.stability is not None:
                piece_stability = next(arrays)
            if piece.stats is not None:
                stats = dict(zip(("area", "bbox", "first", "changes", "num_changes"), (next(arrays) for _ in range(5))))
                piece_runs = _runs(stats, piece, chunk.low_res)
                piece_areas, piece_boxes = stats["area"], stats["bbox"]
            else:
                piece_runs, piece_areas, piece_boxes = piece.rles, piece.areas, piece.boxes
            for m, (i, k) in enumerate(piece.part):
                runs[i][k] = piece_runs[m]
                areas[i, k] = piece_areas[m]
                boxes[i, k] = piece_boxes[m]
                if stability is not None:
                    stability[i, k] = piece_stability[m]
        out.append(HostChunk(scores, areas, boxes, runs, [tuple(s) for s in chunk.sizes], chunk.prompt_boxes, stability, logits))
    return out


def _runs(stats: dict, piece: MaskSlice, low_res) -> list:
    """Each mask's (first value, change positions); a slice whose boundaries overflowed its
    buffer is upsampled and reduced again, exactly (``nonzero``: this waits for the device)."""
    total = int(stats["num_changes"].sum())
    if total > piece.capacity:
        exact = mask_codec.device_stats(_upsampled(low_res, piece.part, piece.size) > 0.0)
        stats["changes"], stats["num_changes"] = exact["changes"].cpu().numpy(), exact["num_changes"].cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(stats["num_changes"])])
    return [(bool(stats["first"][m]), stats["changes"][offsets[m]:offsets[m + 1]]) for m in range(len(piece.part))]


_NUMPY = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8}


def _copy(tensors: list, device) -> list[np.ndarray]:
    """Tensors -> numpy arrays through one packed buffer: one copy to pinned host memory
    (non-blocking) and one sync on a GPU; the same packing, without a copy, on a CPU."""
    import torch

    if not tensors:
        return []
    parts, layout, offset = [], [], 0
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8  # every array starts 8-byte aligned
        parts.append(raw)
        if pad:
            parts.append(raw.new_zeros(pad))
        layout.append((offset, raw.numel(), _NUMPY[str(t.dtype).removeprefix("torch.")], tuple(t.shape)))
        offset += raw.numel() + pad
    packed = torch.cat(parts)
    if getattr(device, "type", device) == "cuda":
        host = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(packed.device))
        done.synchronize()  # the batch's one wait for the device
        packed = host
    buffer = packed.numpy()
    return [buffer[start:start + size].view(dtype).reshape(shape) for start, size, dtype, shape in layout]
