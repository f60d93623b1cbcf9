"""One image at a time: the notebook API (``Predictor``) and ``autolabel predict``.

Both go through ``sam_batch.SamModel``, the code the Ray job runs, so a mask made here is the
mask the pipeline would store for the same prompt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from pipeline.config import SamConfig
from pipeline.sam.prompts import Prompt, PromptError, as_points, check, load_mask
from pipeline.sam.model import Candidates

ImageLike = Union[str, Path, np.ndarray, "PIL.Image.Image"]


def load_image(image: ImageLike, storage_options: Optional[dict] = None) -> np.ndarray:
    """A path, fsspec URL, PIL image or HxWx3 array -> RGB uint8 (EXIF orientation applied)."""
    from PIL import Image

    from pipeline.io.decode import decode_rgb, oriented_rgb, read_bytes

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image arrays must be HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
        return image
    if isinstance(image, Image.Image):
        return oriented_rgb(image)  # the same EXIF orientation and mode handling as decoding a file
    return decode_rgb(read_bytes(str(image), storage_options))


class Predictor:
    """Load SAM 2.1 once, then segment many images with points, boxes or prior masks.

    >>> p = Predictor(size="tiny", checkpoint="checkpoints/sam2.1_hiera_tiny.pt")
    >>> result = p.predict("photo.jpg", points=[[500, 375]], point_labels=[1])
    >>> best = result.masks[0]          # (H, W) bool; result.scores are ranked best first

    Keyword arguments are ``sam.*`` config keys (size, checkpoint, image_size, dtype, device,
    multimask, box_chunk).
    """

    def __init__(self, config: Optional[SamConfig] = None, **sam_keys: Any):
        from pipeline.sam.model import SamModel

        base = (config or SamConfig()).model_dump()
        self.config = SamConfig(**{**base, **sam_keys})
        self.model = SamModel(self.config)

    def predict(
        self,
        image: ImageLike,
        points: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask: Any = None,
        multimask: Union[bool, str, None] = None,
        mask_input: Any = None,
    ) -> Candidates:
        """Segment one object. ``points`` [[x, y], ...] (labels default to 1 = foreground),
        ``box`` [x0, y0, x1, y1], ``mask`` a prior mask (HxW bool array, PNG path or RLE dict),
        ``mask_input`` the low-res logits of an earlier answer (``previous.logits[0]``), given to
        SAM unchanged as in the SAM 2 tutorial. ``multimask`` None follows the config (auto: three
        candidates for a lone point)."""
        rgb = load_image(image)
        prompt = build_prompt(rgb, points, point_labels, box, mask, mask_input, self.config.image_size // 4)
        (answer,) = self.model.segment(rgb, [prompt], multimask)
        return answer


def build_prompt(rgb: np.ndarray, points: Any = None, point_labels: Any = None, box: Any = None, mask: Any = None,
                 mask_input: Any = None, low_res: int = 256) -> Prompt:
    """Arguments as a person types them -> a checked Prompt (PromptError says what is wrong).
    ``mask_input``: an earlier answer's low-res logits, ``low_res`` x ``low_res`` (image_size / 4)."""
    if points is not None and point_labels is None:
        point_labels = [1] * len(points)
    prompt = Prompt(source="manual")
    if points is not None:
        prompt.points, prompt.point_labels = as_points(points, point_labels)
    if box is not None:
        prompt.box = np.asarray(box, np.float32).reshape(4)
    if mask is not None:
        prompt.mask = np.asarray(mask, bool) if isinstance(mask, np.ndarray) else load_mask(mask)
    if mask_input is not None:
        if mask is not None:
            raise PromptError("give a prior mask (mask=) or an earlier answer's logits (mask_input=), not both")
        logits = np.asarray(mask_input, np.float32)
        if logits.shape not in ((low_res, low_res), (1, low_res, low_res)):
            raise PromptError(f"mask_input must be {low_res}x{low_res} logits (an earlier answer's logits[i]), got shape {logits.shape}")
        prompt.mask_input = logits.reshape(low_res, low_res)
    return check(prompt, rgb.shape[1], rgb.shape[0])


# ---------------------------------------------------------------- autolabel predict


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in n:
        raise PromptError(f"{what} '{text}': expected {' or '.join(str(k) for k in n)} comma-separated numbers")
    return values


def cutout(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA: the image where the mask is, fully transparent (and black) everywhere else."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask, :3] = image[mask]
    rgba[mask, 3] = 255
    return rgba


def overlay(image: np.ndarray, mask: np.ndarray, points=None, labels=None, box=None) -> "PIL.Image.Image":
    """The image with the mask tinted and the prompts drawn (green: foreground, red: background)."""
    from PIL import Image, ImageDraw

    tinted = image.astype(np.float32)
    tinted[mask] = tinted[mask] * 0.45 + np.array([30, 144, 255], np.float32) * 0.55
    out = Image.fromarray(tinted.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(4, round(max(image.shape[:2]) / 150))
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(255, 200, 0), width=max(2, r // 2))
    for (x, y), label in zip(points if points is not None else [], labels if labels is not None else []):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 200, 0) if label == 1 else (220, 0, 0), outline=(255, 255, 255))
    return out


def predict_command(args) -> int:
    """``autolabel predict IMAGE ... --out DIR``: mask PNG(s), cutout.png, overlay.png, scores."""
    import sys

    from PIL import Image

    from pipeline.config import ConfigError, load_config, redact_text
    from pipeline.io.decode import ImageError
    from pipeline.models.weights import WeightsError

    try:
        cfg = load_config(args.config, args.overrides)
        points = [_floats(p, (2, 3), "--point") for p in args.point]
        box = _floats(args.box, (4,), "--box") if args.box else None
        if not points and box is None and args.mask is None:
            raise PromptError("give at least one prompt: --point X,Y[,LABEL], --box X0,Y0,X1,Y1 or --mask FILE")
        image = load_image(args.image, cfg.input.storage_options)
        coords = [p[:2] for p in points] or None
        labels = [int(p[2]) if len(p) == 3 else 1 for p in points] or None
        build_prompt(image, coords, labels, box, args.mask)  # fail fast, before loading the model
        predictor = Predictor(cfg.sam)
    except (ConfigError, PromptError, ImageError, WeightsError) as exc:
        print(f"autolabel: error: {redact_text(str(exc))}", file=sys.stderr)  # IMAGE may be a URL with user info
        return 2
    result = predictor.predict(image, points=coords, point_labels=labels, box=box, mask=args.mask, multimask=args.multimask)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["mask.png"] if len(result.scores) == 1 else [f"mask_{i}.png" for i in range(len(result.scores))]
    for name, mask, score in zip(names, result.masks, result.scores):
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / name)
        print(f"{out / name}  score {score:.4f}  area {int(mask.sum())} px")
    Image.fromarray(cutout(image, result.masks[0])).save(out / "cutout.png")
    overlay(image, result.masks[0], coords, labels, box).save(out / "overlay.png")
    print(f"{out / 'cutout.png'}\n{out / 'overlay.png'}")
    return 0
