"""Host work off the device loop (sam/host_work.py, sam/reduction.py, stages/segment.py).

- The segment stage with its host threads and two calls at once gives the objects rows of the
  serial path, and those rows are, independently: the SAM 2 tutorial's masks and scores
  (``SAM2ImagePredictor`` + ``pycocotools``), sam2's stability score on the tutorial's logits,
  and shapes measured with scipy on the whole mask. So before and after the change, on the CPU,
  the outputs are the same to the bit.
- Masks reduced the GPU's way (run boundaries in a fixed buffer, redone exactly when it
  overflows) are pycocotools' masks; a mask's crop rebuilt from its runs is the mask's crop.
- On the GPU stand-in (benchmarks/gpu_standin.py, a named fake device), every encoder batch's
  host work is still running when the device loop issues the next batch, across Ray calls too;
  measured with the stand-in's counters and events, not timings; a control with the host work
  in the device loop shows the test can fail.
"""
from __future__ import annotations

import io
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import REPO, SAM_IMAGE_SIZE, real_photos
from pipeline.config import QaConfig, SamConfig
from pipeline.sam import masks as mask_codec
from pipeline.sam import reduction
from pipeline.sam.host_work import mask_crop
from pipeline.stages import segment

sys.path.insert(0, str(REPO / "benchmarks"))
NAMES = ("bus", "zidane", "astronaut", "coffee")


def _batches(photos: dict, boxes_per_image: int, per_batch: int, seed: int = 0) -> list[pa.Table]:
    """The segment stage's input: PNG bytes, header facts and detector boxes, ``per_batch`` rows a batch."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, rgb in photos.items():
        h, w = rgb.shape[:2]
        png = io.BytesIO()
        Image.fromarray(rgb).save(png, "PNG")
        corner = rng.uniform(0, 0.6, (boxes_per_image, 2)) * [w, h]
        boxes = np.hstack([corner, np.minimum(corner + rng.uniform(0.15, 0.4, (boxes_per_image, 2)) * [w, h], [w, h])])
        rows.append({"uri": f"file:///{name}.png", "status": "ok", "error_class": None, "error": None, "width": w, "height": h,
                     "det_boxes": boxes.astype(np.float32).tolist(), "det_class_ids": [0] * boxes_per_image,
                     "det_scores": [0.9] * boxes_per_image, "data": png.getvalue()})
    table = pa.Table.from_pylist(rows)
    return [table.slice(i, per_batch) for i in range(0, len(rows), per_batch)]


def _objects(stage, batches, at_once: bool) -> list:
    if at_once:  # as Ray Data calls the actor: two calls at once
        with ThreadPoolExecutor(2) as calls:
            outputs = list(calls.map(stage, batches))
    else:
        outputs = [stage(b) for b in batches]
    return [image for out in outputs for image in out.column("objects").to_pylist()]


@pytest.fixture(scope="module")
def tutorial(checkpoints):
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    s = SAM_IMAGE_SIZE
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoints["sam"]), device="cpu",
                       hydra_overrides_extra=[f"++model.image_size={s}"])
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor


def _reference(tutorial, rgb: np.ndarray, boxes: np.ndarray, qa: QaConfig) -> list[dict]:
    """Per box, what the objects row must hold, computed without the pipeline's code."""
    from scipy import ndimage
    from pycocotools import mask as mask_utils
    from sam2.utils.amg import calculate_stability_score

    eight = np.ones((3, 3), bool)
    with torch.inference_mode():
        tutorial.set_image(rgb)
        logits, scores, _ = tutorial.predict(box=boxes, multimask_output=False, return_logits=True)
    logits = logits.reshape(len(boxes), *rgb.shape[:2])
    out = []
    for logit, score, box in zip(logits, scores.reshape(-1), boxes):
        mask = logit > 0
        rle = mask_utils.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
        labels, regions = ndimage.label(mask, structure=eight)
        sizes = np.bincount(labels.ravel())[1:]
        background, _ = ndimage.label(np.pad(~mask, 1, constant_values=True), structure=eight)
        outside_label = background[0, 0]
        holes = int(((background > 0) & (background != outside_label)).sum())
        ys, xs = np.nonzero(mask)
        tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        inside = int(((xs + 0.5 >= box[0]) & (xs + 0.5 <= box[2]) & (ys + 0.5 >= box[1]) & (ys + 0.5 <= box[3])).sum())
        iw = max(0.0, min(tight[2], box[2]) - max(tight[0], box[0]))
        ih = max(0.0, min(tight[3], box[3]) - max(tight[1], box[1]))
        union = (tight[2] - tight[0]) * (tight[3] - tight[1]) + (box[2] - box[0]) * (box[3] - box[1]) - iw * ih
        area = int(mask.sum())
        stability = float(calculate_stability_score(torch.from_numpy(logit[None]), 0.0, 1.0)[0])
        box_iou, outside = iw * ih / union, 1.0 - inside / area if area else 0.0
        flags = [name for name, on in (("low_score", score < qa.min_mask_score), ("unstable", stability < qa.min_stability),
                                        ("leaks_box", box_iou < qa.min_box_iou or outside > qa.max_outside_box),
                                        ("fragmented", regions > qa.max_regions), ("tiny", area < qa.min_area)) if on]
        out.append({"mask": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}, "area": area,
                    "mask_score": float(score), "stability": stability, "regions": regions,
                    "largest_region": float(sizes.max() / sizes.sum()) if regions else 0.0, "hole_area": holes,
                    "box_iou": box_iou, "outside_box": outside, "flags": flags})
    return out


