"""Open-vocabulary detectors: YOLOE classes named in text or shown by example, and YOLO-World.

The class embeddings are made once, on the driver, and travel to the actors as the bytes of
ultralytics' own prompt-embedding file (``YOLOE.save_prompt_embeddings``: ``embeddings`` (1, n, d)
float32, ``names``, ``model``); each actor applies them with ``YOLOE.load_prompt_embeddings``, so
a file made for another model is refused with ultralytics' own reason. Three ways to make them:

- text (``classes``): ultralytics' text encoder (MobileCLIP for YOLOE, CLIP for YOLO-World) in
  the model's own ``get_text_pe``; the encoder's weights come from ``checkpoints/`` (or are fetched
  once like other weights); the result is cached per model weights and class list.
- a file (``class_embeddings``): made elsewhere; no text encoder needed.
- examples (``visual_prompts``, a JSONL of reference images with boxes and class names): YOLOE's own
  visual-prompt predict with ``refer_image`` on each reference image; several references of one
  class are averaged and L2-normalised, as ultralytics' YOLOE validator does with its reference set.

Class ids follow the order of the class list. Nothing here lets ultralytics pip-install at run
time: the ``clip`` package its text encoders import is checked first.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.config import ConfigError
from pipeline.io.credentials import redact_uri
from pipeline.models.weights import WeightsError, _fetch_official, cache_dir, checkpoint_dir

log = logging.getLogger(__name__)

# ultralytics' text encoder variants (a model's ``text_model``) -> the weights file it loads
ENCODER_FILES = {"mobileclip:blt": "mobileclip_blt.ts", "mobileclip2:b": "mobileclip2_b.ts", "clip:ViT-B/32": "ViT-B-32.pt"}
ASSETS_URL = "https://github.com/ultralytics/assets/releases/download/v8.4.0"  # attempt_download_asset's release
WORLD_TEXT_MODEL = "clip:ViT-B/32"  # WorldModel.get_text_pe hard-codes it
VISUAL_PROMPT_KEYS = {"uri", "boxes", "classes"}


class TextEncoderError(WeightsError):
    """Text classes were asked for, but ultralytics' text encoder cannot be had here."""


@dataclass(frozen=True)
class ClassEmbeddings:
    """Class embeddings in ultralytics' prompt-embedding .npz format, ready to send to actors."""

    names: tuple[str, ...]
    data: bytes  # the .npz file as ``YOLOE.save_prompt_embeddings`` writes it
    source: str  # text | file | examples: how the classes were defined (for run.json and the report)
    model: str  # the model identifier the embeddings are bound to (ultralytics' binding)

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.data)
        return Path(path)

    def array(self) -> np.ndarray:
        with np.load(io.BytesIO(self.data), allow_pickle=False) as npz:
            return npz["embeddings"]


# ------------------------------------------------------------------------------ models


def model_kind(model) -> Optional[str]:
    """``yoloe``, ``world`` or None (a closed-set YOLO) for a loaded ultralytics model."""
    from ultralytics.nn.tasks import WorldModel, YOLOEModel

    net = getattr(model, "model", None)
    return "yoloe" if isinstance(net, YOLOEModel) else "world" if isinstance(net, WorldModel) else None


def is_prompt_free(model) -> bool:
    """A ``-pf`` YOLOE: its vocabulary is fused into the head and cannot change."""
    return hasattr(model.model.model[-1], "lrpc")


def load_open_vocab(weights: str, device="cpu"):
    """A YOLOE (``yoloe-*-seg.pt``, ``yoloe-*.yaml``) or YOLO-World (``*-worldv2.pt``) model on
    ``device``; ``weights`` is a local file or model .yaml (resolve URLs and names first)."""
    from ultralytics import YOLO

    model = YOLO(weights)  # ultralytics routes to YOLOE / YOLOWorld by the model (a .yaml by its name)
    if model_kind(model) is None:
        raise WeightsError(f"detector.weights: {weights} is not a YOLOE or YOLO-World model, so it cannot take class names")
    model.to(device)
    return model


def embedding_model_id(model) -> str:
    """The identifier ultralytics binds prompt embeddings to: the weights file's (or yaml's) stem,
    without ``-seg`` (``YOLOE._prompt_embedding_model``; applied to YOLO-World the same way)."""
    from ultralytics import YOLOE

    return YOLOE._prompt_embedding_model(model)


