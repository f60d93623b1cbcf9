"""SAM prompts: what one object asks for (points, box, box+points, prior mask), checked.

Both the Ray segment stage and ``autolabel predict`` / the Python API turn their inputs into
``Prompt`` objects and hand them to ``SamModel`` (sam/model.py), so there is one implementation
of how prompts reach SAM's decoder.
"""
from __future__ import annotations

import json
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
    mask_input: Optional[np.ndarray] = None  # (h, w) low-res logits from an earlier answer, passed to SAM as they are
    object_key: Optional[str] = None
    class_id: Optional[int] = None
    class_name: Optional[str] = None
    det_score: Optional[float] = None
    source: str = "manifest"  # or "detector"
    error: Optional[str] = None  # set when the prompt was rejected

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.mask_input is not None

    @property
    def kind(self) -> str:
        parts = [name for name, present in (("box", self.box is not None), ("points", self.points is not None), ("mask", self.has_mask)) if present]
        return "+".join(parts) or "none"

    @property
    def signature(self) -> tuple:
        """Prompts with equal signatures can share one batched decoder call."""
        return (self.box is not None, 0 if self.points is None else len(self.points), self.has_mask)

    def wants_multimask(self) -> bool:
        """The SAM 2 tutorial's advice: three candidates for a lone point, one mask otherwise."""
        return self.box is None and not self.has_mask and self.points is not None and len(self.points) == 1


def _numbers(value: Any, what: str, example: str) -> np.ndarray:
    """``value`` as a finite float32 array, or a PromptError naming ``what`` (never a crash)."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be numbers, e.g. {example}, got {_shown(value)}") from None
    if array.dtype == object or not np.isfinite(array).all():
        raise PromptError(f"{what} must be finite numbers, e.g. {example}, got {_shown(value)}")
    return array


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_points(points: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    pts = _numbers(points, "points", "[[x, y], ...]")
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise PromptError(f"points must be a non-empty list of [x, y] pairs, got {_shown(points)}")
    if labels is None:
        raise PromptError("point_labels are required with points (1 = foreground, 0 = background)")
    lab = _numbers(labels, "point_labels", "[1, 0]")
    if lab.ndim != 1 or len(lab) != len(pts):
        raise PromptError(f"{len(pts)} points but {lab.size} point_labels")
    if not np.isin(lab, (0, 1)).all():
        raise PromptError(f"point_labels must be 0 (background) or 1 (foreground), got {_shown(labels)}")
    return pts, lab.astype(np.int32)


def check(prompt: Prompt, width: int, height: int) -> Prompt:
    """Reject what SAM would silently misread: coordinates outside the image, inverted boxes."""
    if prompt.points is None and prompt.box is None and not prompt.has_mask:
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


def load_mask(spec: Any, base_uri: Optional[str] = None, storage_options: Optional[dict] = None,
              roots: Optional[list[str]] = None) -> np.ndarray:
    """A prior mask from an RLE dict (``{"size", "counts"}``) or a PNG path (relative to the manifest).

    ``roots``: folders a mask path must lie under (the manifest's folder, ``input.uri``); None
    allows any path (``prompts.allow_any_uri``, and the Python API)."""
    from pipeline.io.locations import is_within, resolve_relative
    from pipeline.sam import masks as mask_codec

    if isinstance(spec, dict):
        try:
            return mask_codec.decode(spec)
        except Exception as exc:  # pycocotools raises several types for malformed RLE
            raise PromptError(f"mask RLE cannot be decoded: {exc}") from None
    if not isinstance(spec, str):
        raise PromptError(f"mask must be a file path or an RLE dict, got {type(spec).__name__}")
    import fsspec

    from pipeline.io.decode import open_image

    uri = resolve_relative(spec, base_uri)
    if roots is not None and not is_within(uri, roots, storage_options):
        raise PromptError(f"mask path {spec} is outside the manifest's folder; set prompts.allow_any_uri=true to allow it")
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            data = fh.read()
        with open_image(data) as img:
            return np.asarray(img.convert("L")) > 0
    except FileNotFoundError:
        raise PromptError(f"mask file not found: {spec}") from None
    except Exception as exc:
        raise PromptError(f"mask file {spec} cannot be read as an image: {exc}") from None


OBJECT_KEYS = ("object_key", "points", "point_labels", "box", "mask", "label")


def _text(obj: dict, name: str) -> Optional[str]:
    """``label`` / ``object_key``: text or absent (the manifest reader already turned numbers into text)."""
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise PromptError(f"{name} must be a string, got {_shown(value)}")
    return value


def from_manifest(obj: dict, base_uri: Optional[str], class_ids: dict[str, int], storage_options: Optional[dict] = None,
                  roots: Optional[list[str]] = None) -> Prompt:
    """One manifest object -> Prompt (or PromptError naming what is wrong)."""
    if not isinstance(obj, dict):
        raise PromptError(f"each object must be a mapping, got {_shown(obj)}")
    unknown = set(obj) - set(OBJECT_KEYS)
    if unknown:
        raise PromptError(f"unknown keys {sorted(map(str, unknown))}; allowed: {', '.join(OBJECT_KEYS)}")
    prompt = Prompt(object_key=_text(obj, "object_key"), class_name=_text(obj, "label"), source="manifest")
    prompt.class_id = class_ids.get(prompt.class_name) if prompt.class_name is not None else None
    if obj.get("points") is not None:
        prompt.points, prompt.point_labels = as_points(obj["points"], obj.get("point_labels"))
    elif obj.get("point_labels") is not None:
        raise PromptError("point_labels given without points")
    if obj.get("box") is not None:
        box = _numbers(obj["box"], "box", "[x0, y0, x1, y1]")
        if box.shape != (4,):
            raise PromptError(f"box must be [x0, y0, x1, y1], got {_shown(obj['box'])}")
        prompt.box = box
    if obj.get("mask") is not None:
        prompt.mask = load_mask(obj["mask"], base_uri, storage_options, roots)
    return prompt


def manifest_prompts(objects_json: Optional[str], base_uri: Optional[str], width: int, height: int,
                     class_ids: dict[str, int], storage_options: Optional[dict] = None,
                     roots: Optional[list[str]] = None) -> list[Prompt]:
    """All objects of one manifest line; invalid ones come back with ``error`` set (and their
    ``object_key``/``label`` kept only when they are text, so the error row itself is valid)."""
    prompts = []
    for obj in json.loads(objects_json) if objects_json else []:
        try:
            prompts.append(check(from_manifest(obj, base_uri, class_ids, storage_options, roots), width, height))
        except PromptError as exc:
            fields = obj if isinstance(obj, dict) else {}
            key, label = (v if isinstance(v, str) else None for v in (fields.get("object_key"), fields.get("label")))
            prompts.append(Prompt(object_key=key, class_name=label, class_id=class_ids.get(label), source="manifest", error=str(exc)))
    return prompts


def mask_to_logits(mask: np.ndarray, low_res: int) -> np.ndarray:
    """A binary prior mask (original pixels) -> (1, low_res, low_res) logits, as SAM's mask_input.

    SAM resizes the image to a square without keeping the aspect ratio, and so does this.
    """
    from PIL import Image

    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((low_res, low_res), Image.BILINEAR), np.float32) / 255.0
    return ((small - 0.5) * 2 * PRIOR_MASK_LOGIT)[None]
