"""Issue 18 parts 3 and 4: the detector batches images of different sizes that share a letterboxed
shape (boxes as a per-image YOLO.predict gives them), and decode-ahead is bounded in pixels."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import real_photos
from pipeline.io.decode import ImageDecoder, decode_budget, decode_rgb, fit_groups
from pipeline.stages.read import read_batch

PREDICT = dict(conf=0.04, iou=0.7, max_det=6, imgsz=320, verbose=False)
# A batch's arithmetic is not a lone image's bit for bit: on this CPU ultralytics' own batch of
# same-size images (what the detector always did) moves boxes by up to 0.06 letterboxed pixels
# (0.24 px of a 1280x720 image at imgsz 320) and scores by 1e-7 (YOLO) or 2e-5 (YOLOE) against a
# per-image predict. Against ultralytics' own same-size batch the mixed-size batch is exact.
LETTERBOX_ATOL, SCORE_ATOL = 0.1, 1e-4


def _photo(name: str, width: int, height: int) -> np.ndarray:
    return np.array(Image.fromarray(real_photos()[name]).resize((width, height), Image.BILINEAR))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ part 4: letterbox groups


def test_letterbox_shape_is_the_shape_ultralytics_predictor_gives_a_lone_image(checkpoints):
    """``letterbox_shape`` (from the size alone) against the predictor's own ``pre_transform`` of
    a lone image (its choice of auto, its stride and imgsz), for camera sizes, odd and thin ones;
    and ``letterbox_geometry`` against the predictor's stride and imgsz, a stride-64 model too."""
    from ultralytics import YOLO

    from pipeline.stages.detect import letterbox_geometry, letterbox_shape

    sizes = [(3024, 4032), (4032, 3024), (1080, 1920), (1200, 1600), (480, 640), (333, 777), (719, 1281), (17, 23),
             (1, 3000), (3000, 1), (640, 640)]
    for weights, imgsz in ((str(checkpoints["yolo"]), 320), (str(checkpoints["yolo"]), 640), ("yolov8n-p6.yaml", 352)):
        model = YOLO(weights)
        model.predict(np.zeros((64, 96, 3), np.uint8), imgsz=imgsz, verbose=False)  # sets the predictor up
        predictor = model.predictor
        geometry = letterbox_geometry(model, imgsz)
        assert geometry == (predictor.imgsz, predictor.model.stride), weights
        for h, w in sizes:
            alone = predictor.pre_transform([np.zeros((h, w, 3), np.uint8)])[0]
            assert letterbox_shape(h, w, *geometry) == alone.shape[:2], (weights, imgsz, h, w)
    assert geometry == ([384, 384], 64)  # imgsz 352 is no multiple of 64: ultralytics rounds it up
    shared = {letterbox_shape(h, w, [640, 640], 32) for h, w in [(3024, 4032), (1200, 1600), (480, 640)]}
    assert shared == {(480, 640)}  # many camera sizes share one shape


def _model_factory(kind: str, request):
    """A function making fresh models of one kind: the YOLO checkpoint, or a YOLOE with three
    classes from fixed random text features (open-vocabulary detectors go through the same path)."""
    import torch
    from ultralytics import YOLO, YOLOE

    if kind == "yolo":
        checkpoint = request.getfixturevalue("checkpoints")["yolo"]
        return lambda: YOLO(str(checkpoint))
    checkpoint = request.getfixturevalue("yoloe_checkpoint")
    raw = torch.randn(1, 3, 512, generator=torch.Generator().manual_seed(7))

    def make():
        model = YOLOE(str(checkpoint))
        with torch.no_grad():
            model.set_classes(["cat", "bus", "person"], model.model.model[-1].get_tpe(raw))
        return model

    return make


