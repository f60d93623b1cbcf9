"""One image at a time: the notebook API (``Predictor``) and ``autolabel predict``.

Both go through ``sam.model.SamModel``, the code the Ray job runs, so a mask made here is the
mask the pipeline would store for the same prompt; ``Predictor.label`` (``--classes``,
``--class-embeddings``) finds the objects first with the job's detector code (models/detector.py),
open-vocabulary classes included, or (``automatic=True``, ``--automatic``) with the job's
segment-everything code (sam/automatic.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pipeline.config import AutomaticConfig, ConfigError, DetectorConfig, SamConfig
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


@dataclass
class LabeledObject:
    """One object of ``Predictor.label``: the detector's box and class, SAM's mask for that box;
    or (``source="automatic"``) a mask of the automatic generator, its tight box, no class."""

    class_id: Optional[int]
    class_name: Optional[str]
    det_score: Optional[float]
    box: np.ndarray  # (4,) float32 xyxy, the detector's box in image pixels (automatic: the mask's box)
    mask: np.ndarray  # (H, W) bool
    mask_score: float  # SAM's predicted IoU
    source: str = "detector"
    stability: Optional[float] = None  # automatic: the generator's stability score


class Predictor:
    """Load SAM 2.1 once, then segment many images with points, boxes or prior masks, or label
    them: a detector finds the objects (classes named in text with a YOLOE or YOLO-World model).

    >>> p = Predictor(size="tiny", checkpoint="checkpoints/sam2.1_hiera_tiny.pt")
    >>> result = p.predict("photo.jpg", points=[[500, 375]], point_labels=[1])
    >>> best = result.masks[0]          # (H, W) bool; result.scores are ranked best first
    >>> p = Predictor(detector={"weights": "yoloe-11s-seg.pt", "conf": 0.3})
    >>> for obj in p.label("yard.jpg", classes=["forklift", "pallet"]):
    ...     print(obj.class_name, obj.det_score, obj.mask.sum())

    Keyword arguments are ``sam.*`` config keys (size, checkpoint, image_size, dtype, device,
    multimask, box_chunk); ``detector``: ``detector.*`` keys (a dict or a ``DetectorConfig``),
    loaded on the first ``label``; ``automatic``: ``automatic.*`` keys for ``label(automatic=True)``.
    """

    def __init__(self, config: Optional[SamConfig] = None, detector: Union[DetectorConfig, dict, None] = None,
                 automatic: Union[AutomaticConfig, dict, None] = None, **sam_keys: Any):
        from pipeline.sam.model import SamModel

        base = (config or SamConfig()).model_dump()
        self.config = SamConfig(**{**base, **sam_keys})
        self.detector_config = detector if isinstance(detector, DetectorConfig) else DetectorConfig(**(detector or {}))
        self.automatic_config = automatic if isinstance(automatic, AutomaticConfig) else AutomaticConfig(**(automatic or {}))
        self.model = SamModel(self.config)
        self._detector: Optional[tuple] = None  # (classes asked for, model, predict kwargs, class names)

    def detector(self, classes: Union[Sequence, str, None] = None, class_embeddings: Optional[str] = None,
                 visual_prompts: Optional[str] = None):
        """(model, predict kwargs, class names) for these classes, loaded once and kept while they
        stay the same; the class embeddings are made as a run makes them (ConfigError, WeightsError)."""
        from pipeline.models.detector import predict_kwargs, resolve_classes
        from pipeline.models.weights import pick_device, resolve_detector_weights

        given = {"classes": classes if classes is None or isinstance(classes, str) else list(classes),
                 "class_embeddings": class_embeddings, "visual_prompts": visual_prompts}
        given = {k: v for k, v in given.items() if v is not None}  # what is not given stays as the detector config says
        asked = json.dumps(given, sort_keys=True)
        if self._detector is None or self._detector[0] != asked:
            cfg = DetectorConfig(**{**self.detector_config.model_dump(), **given})
            device = pick_device(cfg.device)
            model, found = resolve_classes(cfg, resolve_detector_weights(cfg.weights, storage_options=cfg.storage_options), device)
            self._detector = (asked, model, predict_kwargs(cfg, found.embeddings is not None, device), found.names)
        return self._detector[1:]

    def label(self, image: ImageLike, classes: Union[Sequence, str, None] = None, class_embeddings: Optional[str] = None,
              visual_prompts: Optional[str] = None, automatic: Union[bool, dict] = False) -> list[LabeledObject]:
        """Every object the detector finds in ``image``, each segmented from its box as the job
        does. ``classes``: names for a YOLOE / YOLO-World (``["forklift", "pallet"]``; their
        order sets the ids) or ids to keep for a closed-set YOLO; ``class_embeddings``: an .npz
        from ultralytics' ``save_prompt_embeddings``; ``visual_prompts``: a JSONL of examples.
        ``automatic``: True (or a dict of ``automatic.*`` keys over the Predictor's) finds every
        mask as a run with ``automatic.enabled=true`` does, no detector, no classes."""
        from pipeline.models.yoloe import detections
        from pipeline.sam.prompts import Prompt

        rgb = load_image(image)
        if automatic is not False:
            if classes is not None or class_embeddings is not None or visual_prompts is not None:
                raise ConfigError("automatic finds every mask without classes: give it without classes, class_embeddings or visual_prompts")
            return self._everything(rgb, automatic if isinstance(automatic, dict) else {})
        model, kwargs, names = self.detector(classes, class_embeddings, visual_prompts)
        (result,) = model.predict(np.ascontiguousarray(rgb[:, :, ::-1]), **kwargs)  # ultralytics takes BGR arrays
        prompts = []
        for box, cls, score in zip(*detections(result)):
            prompt = Prompt(box=box, class_id=int(cls), class_name=names.get(int(cls), str(cls)), det_score=float(score), source="detector")
            try:
                prompts.append(check(prompt, rgb.shape[1], rgb.shape[0]))
            except PromptError:  # a degenerate box: the job makes it an error row; here it is left out
                continue
        answers = self.model.segment(rgb, prompts, multimask=False) if prompts else []
        return [LabeledObject(p.class_id, p.class_name, p.det_score, p.box, a.masks[0], float(a.scores[0]))
                for p, a in zip(prompts, answers)]

    def _everything(self, rgb: np.ndarray, keys: dict) -> list[LabeledObject]:
        from pipeline.sam.automatic import SOURCE, AutomaticArgs, AutomaticMaskGenerator

        cfg = AutomaticConfig(**{**self.automatic_config.model_dump(), **keys})
        found = AutomaticMaskGenerator(self.model, AutomaticArgs(**cfg.model_dump(exclude={"enabled"}))).generate(rgb)
        return [LabeledObject(None, None, None, found.boxes[i], mask, float(found.scores[i]), SOURCE, float(found.stability[i]))
                for i, mask in enumerate(found.masks)]

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


def overlay_objects(image: np.ndarray, objects: list[LabeledObject]):
    """The image with each object's mask tinted in its class colour, its box and its class drawn."""
    from PIL import Image, ImageDraw

    from pipeline.outputs.colors import class_color

    # automatic masks have no class: each its own colour, drawn largest first so small ones stay visible
    colors = [class_color(i if obj.class_id is None else obj.class_id) for i, obj in enumerate(objects)]
    order = sorted(range(len(objects)), key=lambda i: -int(objects[i].mask.sum()) if objects[i].class_id is None else 0)
    tinted = image.astype(np.float32)
    for i in order:
        tinted[objects[i].mask] = tinted[objects[i].mask] * 0.5 + np.array(colors[i], np.float32) * 255 * 0.5
    out = Image.fromarray(tinted.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for obj, color in zip(objects, colors):
        draw.rectangle([float(v) for v in obj.box], outline=tuple(int(c * 255) for c in color), width=2)
        if obj.class_name is not None:
            draw.text((float(obj.box[0]) + 3, float(obj.box[1]) + 2), f"{obj.class_name} {obj.det_score:.2f}", fill=(255, 255, 255))
    return out


def _label_command(args, cfg, image: np.ndarray) -> int:
    """``autolabel predict IMAGE --classes forklift,pallet --out DIR`` (or ``--automatic``): a mask
    PNG per object, objects.json (class, scores, box, area, file) and overlay.png."""
    from PIL import Image

    predictor = Predictor(cfg.sam, detector=cfg.detector, automatic=cfg.automatic)
    automatic = bool(getattr(args, "automatic", False))
    objects = predictor.label(image, automatic=True) if automatic else predictor.label(image, args.classes, args.class_embeddings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, obj in enumerate(objects):
        name = f"mask_{i}.png"
        Image.fromarray(obj.mask.astype(np.uint8) * 255).save(out / name)
        rows.append({"mask": name, "source": obj.source, "class_id": obj.class_id, "class_name": obj.class_name,
                     "det_score": None if obj.det_score is None else round(obj.det_score, 6), "mask_score": round(obj.mask_score, 6),
                     "box": [round(float(v), 3) for v in obj.box], "area": int(obj.mask.sum())})
        if automatic:
            rows[-1]["stability"] = round(obj.stability, 6)
            print(f"{out / name}  score {obj.mask_score:.4f}  stability {obj.stability:.4f}  area {rows[-1]['area']} px")
        else:
            print(f"{out / name}  {obj.class_name}  det {obj.det_score:.4f}  score {obj.mask_score:.4f}  area {rows[-1]['area']} px")
    (out / "objects.json").write_text(json.dumps(rows, indent=2))
    overlay_objects(image, objects).save(out / "overlay.png")
    print(f"{len(objects)} objects" + (f" ({', '.join(dict.fromkeys(o.class_name for o in objects))})" if objects and not automatic else ""))
    print(f"{out / 'objects.json'}\n{out / 'overlay.png'}")
    return 0


def predict_command(args) -> int:
    """``autolabel predict IMAGE ... --out DIR``: mask PNG(s), cutout.png, overlay.png, scores; with
    ``--classes`` / ``--class-embeddings``, every object the detector finds (``_label_command``)."""
    import sys

    from PIL import Image

    from pipeline.config import ConfigError, load_config, redact_text
    from pipeline.io.decode import ImageError
    from pipeline.models.weights import WeightsError

    automatic = bool(getattr(args, "automatic", False))
    labeling = bool(getattr(args, "classes", None) or getattr(args, "class_embeddings", None))
    try:
        cfg = load_config(args.config, args.overrides)
        if automatic and labeling:
            raise PromptError("--automatic finds every mask without a detector or classes; --classes / --class-embeddings "
                              "find objects of classes with the detector: give one or the other")
        if labeling or automatic:
            if args.point or args.box or args.mask:
                what = "--automatic finds every mask" if automatic else "--classes / --class-embeddings find every object with the detector"
                raise PromptError(f"{what}; --point, --box and --mask segment one object you point at: give one or the other")
            image = load_image(args.image, cfg.input.storage_options)
            return _label_command(args, cfg, image)
        points = [_floats(p, (2, 3), "--point") for p in args.point]
        box = _floats(args.box, (4,), "--box") if args.box else None
        if not points and box is None and args.mask is None:
            raise PromptError("give at least one prompt: --point X,Y[,LABEL], --box X0,Y0,X1,Y1 or --mask FILE")
        image = load_image(args.image, cfg.input.storage_options)
        coords = [p[:2] for p in points] or None
        labels = [int(p[2]) if len(p) == 3 else 1 for p in points] or None
        build_prompt(image, coords, labels, box, args.mask)  # fail fast, before loading the model
        predictor = Predictor(cfg.sam)
    except (ConfigError, PromptError, ImageError, WeightsError) as exc:  # TextEncoderError is a WeightsError
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
