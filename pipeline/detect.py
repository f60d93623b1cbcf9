"""Detect stage: a Ray actor holding one ultralytics YOLO model, boxes for a batch of images."""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pyarrow as pa

from .config import DetectorConfig
from .decode import pixels_of

log = logging.getLogger(__name__)

DETECTION_COLUMNS = [
    ("det_boxes", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy, original image pixels
    ("det_class_ids", pa.list_(pa.int32())),
    ("det_scores", pa.list_(pa.float32())),
]


def predict_kwargs(cfg: DetectorConfig) -> dict:
    """The ultralytics predict arguments that ``detector.*`` maps to."""
    return dict(conf=cfg.conf, iou=cfg.iou, classes=cfg.classes, max_det=cfg.max_det, imgsz=cfg.imgsz, verbose=False)


def detections_of(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = result.boxes
    return (
        boxes.xyxy.float().cpu().numpy().reshape(-1, 4),
        boxes.cls.cpu().numpy().astype(np.int32),
        boxes.conf.float().cpu().numpy(),
    )


class Detector:
    """Constructed once per actor; ``__call__`` maps a batch of decoded images to boxes."""

    def __init__(self, cfg: DetectorConfig):
        from .models import load_yolo, pick_device, resolve_detector_weights

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        weights_path = resolve_detector_weights(cfg.weights)  # per node: fetched or copied if needed
        self.model = load_yolo(weights_path, self.device)
        self.kwargs = dict(predict_kwargs(cfg), device=self.device)
        log.info("detector %s on %s", weights_path, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        results: list = [None] * n
        # Group images by shape: ultralytics letterboxes a same-shape batch exactly as it does a
        # single image, so boxes equal a per-image YOLO.predict, and no padding is wasted.
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        statuses = batch.column("status").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        pixels = batch.column("pixels")
        for i in range(n):
            if statuses[i] == "ok":
                by_shape[(heights[i], widths[i])].append(i)
        for (h, w), rows in by_shape.items():
            for start in range(0, len(rows), self.cfg.batch_size):
                chunk = rows[start : start + self.cfg.batch_size]
                # ultralytics takes numpy images as BGR (OpenCV order)
                images = [pixels_of(pixels[i].as_py(), w, h)[:, :, ::-1] for i in chunk]
                for i, result in zip(chunk, self.model.predict(images, **self.kwargs)):
                    results[i] = detections_of(result)
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        boxes, classes, scores = zip(*[r if r is not None else empty for r in results]) if n else ((), (), ())
        columns = {
            "det_boxes": [b.tolist() for b in boxes],
            "det_class_ids": [c.tolist() for c in classes],
            "det_scores": [s.tolist() for s in scores],
        }
        for name, typ in DETECTION_COLUMNS:
            batch = batch.append_column(pa.field(name, typ), pa.array(columns[name], type=typ))
        return batch
