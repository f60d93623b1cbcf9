"""SAM prompts: what one object asks for (points, box, box+points, prior mask), checked and batched.

Both the Ray segment stage and ``autolabel predict`` / the Python API turn their inputs into
``Prompt`` objects and hand them to ``run_prompts``, so there is one implementation of how
prompts reach ``SAM2ImagePredictor.predict``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

PRIOR_MASK_LOGIT = 10.0  # a binary prior mask becomes logits of +-10: confidently in or out


class PromptError(ValueError):
    """One object's prompt is invalid; it becomes an error row, the others still run."""


@dataclass
class Prompt:
    points: Optional[np.ndarray] = None  # (K, 2) float32, x/y in original image pixels
    point_labels: Optional[np.ndarray] = None  # (K,) int32, 1 foreground / 0 background
    box: Optional[np.ndarray] = None  # (4,) float32 xyxy
    mask: Optional[np.ndarray] = None  # (H, W) bool prior mask in original pixels
    object_key: Optional[str] = None
    class_id: Optional[int] = None
    class_name: Optional[str] = None
    det_score: Optional[float] = None
    source: str = "manifest"  # or "detector"
    error: Optional[str] = None  # set when the prompt was rejected

    @property
    def kind(self) -> str:
        parts = [name for name, v in (("box", self.box), ("points", self.points), ("mask", self.mask)) if v is not None]
        return "+".join(parts) or "none"

    @property
    def signature(self) -> tuple:
        """Prompts with equal signatures can share one batched decoder call."""
        return (self.box is not None, 0 if self.points is None else len(self.points), self.mask is not None)

    def wants_multimask(self) -> bool:
        """The SAM 2 tutorial's advice: three candidates for a lone point, one mask otherwise."""
        return self.box is None and self.mask is None and self.points is not None and len(self.points) == 1


@dataclass
class Candidates:
    """SAM's answer for one prompt: masks ranked best first."""

    masks: np.ndarray  # (C, H, W) bool
    scores: np.ndarray  # (C,) float32, descending
    logits: np.ndarray  # (C, h, w) low-res logits, reusable as a mask prompt


def as_points(points: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise PromptError(f"points must be a non-empty list of [x, y] pairs, got {points!r}")
    if labels is None:
        raise PromptError("point_labels are required with points (1 = foreground, 0 = background)")
    lab = np.asarray(labels)
    if lab.ndim != 1 or len(lab) != len(pts):
        raise PromptError(f"{len(pts)} points but {lab.size} point_labels")
    if not np.isin(lab, (0, 1)).all():
        raise PromptError(f"point_labels must be 0 (background) or 1 (foreground), got {labels!r}")
    return pts, lab.astype(np.int32)


def check(prompt: Prompt, width: int, height: int) -> Prompt:
    """Reject what SAM would silently misread: coordinates outside the image, inverted boxes."""
    if prompt.points is None and prompt.box is None and prompt.mask is None:
        raise PromptError("an object needs points, a box or a mask")
    if prompt.points is not None:
        outside = (prompt.points[:, 0] < 0) | (prompt.points[:, 0] > width) | (prompt.points[:, 1] < 0) | (prompt.points[:, 1] > height)
        if outside.any():
            x, y = prompt.points[outside][0]
            raise PromptError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        if x1 <= x0 or y1 <= y0:
            raise PromptError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] needs x1 > x0 and y1 > y0")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise PromptError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is outside the {width}x{height} image")
    if prompt.mask is not None and prompt.mask.shape != (height, width):
        raise PromptError(f"mask is {prompt.mask.shape[1]}x{prompt.mask.shape[0]}, the image {width}x{height}")
    return prompt


def load_mask(spec: Any, base_uri: Optional[str] = None, storage_options: Optional[dict] = None) -> np.ndarray:
    """A prior mask from an RLE dict (``{"size", "counts"}``) or a PNG path (relative to the manifest)."""
    from . import masks as mask_codec

    if isinstance(spec, dict):
        try:
            return mask_codec.decode(spec)
        except Exception as exc:  # pycocotools raises several types for malformed RLE
            raise PromptError(f"mask RLE cannot be decoded: {exc}") from None
    if not isinstance(spec, str):
        raise PromptError(f"mask must be a file path or an RLE dict, got {type(spec).__name__}")
    import fsspec

    from .decode import open_image

    uri = spec if ("://" in spec or spec.startswith("/") or base_uri is None) else f"{base_uri.rstrip('/')}/{spec}"
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            data = fh.read()
        with open_image(data) as img:
            return np.asarray(img.convert("L")) > 0
    except FileNotFoundError:
        raise PromptError(f"mask file not found: {spec}") from None
    except Exception as exc:
        raise PromptError(f"mask file {spec} cannot be read as an image: {exc}") from None