@pytest.mark.parametrize("kind", ["yolo", "yoloe"])
def test_predict_together_feeds_each_image_as_it_would_go_alone(kind, request, monkeypatch):
    """Images of four sizes with one letterboxed shape, in one predict: the tensor the model gets
    holds each image exactly as a per-image predict gives it; each image's boxes, classes and
    scores are bit for bit those ultralytics gives it in a batch of same-size images (what the
    detector did before), and those of a per-image predict up to a batch's arithmetic. Control:
    ultralytics' own predict of the mixed list letterboxes it to a square, other boxes."""
    import torch
    from ultralytics.engine.predictor import BasePredictor

    from pipeline.stages.detect import predict_together

    model = _model_factory(kind, request)
    seen = []
    preprocess = BasePredictor.preprocess
    monkeypatch.setattr(BasePredictor, "preprocess", lambda self, im: seen.append(preprocess(self, im)) or seen[-1])
    bgr = [_photo(name, w, h)[:, :, ::-1] for name, w, h in
           (("bus", 640, 480), ("zidane", 800, 600), ("coffee", 1024, 768), ("chelsea", 480, 360))]
    assert len({im.shape for im in bgr}) == 4
    together = predict_together(model(), bgr, **PREDICT)
    batch = seen.pop()
    assert batch.shape == (4, 3, 256, 320)
    alone_model = model()
    found = 0
    for k, (image, result) in enumerate(zip(bgr, together)):
        alone = alone_model.predict(image, **PREDICT)[0]
        assert torch.equal(batch[k], seen.pop()[0]), k  # the same input, bit for bit
        _assert_same_detections(result.boxes, alone.boxes, 320 / image.shape[1], k)
        # ultralytics' own batch: the other photos resized to this one's size, this one in its place
        same_size = [im if j == k else np.ascontiguousarray(_resize(im, image.shape[1], image.shape[0]))
                     for j, im in enumerate(bgr)]
        own = alone_model.predict(same_size, **PREDICT)[k]
        seen.pop()
        assert torch.equal(result.boxes.data, own.boxes.data), k
        found += len(alone.boxes)
    assert found >= 8, "the calibrated random detector must find boxes on these photos"

    plain = model().predict(bgr, **PREDICT)  # control: what ultralytics does with a mixed list
    assert seen.pop().shape == (4, 3, 320, 320)
    assert not all(_same(r.boxes, alone_model.predict(im, **PREDICT)[0].boxes, 320 / im.shape[1]) for im, r in zip(bgr, plain))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR))


def _same(mine, alone, gain: float) -> bool:
    return (len(mine) == len(alone) and mine.cls.tolist() == alone.cls.tolist()
            and np.allclose(mine.xyxy.numpy(), alone.xyxy.numpy(), atol=LETTERBOX_ATOL / gain)
            and np.allclose(mine.conf.numpy(), alone.conf.numpy(), atol=SCORE_ATOL))


def _assert_same_detections(mine, alone, gain: float, what) -> None:
    """Same count and classes; boxes within ``LETTERBOX_ATOL`` letterboxed pixels (``gain``:
    letterboxed pixels per original pixel), scores within ``SCORE_ATOL``."""
    assert len(mine) == len(alone), what
    assert mine.cls.tolist() == alone.cls.tolist(), what
    np.testing.assert_allclose(mine.xyxy.numpy(), alone.xyxy.numpy(), atol=LETTERBOX_ATOL / gain, err_msg=str(what))
    np.testing.assert_allclose(mine.conf.numpy(), alone.conf.numpy(), atol=SCORE_ATOL, err_msg=str(what))


def test_detector_groups_by_letterbox_shape_not_by_size(checkpoints, tmp_path):
    """Six photos of six sizes: three share one letterboxed shape, two another, one is alone. The
    detector makes three calls (by size it would make six); every image's boxes, classes and
    scores are those of a per-image YOLO.predict; run.json's timings get the mean batch size."""
    from ultralytics import YOLO

    from pipeline.config import DetectorConfig
    from pipeline.run.timings import Timings
    from pipeline.stages.detect import Detector, letterbox_geometry, letterbox_shape

    photos = [_photo("bus", 640, 480), _photo("chelsea", 640, 360), _photo("zidane", 800, 600),
              _photo("astronaut", 512, 512), _photo("coffee", 1280, 720), _photo("chelsea", 1024, 768)]
    paths = []
    for k, rgb in enumerate(photos):
        paths.append(tmp_path / f"{k}.png")
        paths[-1].write_bytes(_png(rgb))
    cfg = DetectorConfig(weights=str(checkpoints["yolo"]), conf=PREDICT["conf"], max_det=PREDICT["max_det"],
                         imgsz=PREDICT["imgsz"], batch_size=8)
    detector = Detector(cfg)
    geometry = letterbox_geometry(detector.model, cfg.imgsz)
    shapes = [letterbox_shape(*rgb.shape[:2], *geometry) for rgb in photos]
    assert shapes == [(256, 320), (192, 320), (256, 320), (320, 320), (192, 320), (256, 320)]
    assert len({rgb.shape for rgb in photos}) == 6  # control: grouped by size, each image would go alone

    calls = []
    predict = detector.model.predict
    detector.model.predict = lambda images, **kw: calls.append([im.shape[:2] for im in images]) or predict(images, **kw)
    out = detector(read_batch(pa.table({"uri": [f"file://{p}" for p in paths]})))
    assert [len(c) for c in calls] == [3, 2, 1]
    assert calls[0] == [(480, 640), (600, 800), (768, 1024)]  # three sizes in one call

    yolo = YOLO(str(checkpoints["yolo"]))
    found = 0
    for k, (path, row) in enumerate(zip(paths, out.to_pylist())):
        assert row["status"] == "ok"
        alone = yolo.predict(decode_rgb(path.read_bytes())[:, :, ::-1], **PREDICT)[0].boxes
        assert len(row["det_boxes"]) == len(alone), k
        assert row["det_class_ids"] == alone.cls.int().tolist(), k
        if len(alone):
            gain = min(shapes[k][0] / photos[k].shape[0], shapes[k][1] / photos[k].shape[1])
            np.testing.assert_allclose(np.array(row["det_boxes"]), alone.xyxy.numpy(), atol=LETTERBOX_ATOL / gain)
            np.testing.assert_allclose(row["det_scores"], alone.conf.numpy(), atol=SCORE_ATOL)
        found += len(alone)
    assert found >= 12, "the calibrated random detector must find boxes on these photos"

    timings = Timings()
    timings.add(out.select([c for c in out.column_names if c.startswith(("t_", "n_"))]).to_pylist())
    assert timings.as_dict()["detector"] == {"calls": 3, "images": 6, "mean_batch_size": 2.0}