def test_rows_off_the_device_loop_are_the_serial_path_s_and_the_tutorial_s(checkpoints, tutorial, monkeypatch):
    """Four photos, three boxes each, quality control on: two calls at once with two host
    threads, the same with masks reduced the GPU's way (run boundaries by torch), and the serial
    path (host work in the device loop, one call at a time) give the same rows; and those rows
    are the tutorial's masks (bit for bit, one image per encoder pass) with quality metrics that
    sam2 and scipy compute on the whole mask."""
    monkeypatch.setattr(segment, "worker_logging", lambda: None)  # this is the test process, not a Ray worker
    photos = {name: real_photos()[name] for name in NAMES}
    batches = _batches(photos, 3, 2)
    qa = QaConfig()
    cfg = SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=1)
    serial = _objects(segment.Segmenter(cfg, {0: "thing"}, qa=qa, host_threads=0), batches, at_once=False)
    stage = segment.Segmenter(cfg, {0: "thing"}, qa=qa, host_threads=2)
    assert _objects(stage, batches, at_once=True) == serial
    stage.sam.reduce_on_device = True  # the GPU's way, here on the CPU
    assert _objects(stage, batches, at_once=True) == serial
    checked = 0
    for (name, rgb), rows in zip(photos.items(), serial):
        boxes = np.array([r["box"] for r in rows], np.float32)
        for row, expected in zip(rows, _reference(tutorial, rgb, boxes, qa)):
            assert row["status"] == "ok" and row["mask"] == expected["mask"] and row["area"] == expected["area"]
            assert row["mask_score"] == pytest.approx(expected["mask_score"], abs=1e-5)
            assert row["stability"] == pytest.approx(expected["stability"], abs=1e-6)
            assert (row["regions"], row["hole_area"], row["flags"]) == (expected["regions"], expected["hole_area"], expected["flags"])
            for key in ("largest_region", "box_iou", "outside_box"):
                assert row[key] == pytest.approx(expected[key], abs=1e-6), key
            checked += 1
    assert checked == 12


def test_run_boundaries_in_a_fixed_buffer_and_their_exact_redo_are_pycocotools_masks(monkeypatch):
    """The GPU's reduction (``nonzero_static`` into a buffer of fixed capacity; a slice that
    overflows it redone exactly) on the CPU: with room for every boundary and with room for none,
    the masks are pycocotools' encoding of the thresholded upsampled logits, areas and tight boxes
    numpy's, and the crop rebuilt from the runs is the mask's crop."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(1)
    low_res = F.avg_pool2d(torch.randn(5, 1, 70, 70, generator=generator), 7, stride=1)  # smooth blobs and holes
    low_res[3] = -1.0  # an empty mask
    size = (90, 130)
    masks = (F.interpolate(low_res, size, mode="bilinear", align_corners=False)[:, 0] > 0).numpy()
    for per_column in (0, 64):
        monkeypatch.setattr(reduction, "RUNS_PER_COLUMN", per_column)
        chunk = reduction.reduce(low_res, torch.ones(5, 1), [size] * 5, [None] * 5, on_device=True, stability=False, keep_logits=False)
        (host,) = reduction.to_host([chunk], "cpu")
        for m, mask in enumerate(masks):
            run = host.runs[m][0]
            assert mask_codec.rle_from_changes(*run, *size) == mask_codec.encode(mask[None])[0]
            assert host.areas[m, 0] == mask.sum()
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
            assert host.boxes[m, 0].tolist() == box
            crop, x0, y0 = mask_crop(run, size, box)
            assert (x0, y0) == (box[0], box[1]) and np.array_equal(crop, mask[box[1]:box[3], box[0]:box[2]])
    assert masks.any(axis=(1, 2)).sum() == 4


# ---------------------------------------------------------------- the GPU stand-in

@pytest.fixture(scope="module")
def standin_workload():
    """Eight small photos with three boxes each, in two Ray batches of four, and the stand-in's answers."""
    from gpu_standin import Answers

    photos = {f"{name}{k}": np.asarray(Image.fromarray(rgb).resize((320, 240)))
              for k in range(2) for name, rgb in real_photos().items() if name in NAMES}
    batches = _batches(photos, 3, 4, seed=2)
    answers = Answers()
    for n, row in enumerate(pa.concat_tables(batches).to_pylist()):
        answers.add_image(row["uri"], photos[row["uri"][8:-4]], np.array(row["det_boxes"], np.float32), seed=n)
    return batches, answers


