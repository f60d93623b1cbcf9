"""The detector and its classes, as the driver, the detect actors and ``autolabel predict`` see it.

A closed-set YOLO brings its own classes (``detector.classes`` keeps some ids). An
open-vocabulary one (YOLOE, YOLO-World: models/yoloe.py) takes the classes a run names in text,
gives as a file or shows by example; their embeddings are made once, by ``resolve_classes`` (on
the driver, before any work), and travel to the actors as the bytes of ultralytics' own
prompt-embedding file, so every actor runs exactly the classes the driver checked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from pipeline.config import ConfigError, DetectorConfig
from pipeline.models import yoloe
from pipeline.models.yoloe import ClassEmbeddings


@dataclass(frozen=True)
class DetectorClasses:
    """The run's detector classes: id -> name, what model holds them, and their embeddings."""

    names: dict[int, str]
    kind: Optional[str]  # yoloe | world | None (a closed-set YOLO)
    embeddings: Optional[ClassEmbeddings] = None

    @property
    def defined_by(self) -> str:
        """text | file | examples (an open-vocabulary model's classes), or closed-set (the model's own)."""
        return self.embeddings.source if self.embeddings is not None else "closed-set"

    def record(self, file: Optional[str] = None) -> dict:
        """What run.json keeps about them (``models.detector.classes``); ``file``: where the
        embeddings were written in the run folder. The digest enters the resume fingerprint."""
        out = {"defined_by": self.defined_by, "model_kind": self.kind or "closed-set"}
        if self.embeddings is not None:  # source: text | file | examples; model: the one they are bound to
            out["embeddings"] = {"source": self.embeddings.source, "model": self.embeddings.model,
                                 "sha256": hashlib.sha256(self.embeddings.data).hexdigest(), "file": file}
        return out


def predict_kwargs(cfg: DetectorConfig, open_vocab: bool = False, device=None) -> dict:
    """The ultralytics predict arguments that ``detector.*`` maps to: for a closed-set YOLO with
    ``detector.classes`` as its filter; for an open-vocabulary one, whose classes are its
    embeddings, ``yoloe.predict_kwargs``."""
    if open_vocab:
        return yoloe.predict_kwargs(cfg.conf, cfg.iou, cfg.max_det, cfg.imgsz, device)
    kwargs = dict(conf=cfg.conf, iou=cfg.iou, classes=cfg.classes, max_det=cfg.max_det, imgsz=cfg.imgsz, verbose=False)
    return kwargs if device is None else dict(kwargs, device=device)


def resolve_classes(cfg: DetectorConfig, weights_path: str, device="cpu", encoder=None):
    """(the loaded model, its ``DetectorClasses``), every mistake a ConfigError or WeightsError
    (a missing text encoder: ``yoloe.TextEncoderError``, with both ways out). The model keeps the
    classes applied, so ``autolabel predict`` runs it as it is. ``encoder``: a text model to use
    instead of ultralytics' own (tests)."""
    import torch

    from pipeline.models.weights import load_yolo, sha256_file

    model = load_yolo(weights_path, torch.device(device))
    kind = yoloe.model_kind(model)
    if kind is None and cfg.classes and not cfg.class_names_given:
        unknown = [c for c in cfg.classes if c not in model.names]
        if unknown:
            raise ConfigError(f"detector.classes: {unknown} not in the model's classes 0..{len(model.names) - 1}")
    digest = None if weights_path.endswith((".yaml", ".yml")) else sha256_file(weights_path)  # keys the text cache
    embeddings = yoloe.resolve_class_embeddings(
        model, cfg.classes, cfg.class_embeddings, cfg.visual_prompts, cfg.imgsz, cfg.storage_options, digest, encoder)
    names = dict(enumerate(embeddings.names)) if embeddings is not None else yoloe.class_names(model)
    return model, DetectorClasses(names, kind, embeddings)


def load_detector(cfg: DetectorConfig, weights_path: str, device, embeddings: Optional[ClassEmbeddings] = None):
    """(model, predict kwargs) of a detect actor: the driver's class embeddings applied to an
    open-vocabulary model (ultralytics' own loader checks they were made for it), else the YOLO
    as it is with ``detector.classes`` as its filter."""
    if embeddings is not None:
        return yoloe.load_with_embeddings(weights_path, embeddings, device), predict_kwargs(cfg, True, device)
    from pipeline.models.weights import load_yolo

    return load_yolo(weights_path, device), predict_kwargs(cfg, False, device)