def test_detector_cuts_a_group_to_its_decode_budget(checkpoints, tmp_path):
    """detector.decode_ahead_mp: four same-size photos, a budget of two of them: two calls of two;
    a budget under one photo: one at a time, every image still detected."""
    from pipeline.config import DetectorConfig
    from pipeline.stages.detect import Detector

    paths = []
    for k, name in enumerate(("bus", "zidane", "coffee", "chelsea")):
        paths.append(tmp_path / f"{k}.png")
        paths[-1].write_bytes(_png(_photo(name, 800, 600)))
    batch = read_batch(pa.table({"uri": [f"file://{p}" for p in paths]}))
    for budget_mp, expected in ((0.96, [2, 2]), (0.1, [1, 1, 1, 1]), (None, [4])):
        detector = Detector(DetectorConfig(weights=str(checkpoints["yolo"]), imgsz=320, decode_ahead_mp=budget_mp))
        calls = []
        predict = detector.model.predict
        detector.model.predict = lambda images, **kw: calls.append(len(images)) or predict(images, **kw)
        out = detector(batch)
        assert calls == expected, budget_mp
        assert out.column("status").to_pylist() == ["ok"] * 4


# ------------------------------------------------------------------ part 3: decode-ahead in pixels


def test_fit_groups_bounds_each_group_by_count_and_pixels():
    pixels = {0: 5, 1: 5, 2: 5, 3: 30, 4: 2, 5: 2, 6: 2}
    assert fit_groups(list(pixels), pixels, 8, 12) == [[0, 1], [2], [3], [4, 5, 6]]  # 3 is over budget: alone
    assert fit_groups(list(pixels), pixels, 2, 100) == [[0, 1], [2, 3], [4, 5], [6]]
    assert fit_groups([], pixels, 2, 100) == []
    assert decode_budget(None, 16) == 16 * 12e6 and decode_budget(2.5, 16) == 2.5e6


def test_decode_ahead_holds_at_most_its_budget_and_always_one_image():
    """Pixels decoded or decoding at once never exceed the budget, except one image alone that is
    larger than it; every image comes out as decode_rgb makes it."""
    photos = [_photo("bus", 300, 200), _photo("coffee", 300, 200), _photo("zidane", 1200, 900),
              _photo("chelsea", 300, 200), _photo("astronaut", 300, 200)]
    data = [_png(p) for p in photos]
    batch = pa.table({"data": pa.array(data, pa.binary())})
    sizes = {i: p.shape[0] * p.shape[1] for i, p in enumerate(photos)}
    decoder = ImageDecoder(4)
    for budget, expected_groups, expected_peak in ((130_000, [[0, 1], [2], [3, 4]], 1_080_000), (1e9, [[0, 1, 2, 3, 4]], sum(sizes.values()))):
        groups = fit_groups(list(sizes), sizes, 8, budget)
        assert groups == expected_groups
        ahead = decoder.ahead(batch, groups, sizes, budget)
        for group in groups:
            assert ahead.held <= max(budget, max(sizes[i] for i in group))
            for i in group:
                np.testing.assert_array_equal(ahead.pop(i).result(), decode_rgb(data[i]))
            ahead.release(group)
        assert ahead.held == 0 and not ahead.futures
        assert ahead.peak == expected_peak  # the big image alone; or everything at once