def from_manifest(obj: dict, base_uri: Optional[str], class_ids: dict[str, int], storage_options: Optional[dict] = None) -> Prompt:
    """One manifest object -> Prompt (or PromptError naming what is wrong)."""
    if not isinstance(obj, dict):
        raise PromptError(f"each object must be a mapping, got {obj!r}")
    unknown = set(obj) - {"object_key", "points", "point_labels", "box", "mask", "label"}
    if unknown:
        raise PromptError(f"unknown keys {sorted(unknown)}; allowed: object_key, points, point_labels, box, mask, label")
    prompt = Prompt(object_key=obj.get("object_key"), class_name=obj.get("label"), source="manifest")
    prompt.class_id = class_ids.get(prompt.class_name) if prompt.class_name is not None else None
    if obj.get("points") is not None:
        prompt.points, prompt.point_labels = as_points(obj["points"], obj.get("point_labels"))
    elif obj.get("point_labels") is not None:
        raise PromptError("point_labels given without points")
    if obj.get("box") is not None:
        box = np.asarray(obj["box"], dtype=np.float32)
        if box.shape != (4,):
            raise PromptError(f"box must be [x0, y0, x1, y1], got {obj['box']!r}")
        prompt.box = box
    if obj.get("mask") is not None:
        prompt.mask = load_mask(obj["mask"], base_uri, storage_options)
    return prompt


def manifest_prompts(objects_json: Optional[str], base_uri: Optional[str], width: int, height: int,
                     class_ids: dict[str, int], storage_options: Optional[dict] = None) -> list[Prompt]:
    """All objects of one manifest line; invalid ones come back with ``error`` set."""
    prompts = []
    for i, obj in enumerate(json.loads(objects_json) if objects_json else []):
        try:
            prompts.append(check(from_manifest(obj, base_uri, class_ids, storage_options), width, height))
        except PromptError as exc:
            key = obj.get("object_key") if isinstance(obj, dict) else None
            label = obj.get("label") if isinstance(obj, dict) else None
            prompts.append(Prompt(object_key=key, class_name=label, class_id=class_ids.get(label), source="manifest", error=str(exc)))
    return prompts


def mask_to_logits(mask: np.ndarray, low_res: int) -> np.ndarray:
    """A binary prior mask (original pixels) -> (1, low_res, low_res) logits, as SAM's mask_input.

    SAM resizes the image to a square without keeping the aspect ratio, and so does this.
    """
    from PIL import Image

    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((low_res, low_res), Image.BILINEAR), np.float32) / 255.0
    return ((small - 0.5) * 2 * PRIOR_MASK_LOGIT)[None]


def _multimask_for(prompt: Prompt, policy: Any) -> bool:
    return prompt.wants_multimask() if policy == "auto" else bool(policy)


def run_prompts(predictor, prompts: list[Prompt], chunk: int, multimask: Any = "auto") -> list[Optional[Candidates]]:
    """Answer every valid prompt on the image already set; ``None`` for rejected prompts.

    Prompts with the same shape (box or not, number of points, mask or not) and the same
    multimask choice go through the decoder together, ``chunk`` at a time.
    """
    h, w = predictor._orig_hw[-1]
    low_res = predictor.model.image_size // 4
    results: list[Optional[Candidates]] = [None] * len(prompts)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if p.error is None:
            # SAM's decoder only batches mask-only prompts as a single object (no batched points)
            key = (p.signature, _multimask_for(p, multimask), i if p.signature == (False, 0, True) else None)
            groups[key].append(i)
    for (signature, multi, _), members in groups.items():
        for start in range(0, len(members), chunk):
            part = [prompts[i] for i in members[start : start + chunk]]
            n = len(part)
            kwargs = {}
            if part[0].points is not None:
                kwargs["point_coords"] = np.stack([p.points for p in part])
                kwargs["point_labels"] = np.stack([p.point_labels for p in part])
            if part[0].box is not None:
                kwargs["box"] = np.stack([p.box for p in part])
            if part[0].mask is not None:
                kwargs["mask_input"] = np.stack([mask_to_logits(p.mask, low_res) for p in part])
            masks, scores, logits = predictor.predict(multimask_output=multi, **kwargs)
            c = 3 if multi else 1
            masks = masks.reshape(n, c, h, w)
            scores = scores.reshape(n, c)
            logits = logits.reshape(n, c, *logits.shape[-2:])
            for j, i in enumerate(members[start : start + chunk]):
                order = np.argsort(-scores[j], kind="stable")
                results[i] = Candidates(masks[j][order] > 0, scores[j][order].astype(np.float32), logits[j][order])
    return results