def _overlap(workload, monkeypatch, host_threads: int, at_once: bool, timeout: float):
    """The stage on the stand-in (sam.batch_size 2: two encoder batches per call). Each image's
    host work waits until the device loop has issued the encoder batch after the one that made
    the image (as long as there is one); returns whether each wait ended that way, and the stage."""
    from gpu_standin import SimulatedSam, box_key

    batches, answers = workload
    issued = threading.Condition()

    class Recording(SimulatedSam):
        """The stand-in, telling which encoder batch made each image."""

        batch_of: dict = {}

        def _encode(self, images, pad_to=None):
            with issued:
                features = super()._encode(images, pad_to)
                issued.notify_all()
            return features

        def _decode_chunk(self, features, jobs, uris, keep_all, keep_logits):
            for uri in uris:
                self.batch_of[uri] = self.encoded_batches
            return super()._decode_chunk(features, jobs, uris, keep_all, keep_logits)

    monkeypatch.setattr(segment, "worker_logging", lambda: None)
    monkeypatch.setattr(segment, "SamModel", lambda cfg, cpu_threads=None, qa=None, expected_sha256=None:
                        Recording(cfg, answers, 0.0, 0.0, qa))
    stage = segment.Segmenter(SamConfig(batch_size=2, checkpoint="random"), {0: "thing"}, qa=QaConfig(), host_threads=host_threads)
    uri_of = {key[1]: key[0] for key in answers.table}
    total = sum(b.num_rows for b in batches) // 2
    waits = []
    rows = stage._rows

    def waiting_rows(prompts, pending):
        made_by = stage.sam.batch_of[uri_of[box_key(None, prompts[0].box)[1]]]
        if made_by < total:
            with issued:
                waits.append(issued.wait_for(lambda: stage.sam.encoded_batches > made_by, timeout=timeout))
        return rows(prompts, pending)

    stage._rows = waiting_rows
    objects = _objects(stage, batches, at_once)
    return waits, stage, objects


def test_on_the_gpu_stand_in_the_host_works_while_the_device_loop_issues_the_next_batch(standin_workload, monkeypatch):
    """Two calls at once, two host threads: every image's host work (quality control, RLE, rows)
    is still running when the device loop issues the next encoder batch, within a call and from
    one call to the next; one wait for the device per encoder batch; at most ``2 * batch_size``
    images wait for the host, and the two calls' decoded pixels stay within one budget."""
    waits, stage, objects = _overlap(standin_workload, monkeypatch, host_threads=2, at_once=True, timeout=60)
    assert waits == [True] * 6  # eight images in four encoder batches: those of the first three waited
    assert stage.sam.encoded_batches == stage.sam.stream.syncs == 4
    assert 0 < stage.host.most_pending <= stage.host.ahead == 4
    assert 0 < stage.pixels.peak <= stage.pixels.pixels and stage.pixels.held == 0
    assert sum(len(o) for o in objects) == 24 and all(r["stability"] is not None for o in objects for r in o)


def test_control_with_host_work_in_the_device_loop_the_overlap_test_fails(standin_workload, monkeypatch):
    """CONTROL: host work in the device loop (no host threads) and one call at a time: no image's
    host work sees the next encoder batch issued (each wait gives up after half a second)."""
    waits, _, objects = _overlap(standin_workload, monkeypatch, host_threads=0, at_once=False, timeout=0.5)
    assert waits and not any(waits)
    assert sum(len(o) for o in objects) == 24
