"""Detect stage: a Ray actor holding one ultralytics YOLO model, boxes for a batch of images.

An open-vocabulary model (YOLOE, YOLO-World) gets the class embeddings the driver made
(models/detector.py), so every actor finds exactly the run's classes."""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.config import DetectorConfig
from pipeline.errors import ImageError
from pipeline.io.decode import ImageDecoder, pixels_or_error, with_errors
from pipeline.models.yoloe import ClassEmbeddings
from pipeline.run.faults import CrashGuard, InjectedFaults
from pipeline.run.timings import StageClock

log = logging.getLogger(__name__)

DETECTION_COLUMNS = [
    ("det_boxes", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy, original image pixels
    ("det_class_ids", pa.list_(pa.int32())),
    ("det_scores", pa.list_(pa.float32())),
]


def detections_of(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = result.boxes
    return (
        boxes.xyxy.float().cpu().numpy().reshape(-1, 4),
        boxes.cls.cpu().numpy().astype(np.int32),
        boxes.conf.float().cpu().numpy(),
    )


class Detector:
    """Constructed once per actor; ``__call__`` maps a batch of images (encoded bytes, decoded
    here in threads) to boxes."""

    def __init__(self, cfg: DetectorConfig, ledger=None, max_image_crashes: int = 3, max_pixels: Optional[int] = None,
                 decode_threads: int = 4, expected_sha256: Optional[str] = None,
                 class_embeddings: Optional[ClassEmbeddings] = None):
        from pipeline.models.detector import load_detector
        from pipeline.models.weights import pick_device, resolve_detector_weights
        from pipeline.run.console import worker_logging

        worker_logging()
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        # per node, checked against the driver's copy; storage_options: credentials of a weights URL
        weights_path = resolve_detector_weights(cfg.weights, expected_sha256, cfg.storage_options)
        # class_embeddings: an open-vocabulary model's classes, made once on the driver (small; pickled by Ray)
        self.model, self.kwargs = load_detector(cfg, weights_path, self.device, class_embeddings)
        self.guard = CrashGuard(ledger, "detect", max_image_crashes)
        self.faults = InjectedFaults.from_env()
        self.decoder = ImageDecoder(decode_threads, max_pixels)
        self.clock = StageClock()
        log.info("detector %s on %s%s", weights_path, self.device,
                 f" (classes: {', '.join(class_embeddings.names)})" if class_embeddings is not None else "")

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        results: list = [None] * n
        statuses = batch.column("status").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        uris = batch.column("uri").to_pylist()
        ok = [i for i in range(n) if statuses[i] == "ok"]
        errors: dict[int, ImageError] = {}
        # Images are detected together; after a worker died on this batch, one at a time, so the
        # crash ledger can find the image responsible (run/faults.py): then each is decoded only
        # once it is announced, not ahead in the decode threads.
        one_by_one = bool(ok) and not self.guard.start_batch([uris[i] for i in ok])
        pending = {} if one_by_one else self.decoder.decode_rows(batch, ok)
        # Group images by shape: ultralytics letterboxes a same-shape batch exactly as it does a
        # single image, so boxes equal a per-image YOLO.predict, and no padding is wasted.
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in ok:
            by_shape[(heights[i], widths[i])].append(i)
        for (h, w), rows in by_shape.items():
            step = 1 if one_by_one else self.cfg.batch_size
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                if one_by_one and not self.guard.start(uris[chunk[0]]):
                    errors[chunk[0]] = self.guard.crash_error()
                    continue
                if self.faults:
                    for i in chunk:
                        self.faults.maybe_kill("detect", uris[i])
                if one_by_one:
                    pending.update(self.decoder.decode_rows(batch, chunk))
                images = {}
                for i in chunk:
                    pixels = pixels_or_error(pending.pop(i), (h, w))
                    if isinstance(pixels, ImageError):
                        errors[i] = pixels
                    else:
                        images[i] = pixels[:, :, ::-1]  # ultralytics takes numpy images as BGR (OpenCV order)
                if images:
                    with self.clock.time("detect"):
                        predicted = self.model.predict(list(images.values()), **self.kwargs)
                    for i, result in zip(images, predicted):
                        results[i] = detections_of(result)
        self.guard.done()
        self.clock.add("decode", self.decoder.take_seconds())
        batch = with_errors(batch, errors)
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        boxes, classes, scores = zip(*[r if r is not None else empty for r in results]) if n else ((), (), ())
        columns = {
            "det_boxes": [b.tolist() for b in boxes],
            "det_class_ids": [c.tolist() for c in classes],
            "det_scores": [s.tolist() for s in scores],
        }
        for name, typ in DETECTION_COLUMNS:
            batch = batch.append_column(pa.field(name, typ), pa.array(columns[name], type=typ))
        return self.clock.stamp(batch)
