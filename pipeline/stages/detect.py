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
from pipeline.io.decode import ImageDecoder, decode_budget, fit_groups, pixels_or_error, with_errors
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


def letterbox_geometry(model, imgsz: int) -> tuple[list[int], int]:
    """(imgsz, stride) as ultralytics' predictor letterboxes with them for this model: the
    stride of its PyTorch backend (the model's largest, at least 32) and ``check_imgsz``."""
    from ultralytics.utils.checks import check_imgsz

    net = model.model
    stride = max(int(net.stride.max()), 32) if hasattr(net, "stride") else 32
    return check_imgsz(imgsz, stride=stride, min_dim=2), stride


def letterbox_shape(height: int, width: int, imgsz: list[int], stride: int) -> tuple[int, int]:
    """The (h, w) ultralytics' rect inference gives a lone image of this size: its predictor's
    ``pre_transform``, ``LetterBox(auto=True)`` (the long side to imgsz, the short side padded to
    a multiple of the stride). Many camera sizes share one: 4032x3024, 1600x1200 and 640x480 all
    go to 640x480 at imgsz 640. Computed from the size alone, no pixels."""
    from ultralytics.data.augment import LetterBox

    params = LetterBox(imgsz, auto=True, stride=stride).get_params({"img": np.empty((height, width, 0), np.uint8)})
    (w, h), top, bottom, left, right = params["new_unpad"], params["top"], params["bottom"], params["left"], params["right"]
    return h + top + bottom, w + left + right


def predict_together(model, images: list, **kwargs) -> list:
    """One ``model.predict`` over images that share a letterboxed shape, each letterboxed as it
    would be alone: the model gets each image exactly as a per-image ``predict`` gives it, and
    each result is bit for bit the one ultralytics gives that image in a batch of same-size
    images (a per-image ``predict`` differs from any batch in the last bits of its arithmetic).

    ultralytics letterboxes a batch with ``auto`` (the minimum rectangle) only when all its
    images have one size; images of different sizes would go to an imgsz square instead and
    their boxes would differ. ``stream=True`` sets the predictor up without running it, so its
    ``pre_transform`` can be told to take each image alone first (the predictor's own code, its
    own choice of ``auto``); the stacked batch has the group's shape, and the boxes are scaled
    back to each original image by ultralytics' own ``postprocess``. Any model with an
    ultralytics predictor (YOLOE, YOLO-World) can go through it.
    """
    results = model.predict(images, stream=True, **kwargs)
    _letterbox_each_alone(model.predictor)
    return list(results)


def _letterbox_each_alone(predictor) -> None:
    if getattr(predictor, "_letterbox_each_alone", False):
        return
    whole = predictor.pre_transform  # the class's method, bound to this predictor

    def pre_transform(images: list) -> list:
        if len({im.shape for im in images}) <= 1:
            return whole(images)
        out = [whole([im])[0] for im in images]
        if len({im.shape for im in out}) > 1:  # the stage groups by letterbox_shape: a bug, not an image's fault
            raise RuntimeError(f"images grouped as one letterbox shape went to {sorted({im.shape for im in out})}")
        return out

    predictor.pre_transform = pre_transform
    predictor._letterbox_each_alone = True


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
        # Group images by the shape ultralytics' rect inference letterboxes each to alone, not by
        # their size: images of many sizes go through YOLO together, and predict_together makes
        # each one's boxes those of a per-image YOLO.predict.
        if getattr(self, "_geometry", None) is None:  # once per actor (check_imgsz may log a warning)
            self._geometry = letterbox_geometry(self.model, self.cfg.imgsz)
        geometry = self._geometry
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in ok:
            by_shape[letterbox_shape(heights[i], widths[i], *geometry)].append(i)
        sizes = {i: heights[i] * widths[i] for i in ok}
        # Decoded pixels held at once stay within detector.decode_ahead_mp (a group of huge
        # images is cut smaller; one image always goes).
        budget = decode_budget(self.cfg.decode_ahead_mp, self.cfg.batch_size)
        step = 1 if one_by_one else self.cfg.batch_size
        groups = [chunk for rows in by_shape.values() for chunk in fit_groups(rows, sizes, step, budget)]
        pending = {} if one_by_one else self.decoder.ahead(batch, groups, sizes, budget)
        for chunk in groups:
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
                pixels = pixels_or_error(pending.pop(i), (heights[i], widths[i]))
                if isinstance(pixels, ImageError):
                    errors[i] = pixels
                else:
                    images[i] = pixels[:, :, ::-1]  # ultralytics takes numpy images as BGR (OpenCV order)
            if images:
                with self.clock.time("detect"):
                    predicted = predict_together(self.model, list(images.values()), **self.kwargs)
                self.clock.count("detect_calls")
                self.clock.count("detect_images", len(images))
                for i, result in zip(images, predicted):
                    results[i] = detections_of(result)
                del predicted  # results hold the original images
            images.clear()
            if not one_by_one:
                pending.release(chunk)
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