def test_segmenter_cuts_its_encoder_passes_to_its_decode_budget(checkpoints, monkeypatch):
    """sam.decode_ahead_mp: six small photos, a budget of two: encoder passes of two; the default
    (24 MP x sam.batch_size): one pass of sam.batch_size, as before; the objects the same."""
    from pipeline.config import SamConfig
    from pipeline.stages import segment

    monkeypatch.setattr(segment, "_actor_identity", lambda: (None, None))  # outside Ray: do not start one to ask
    photos = [_photo(name, 200, 150) for name in ("bus", "zidane", "coffee", "chelsea", "astronaut", "bus")]
    batch = pa.table({"uri": [f"{k}.png" for k in range(6)], "status": ["ok"] * 6, "width": [200] * 6, "height": [150] * 6,
                      "data": pa.array([_png(p) for p in photos], pa.binary()),
                      "det_boxes": pa.array([[[50.0, 40.0, 150.0, 110.0]]] * 6, pa.list_(pa.list_(pa.float32(), 4))),
                      "det_class_ids": pa.array([[0]] * 6, pa.list_(pa.int32())),
                      "det_scores": pa.array([[0.9]] * 6, pa.list_(pa.float32()))})
    objects = {}
    for budget_mp, expected in ((0.06, [2, 2, 2]), (None, [4, 2])):
        cfg = SamConfig(checkpoint=str(checkpoints["sam"]), image_size=256, batch_size=4, decode_ahead_mp=budget_mp)
        segmenter = segment.Segmenter(cfg, {0: "thing"})
        passes = []
        segment_batch = segmenter.sam.segment_batch
        segmenter.sam.segment_batch = lambda images, *a, **k: passes.append(len(images)) or segment_batch(images, *a, **k)
        out = segmenter(batch)
        assert passes == expected, budget_mp
        objects[budget_mp] = [[o["mask"] for o in obj] for obj in out.column("objects").to_pylist()]
    assert objects[0.06] == objects[None]


@pytest.fixture(scope="module")
def twelve_mp_photos(tmp_path_factory) -> list[Path]:
    """Four real photos resized to 4032x3024 (12.2 MP, a phone camera's JPEG)."""
    folder = tmp_path_factory.mktemp("12mp")
    paths = []
    for name in ("bus", "zidane", "astronaut", "coffee"):
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(real_photos()[name]).resize((4032, 3024), Image.BILINEAR).save(paths[-1], quality=90)
    return paths


PHOTO_MB = 4032 * 3024 * 3 / 2**20  # one decoded 12-MP photo: 34.9 MiB


def _probe(*args) -> dict:
    probe = Path(__file__).with_name("rss_probe.py")
    done = subprocess.run([sys.executable, str(probe), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_decode_ahead_peak_memory_is_bounded_by_the_budget(twelve_mp_photos):
    """16 photos of 12 MP through the decode-ahead, with a consumer that lets every decode the
    budget allows finish before it takes an image. A budget of one photo peaks no higher than
    decoding a single photo does (the control) plus one photo; a budget of all of them holds them
    all at once (as decoding a whole batch ahead did before)."""
    photos = [twelve_mp_photos[i % 4] for i in range(16)]
    one = _probe("decoder", 12, photos[0])
    small = _probe("decoder", 12, *photos)
    large = _probe("decoder", 16 * 12.2, *photos)
    assert small["outputs"] == large["outputs"] and len(set(small["outputs"])) == 4
    assert small["peak_mb"] <= one["peak_mb"] + PHOTO_MB, (one, small)
    assert large["peak_mb"] >= one["peak_mb"] + 12 * PHOTO_MB, (one, large)


@pytest.mark.slow
def test_segmenter_peak_memory_is_bounded_by_sam_decode_ahead_mp(twelve_mp_photos, checkpoints, tmp_path):
    """The SAM stage over six 12-MP photos: with sam.decode_ahead_mp of one photo it holds one
    at a time (encoder passes of one image); with room for all six, all six are decoded at once.
    The masks come out the same either way, up to the last bits of the encoder's batch arithmetic
    (as with any sam.batch_size: measured, 3 pixels of 10 million)."""
    from pycocotools import mask as coco

    warm = tmp_path / "warm.jpg"
    Image.fromarray(real_photos()["chelsea"]).save(warm)
    photos = [twelve_mp_photos[i % 4] for i in range(6)]
    small = _probe("segmenter", 12, *photos, "--sam", checkpoints["sam"], "--warm", warm)
    large = _probe("segmenter", 6 * 12.2, *photos, "--sam", checkpoints["sam"], "--warm", warm)
    rle = [[dict(m, counts=m["counts"].encode()) for m in run["outputs"]] for run in (small, large)]
    ious = [coco.iou([a], [b], [0])[0][0] for a, b in zip(*rle)]
    assert min(ious) > 0.99999, ious
    assert coco.iou([rle[0][0]], [rle[0][1]], [0])[0][0] < 0.9  # control: other photos, other masks
    np.testing.assert_allclose(small["scores"], large["scores"], atol=1e-5)
    assert large["peak_mb"] - small["peak_mb"] >= 4 * PHOTO_MB, (small, large)