def embedding_dim(model) -> int:
    head = model.model.model[-1]
    return int(head.embed) if model_kind(model) == "yoloe" else int(head.cv3[0][-1].out_channels)


def class_names(model) -> dict[int, str]:
    names = model.model.names
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else dict(enumerate(map(str, names)))


def _saved(model, source: str) -> ClassEmbeddings:
    """The model's current classes and embeddings as ``save_prompt_embeddings`` writes them."""
    names = list(class_names(model).values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classes.npz"
        if model_kind(model) == "yoloe":
            model.save_prompt_embeddings(path)
        else:  # YOLO-World keeps its CLIP text features in txt_feats; stored in the same format
            feats = model.model.txt_feats.detach().cpu().float().numpy()
            np.savez_compressed(path, embeddings=feats, names=np.asarray(names, dtype=np.str_),
                                model=np.asarray(embedding_model_id(model), dtype=np.str_))
        data = path.read_bytes()
    return ClassEmbeddings(tuple(names), data, source, embedding_model_id(model))


def apply_embeddings(model, embeddings: ClassEmbeddings) -> None:
    """On the actor (and on the driver, to check): the classes become ``embeddings.names`` with
    their embeddings; ultralytics' own loader refuses a file made for another model."""
    import torch

    if model_kind(model) == "yoloe":
        if is_prompt_free(model):
            raise ValueError("a prompt-free YOLOE (-pf) has a fixed vocabulary; use a promptable one, e.g. yoloe-11s-seg.pt")
        model.load_prompt_embeddings(io.BytesIO(embeddings.data))
        return
    # YOLO-World: what YOLOWorld.set_classes does, with the text features given instead of encoded
    with np.load(io.BytesIO(embeddings.data), allow_pickle=False) as npz:
        feats, names, bound = npz["embeddings"], npz["names"].tolist(), str(npz["model"])
    if bound != embedding_model_id(model):  # ultralytics' wording, as YOLOE.load_prompt_embeddings says it
        raise ValueError(f"Prompt embeddings for model '{bound}' cannot be loaded into '{embedding_model_id(model)}'.")
    if feats.ndim != 3 or feats.shape[0] != 1 or feats.shape[1] != len(names) or feats.shape[2] != embedding_dim(model):
        raise ValueError("Prompt embedding shape does not match the class names or model embedding dimension.")
    _set_world_classes(model, names, torch.from_numpy(feats.copy()))


def _set_world_classes(model, names: list[str], feats) -> None:
    """YOLOWorld.set_classes with the text features given instead of encoded."""
    param = next(model.model.parameters())
    model.model.txt_feats = feats.to(param.device, param.dtype)
    model.model.model[-1].nc = len(names)
    model.model.names = list(names)
    model.predictor = None


def checked(model, embeddings: ClassEmbeddings, what: str) -> ClassEmbeddings:
    """``embeddings`` after applying them to ``model`` worked; else a ConfigError with ultralytics' reason."""
    try:
        apply_embeddings(model, embeddings)
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return embeddings


# ------------------------------------------------------------------------------ text


def encoder_problem() -> Optional[str]:
    """Why ultralytics' text encoders cannot be imported here (the ``clip`` package), or None.

    ultralytics' text_model module pip-installs CLIP from a git URL when ``import clip`` fails, so
    it is imported only when this says None."""
    try:
        importlib.import_module("clip")
    except Exception as exc:  # noqa: BLE001 - ImportError, or its own imports failing (pkg_resources)
        return f"the `clip` package that ultralytics' text encoders import cannot be imported ({type(exc).__name__}: {exc})"
    return None


def _encoder_file(variant: str) -> Path:
    """The encoder's weights: in checkpoints/ (or where ultralytics itself keeps them), else
    fetched once into checkpoints/ like other official weights; never fetched when YOLO_OFFLINE."""
    from ultralytics.utils import SETTINGS, WEIGHTS_DIR

    name = ENCODER_FILES.get(variant)
    if name is None:
        raise TextEncoderError(f"unknown text encoder '{variant}'; known: {', '.join(ENCODER_FILES)}")
    for have in (checkpoint_dir() / name, cache_dir() / "official" / name, Path(SETTINGS["weights_dir"]) / name,
                 WEIGHTS_DIR / "clip" / name):
        if have.is_file():
            return have
    if os.environ.get("YOLO_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise FileNotFoundError("offline (YOLO_OFFLINE is set)")
    clip = importlib.import_module("clip") if variant.startswith("clip:") else None  # its URLs are in the package
    url = clip.clip._MODELS[variant.split(":", 1)[1]] if clip else f"{ASSETS_URL}/{name}"
    try:
        return _fetch_official(name, url)
    except WeightsError as exc:
        raise FileNotFoundError(str(exc).splitlines()[0]) from None


def text_encoder(variant: str, device="cpu"):
    """ultralytics' own text encoder for ``variant`` (``mobileclip:blt``, ``mobileclip2:b``,
    ``clip:ViT-B/32``), built from local weights."""
    path = _encoder_file(variant)
    if problem := encoder_problem():
        raise ImportError(problem)
    from ultralytics.nn import text_model

    if variant.startswith("clip:"):
        return text_model.CLIP(str(path), device)  # clip.load takes a checkpoint path as well as a name
    return text_model.MobileCLIPTS(device, weight=str(path))


def _encoder_error(model, classes: Sequence[str], variant: str, reason: str) -> TextEncoderError:
    name = ENCODER_FILES.get(variant, variant)
    url = f"{ASSETS_URL}/{name}" if not variant.startswith("clip:") else "clip's own URL for it, clip.clip._MODELS"
    bound, classes = embedding_model_id(model), list(classes)
    weights = Path(str(getattr(model.model, "pt_path", None) or model.ckpt_path or model.model.yaml.get("yaml_file"))).name
    if model_kind(model) == "yoloe":
        how = f"m = YOLOE({weights!r}); m.set_classes({classes!r}); m.save_prompt_embeddings('classes.npz')"
    else:  # YOLOWorld has no save_prompt_embeddings: its text features in the same format
        how = (f"m = YOLOWorld({weights!r}); m.set_classes({classes!r}); np.savez_compressed('classes.npz', "
               f"embeddings=m.model.txt_feats.float().numpy(), names=np.array({classes!r}), model=np.array({bound!r}))")
    return TextEncoderError(
        f"detector.classes {classes}: text classes need ultralytics' text encoder {variant} ({name}), "
        f"which cannot be used here: {reason}.\n"
        f"  Two ways to get class embeddings:\n"
        f"  - the encoder: put {name} into {checkpoint_dir()}/ (from {url}; with the `clip` package installed);\n"
        f"    the run then computes the embeddings once and caches them;\n"
        f"  - or a file made elsewhere: detector.class_embeddings=FILE.npz, in the format of ultralytics'\n"
        f"    save_prompt_embeddings for this model ({bound}), e.g. on a machine with internet:\n"
        f"      {how}"
    )


def _text_features(net, encoder, classes: list[str], batch: int = 80):
    """The encoder's features for ``classes`` as (1, n, d) in the model's dtype: the body of
    ultralytics' ``get_text_pe`` (YOLOEModel and WorldModel), which cannot be called with an
    encoder of one's own without importing ``ultralytics.nn.text_model`` (and so ``clip``)."""
    import torch

    param = next(net.parameters())
    with torch.inference_mode():
        tokens = encoder.tokenize(classes)
        feats = torch.cat([encoder.encode_text(t).detach() for t in tokens.split(batch)], dim=0)
        return feats.reshape(-1, len(classes), feats.shape[-1]).to(param.dtype)


def text_embeddings(model, classes: Sequence[str], encoder=None, cache: Optional[Path] = None) -> ClassEmbeddings:
    """Text classes as the model's own ``get_text_pe`` makes them (YOLOE: encoder, then the head's
    ``get_tpe``; YOLO-World: the CLIP features as they are). ``encoder``: a text model with
    ``tokenize``/``encode_text`` (default: ultralytics' own, from local weights). ``cache``: an
    .npz file to read instead of encoding when it exists, and to write after encoding."""
    import torch

    classes = [str(c) for c in classes]
    if not classes or len(set(classes)) != len(classes) or any(not c.strip() for c in classes):
        raise ConfigError(f"detector.classes: {classes} must be distinct, non-empty class names")
    if model_kind(model) == "yoloe" and is_prompt_free(model):
        raise ConfigError("detector.classes: a prompt-free YOLOE (-pf) has a fixed vocabulary; use e.g. yoloe-11s-seg.pt")
    if cache is not None and Path(cache).is_file():
        names, bound = npz_names(Path(cache).read_bytes())
        if names == classes and bound == embedding_model_id(model):
            log.info("class embeddings for %s from the cache %s", classes, cache)
            return checked(model, ClassEmbeddings(tuple(names), Path(cache).read_bytes(), "text", bound), f"cached {cache}")
    net = model.model
    variant = getattr(net, "text_model", "mobileclip:blt") if model_kind(model) == "yoloe" else WORLD_TEXT_MODEL
    if encoder is None:
        try:
            encoder = text_encoder(variant, next(net.parameters()).device)
        except (FileNotFoundError, ImportError) as exc:
            raise _encoder_error(model, classes, variant, str(exc)) from None
    feats = _text_features(net, encoder, classes)
    if model_kind(model) == "yoloe":
        with torch.inference_mode():
            model.set_classes(classes, net.model[-1].get_tpe(feats))
    else:  # WorldModel.set_classes: the CLIP features as they are
        _set_world_classes(model, classes, feats)
    embeddings = _saved(model, "text")
    if cache is not None:  # written whole, then moved into place: a reader never sees half a file
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        os.replace(embeddings.save(Path(f"{cache}.{os.getpid()}.part")), cache)
    return embeddings


def text_cache_path(model, classes: Sequence[str], weights_sha256: str) -> Path:
    """Where the text embeddings of ``classes`` for these exact weights are cached (the head's
    ``get_tpe`` depends on the weights, so the key is their sha256, not their name)."""
    variant = getattr(model.model, "text_model", WORLD_TEXT_MODEL)
    key = hashlib.sha256("\n".join([weights_sha256, variant, *classes]).encode()).hexdigest()[:16]
    return cache_dir() / "embeddings" / f"{embedding_model_id(model)}-{key}.npz"


# ------------------------------------------------------------------------------ a file


def npz_names(data: bytes) -> tuple[list[str], str]:
    """The class names and model identifier in a prompt-embedding file."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return [str(n) for n in npz["names"].tolist()], str(npz["model"])


def _read(uri: str, storage_options: Optional[dict], what: str) -> bytes:
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(uri, **(storage_options or {}))
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {redact_uri(uri)}") from None
    except Exception as exc:  # noqa: BLE001 - storage back-ends raise many classes; all mean "cannot read it"
        raise ConfigError(f"{what}: cannot read {redact_uri(uri)} ({type(exc).__name__})") from None


def file_embeddings(model, uri: str, classes: Optional[Sequence[str]] = None,
                    storage_options: Optional[dict] = None) -> ClassEmbeddings:
    """``detector.class_embeddings``: a prompt-embedding .npz; its names are the classes, and
    ``classes``, if given, must be the same list (the same order: class ids follow it)."""
    what = "detector.class_embeddings"
    data = _read(uri, storage_options, what)
    try:
        names, bound = npz_names(data)
    except Exception as exc:  # noqa: BLE001 - not an npz, or not this format
        raise ConfigError(f"{what}: {redact_uri(uri)} is not a prompt-embedding .npz file with 'embeddings', "
                          f"'names' and 'model' ({type(exc).__name__}: {exc})") from None
    if classes is not None and list(classes) != names:
        order = " (the same names in another order: class ids follow the order)" if sorted(classes) == sorted(names) else ""
        raise ConfigError(f"{what}: the file's classes {names} differ from detector.classes {list(classes)}{order}; "
                          f"make them equal, or leave detector.classes out to use the file's")
    return checked(model, ClassEmbeddings(tuple(names), data, "file", bound), f"{what} {redact_uri(uri)}")


# ------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class Example:
    """One reference image of ``detector.visual_prompts`` and the boxes shown on it."""

    uri: str
    boxes: np.ndarray  # (n, 4) float32 xyxy pixels
    classes: tuple[str, ...]
    line: int


def _box(value, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        raise ConfigError(f"{where}: a box is [x0, y0, x1, y1] in pixels, not {json.dumps(value)[:80]}")
    if not (value[0] < value[2] and value[1] < value[3]):
        raise ConfigError(f"{where}: box {list(value)} has x1 <= x0 or y1 <= y0")
    return [float(v) for v in value]


def read_visual_prompts(uri: str, storage_options: Optional[dict] = None) -> list[Example]:
    """Parse the JSONL: ``{"uri": "ref.jpg", "boxes": [[x0, y0, x1, y1], ...], "classes": [...]}``
    per line; a relative ``uri`` is under the file's folder."""
    from pipeline.io.locations import resolve_relative

    what = "detector.visual_prompts"
    text = _read(uri, storage_options, what).decode("utf-8", errors="replace")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    examples = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{what} line {n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("uri"), str):
            raise ConfigError(f'{where}: expected {{"uri": "ref.jpg", "boxes": [[x0, y0, x1, y1]], "classes": ["name"]}}')
        if set(obj) - VISUAL_PROMPT_KEYS:
            raise ConfigError(f"{where}: unknown keys {sorted(set(obj) - VISUAL_PROMPT_KEYS)}; allowed: {sorted(VISUAL_PROMPT_KEYS)}")
        boxes, classes = obj.get("boxes"), obj.get("classes")
        if not isinstance(boxes, list) or not isinstance(classes, list) or not boxes or len(boxes) != len(classes):
            raise ConfigError(f"{where}: 'boxes' and 'classes' must be non-empty lists of the same length (one class per box)")
        if not all(isinstance(c, str) and c.strip() for c in classes):
            raise ConfigError(f"{where}: 'classes' must be class names (non-empty strings)")
        examples.append(Example(resolve_relative(obj["uri"], base), np.array([_box(b, where) for b in boxes], np.float32),
                                tuple(classes), n))
    if not examples:
        raise ConfigError(f"{what}: {redact_uri(uri)} has no reference images")
    return examples


def _reference_image(example: Example, storage_options: Optional[dict]) -> np.ndarray:
    """The reference image as BGR (how ultralytics takes numpy images), its boxes checked against it."""
    from pipeline.io.decode import ImageError, decode_rgb, read_bytes

    where = f"detector.visual_prompts line {example.line}"
    try:
        rgb = decode_rgb(read_bytes(example.uri, storage_options))
    except ImageError as exc:
        raise ConfigError(f"{where}: {redact_uri(example.uri)}: {exc.error_class}: {exc}") from None
    h, w = rgb.shape[:2]
    outside = [b.tolist() for b in example.boxes if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h]
    if outside:
        raise ConfigError(f"{where}: boxes {outside} reach outside the {w}x{h} image {redact_uri(example.uri)}")
    return np.ascontiguousarray(rgb[:, :, ::-1])


def example_embeddings(model, uri: str, classes: Optional[Sequence[str]] = None, imgsz: int = 640,
                       storage_options: Optional[dict] = None) -> ClassEmbeddings:
    """Visual-prompt embeddings from the JSONL at ``uri``: per reference image, YOLOE's own
    ``predict(visual_prompts={"bboxes", "cls"}, refer_image=...)`` (one embedding per class shown
    on it, its boxes of one class together); a class shown on several images gets their mean,
    L2-normalised, as ``YOLOEDetectValidator.get_visual_pe`` combines a reference set (shown once:
    used as it is). Class ids follow ``classes`` if given (the file's names), else first appearance."""
    import torch
    import torch.nn.functional as F

    if model_kind(model) != "yoloe":
        raise ConfigError("detector.visual_prompts: classes by example need a YOLOE model (e.g. yoloe-11s-seg.pt); "
                          "YOLO-World takes text classes only")
    if is_prompt_free(model):
        raise ConfigError("detector.visual_prompts: a prompt-free YOLOE (-pf) has a fixed vocabulary; use e.g. yoloe-11s-seg.pt")
    examples = read_visual_prompts(uri, storage_options)
    shown = list(dict.fromkeys(c for ex in examples for c in ex.classes))
    if classes is not None and sorted(classes) != sorted(shown):
        raise ConfigError(f"detector.visual_prompts: the file's classes {shown} differ from detector.classes "
                          f"{list(classes)}; make them the same names (their order sets the class ids)")
    names = list(classes) if classes is not None else shown
    ids = {name: i for i, name in enumerate(names)}
    total = torch.zeros(len(names), embedding_dim(model))
    count = torch.zeros(len(names))
    device = str(next(model.model.parameters()).device)
    for ex in examples:
        image = _reference_image(ex, storage_options)
        cls = np.array([ids[c] for c in ex.classes])
        present = np.unique(cls)  # ultralytics makes one prompt per class, in sorted order
        local = np.searchsorted(present, cls)
        model.predict(image, visual_prompts={"bboxes": ex.boxes.copy(), "cls": local}, refer_image=image, imgsz=imgsz,
                      device=device, max_det=1, verbose=False)
        vpe = model.model.pe.detach().float().cpu()[0]  # set_classes(object0.., vpe) by the predict above
        total[present] += vpe
        count[present] += 1
    combined = torch.where(count[:, None] > 1, F.normalize(total / count.clamp(min=1)[:, None], dim=-1, p=2), total)
    model.set_classes(names, combined[None].to(next(model.model.parameters()).device))
    return _saved(model, "examples")


# ------------------------------------------------------------------------------ the driver's entry point


def resolve_class_embeddings(model, classes: Optional[Sequence[str]] = None, class_embeddings: Optional[str] = None,
                             visual_prompts: Optional[str] = None, imgsz: int = 640,
                             storage_options: Optional[dict] = None, weights_sha256: Optional[str] = None,
                             encoder=None) -> Optional[ClassEmbeddings]:
    """On the driver, before any work: the run's class embeddings from ``detector.classes`` (text),
    ``detector.class_embeddings`` (a file) or ``detector.visual_prompts`` (examples); None when
    none is given (the model's own classes; also for a closed-set YOLO with class ids to keep).
    ``weights_sha256`` keys the text cache (None: no cache). ``model`` keeps the classes applied."""
    named = classes is not None and all(isinstance(c, str) for c in classes)
    if class_embeddings and visual_prompts:
        raise ConfigError("detector.class_embeddings and detector.visual_prompts both define the classes; give one")
    if model_kind(model) is None:
        if named or class_embeddings or visual_prompts:
            kind = "class_embeddings" if class_embeddings else "visual_prompts" if visual_prompts else "classes (names)"
            raise ConfigError(f"detector.{kind}: needs a YOLOE or YOLO-World model in detector.weights, e.g. yoloe-11s-seg.pt")
        return None
    if classes is not None and not named:
        raise ConfigError(f"detector.classes: {list(classes)}: a YOLOE or YOLO-World model takes class names, not ids")
    if class_embeddings:
        return file_embeddings(model, class_embeddings, classes, storage_options)
    if visual_prompts:
        return example_embeddings(model, visual_prompts, classes, imgsz, storage_options)
    if classes:
        cache = text_cache_path(model, classes, weights_sha256) if weights_sha256 else None
        return text_embeddings(model, classes, encoder=encoder, cache=cache)
    return None


# ------------------------------------------------------------------------------ the actor's predict


def predict_kwargs(conf: float, iou: float, max_det: int, imgsz: int, device=None) -> dict:
    """The ultralytics predict arguments; no ``classes`` filter (the classes are the embeddings).
    YOLOE.predict keeps its own default of class-agnostic NMS; YOLO-World's NMS is per class."""
    kwargs = dict(conf=conf, iou=iou, max_det=max_det, imgsz=imgsz, verbose=False)
    return kwargs if device is None else dict(kwargs, device=device)


def detections(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy float32 (n, 4), class ids int32, scores float32), as the detect stage's
    ``detections_of`` returns them."""
    b = result.boxes
    return b.xyxy.float().cpu().numpy().reshape(-1, 4), b.cls.cpu().numpy().astype(np.int32), b.conf.float().cpu().numpy()


def detect(model, images_bgr: Sequence[np.ndarray], **kwargs) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One ``predict`` over a batch of BGR images (same shape for results equal to per-image
    predicts, as the detect stage groups them); per image (boxes, class ids, scores); the names of
    the ids are ``class_names(model)``."""
    return [detections(r) for r in model.predict(list(images_bgr), **kwargs)]


def load_with_embeddings(weights: str, embeddings: Optional[ClassEmbeddings], device="cpu"):
    """The actor's model: loaded on ``device``, then the driver's embeddings applied."""
    model = load_open_vocab(weights, device)
    if embeddings is not None:
        apply_embeddings(model, embeddings)
    return model
