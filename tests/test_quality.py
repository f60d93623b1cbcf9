"""Quality control on hand-made masks whose metrics are known exactly (a ring, two blobs, a mask
half outside its box, a duplicate pair), and against SAM 2's own functions on the same data
(``calculate_stability_score``, ``remove_small_regions``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import QaConfig
from pipeline.sam import masks as mask_codec
from pipeline.sam import quality
from pipeline.sam.model import stability_score


def _ring() -> np.ndarray:
    mask = np.zeros((40, 50), bool)
    mask[5:35, 5:45] = True
    mask[12:28, 15:35] = False  # a 16 x 20 hole
    return mask


def _crop(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], int(xs.min()), int(ys.min())


def test_shape_of_a_ring_two_blobs_and_nothing():
    assert quality.shape(_crop(_ring())[0]) == (1, 1.0, 16 * 20)
    blobs = np.zeros((30, 30), bool)
    blobs[0:10, 0:10] = True
    blobs[20:25, 20:25] = True
    assert quality.shape(_crop(blobs)[0]) == (2, pytest.approx(100 / 125), 0)
    notch = np.ones((10, 10), bool)
    notch[4:6, 0:3] = False  # a bay open to the outside is not a hole
    assert quality.shape(notch) == (1, 1.0, 0)
    assert quality.shape(np.zeros((0, 0), bool)) == (0, 0.0, 0)


def test_a_mask_half_outside_its_box():
    mask = np.zeros((20, 40), bool)
    mask[0:20, 0:20] = True
    crop, x0, y0 = _crop(mask)
    inside = quality.pixels_inside(crop, x0, y0, [10, 0, 30, 20])
    assert inside == 200  # the columns whose pixel centres (x + 0.5) lie in [10, 30]
    box_iou, outside = quality.box_agreement([0, 0, 20, 20], [10, 0, 30, 20], int(mask.sum()), inside)
    assert box_iou == pytest.approx(200 / 600) and outside == pytest.approx(0.5)
    assert quality.box_agreement([0, 0, 20, 20], None, 400, 0) == (None, None)
    assert quality.box_agreement([0, 0, 20, 20], [0, 0, 20, 20], 400, 400) == (1.0, 0.0)  # control: a perfect fit


def test_stability_equals_sam2_on_the_same_logits(checkpoints):
    """Our device stability score and sam2.utils.amg.calculate_stability_score on the same logits:
    random ones, and SAM's own full-resolution logits for real photos (the tutorial's predict)."""
    from sam2.utils.amg import calculate_stability_score

    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 64, 80, generator=generator) * s for s in (0.5, 2.0, 8.0)]
    from PIL import Image
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from conftest import REPO, SAM_IMAGE_SIZE

    s = SAM_IMAGE_SIZE
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoints["sam"]), device="cpu",
                       hydra_overrides_extra=[f"++model.image_size={s}"])
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    image = np.array(Image.open(REPO / "samples" / "images" / "bus.jpg").convert("RGB"))  # writable, as the tutorial's
    with torch.inference_mode():
        predictor.set_image(image)
        sam_logits, _, _ = predictor.predict(box=np.array([[50, 400, 250, 900], [0, 0, 810, 1080]], np.float32),
                                             multimask_output=False, return_logits=True)
    logits.append(torch.from_numpy(sam_logits.reshape(2, *image.shape[:2])))
    for batch in logits:
        mine = stability_score(batch)
        theirs = calculate_stability_score(batch, 0.0, 1.0)
        assert torch.equal(mine, theirs.to(mine.dtype)), (mine, theirs)
    assert stability_score(torch.full((1, 4, 4), -5.0)).item() == 1.0  # nothing above -1: SAM's decoder calls that stable


def test_clean_up_equals_sam2_remove_small_regions_on_the_whole_mask():
    """Islands and holes removed on the mask's bounding-box crop (with a background frame) equal
    SAM's remove_small_regions on the whole image's mask."""
    from sam2.utils.amg import remove_small_regions

    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = np.zeros((60, 80), bool)
        mask[10:50, 15:65] = True
        for _ in range(6):  # holes of several sizes
            y, x, r = rng.integers(14, 46), rng.integers(19, 61), rng.integers(1, 4)
            mask[y - r:y + r, x - r:x + r] = False
        for _ in range(4):  # islands
            y, x, r = rng.integers(0, 58), rng.integers(0, 12), rng.integers(1, 3)
            mask[y:y + r, x:x + r] = True
        crop, x0, y0 = _crop(mask)
        cleaned, changed = quality.clean(crop, 10, 20)
        expected, _ = remove_small_regions(mask, 10, "islands")
        expected, _ = remove_small_regions(expected, 20, "holes")
        full = np.zeros_like(mask)
        full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = cleaned
        assert np.array_equal(full, expected)
        assert changed == (not np.array_equal(expected, mask))


def _row(object_id, mask, score, class_name="cat", candidate=0):
    return {"object_id": object_id, "candidate": candidate, "status": "ok", "class_name": class_name, "mask_score": score,
            "area": int(mask.sum()), "mask": mask_codec.encode(mask[None])[0], "duplicate_of": None}


def test_duplicates_are_marked_not_dropped():
    a = np.zeros((40, 40), bool)
    a[5:25, 5:25] = True
    b = a.copy()
    b[5, 5] = False  # nearly the same mask
    far = np.zeros((40, 40), bool)
    far[30:38, 30:38] = True
    inner = np.zeros((40, 40), bool)
    inner[10:15, 10:15] = True  # inside a, IoU small, intersection over the smaller mask 1
    rows = [_row(0, a, 0.8), _row(1, b, 0.9), _row(2, far, 0.95), _row(3, a, 0.7, "dog"), _row(4, inner, 0.5),
            _row(1, b, 0.6, candidate=1)]
    quality.mark_duplicates(rows, QaConfig(dedup="iou", dedup_threshold=0.8))
    status = [(r["object_id"], r["candidate"], r["status"], r["duplicate_of"]) for r in rows]
    # the better-scored of the pair (1) is kept; 0 points at it, and so does nothing else
    assert status == [(0, 0, "duplicate", 1), (1, 0, "ok", None), (2, 0, "ok", None), (3, 0, "ok", None),
                      (4, 0, "ok", None), (1, 1, "ok", None)]
    rows = [_row(0, a, 0.8), _row(4, inner, 0.5), _row(3, a, 0.7, "dog")]
    quality.mark_duplicates(rows, QaConfig(dedup="ios", dedup_threshold=0.8, dedup_class_aware=False))
    assert [r["status"] for r in rows] == ["ok", "duplicate", "duplicate"]  # any class; inner lies wholly in a
    rows = [_row(0, a, 0.8), _row(1, b, 0.9)]
    quality.mark_duplicates(rows, QaConfig(dedup="off"))
    assert [r["status"] for r in rows] == ["ok", "ok"]  # off by default


def test_flags_name_every_reason():
    qa = QaConfig()
    good = {"status": "ok", "mask_score": 0.95, "stability": 0.97, "box_iou": 0.9, "outside_box": 0.02, "regions": 1,
            "area": 5000}
    quality.flag(row := dict(good), qa)
    assert row["flags"] == [] and row["needs_review"] is False
    bad = {"status": "duplicate", "mask_score": 0.3, "stability": 0.5, "box_iou": 0.9, "outside_box": 0.6, "regions": 7,
           "area": 10}
    quality.flag(row := dict(bad), qa)
    assert row["flags"] == ["low_score", "unstable", "leaks_box", "fragmented", "tiny", "duplicate"] and row["needs_review"]
    quality.flag(row := {**good, "box_iou": None, "outside_box": None}, qa)
    assert row["flags"] == []  # no box prompt: box agreement is not judged
    quality.flag(row := {**good, "box_iou": 0.3}, qa)
    assert row["flags"] == ["leaks_box"]
