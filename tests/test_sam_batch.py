"""SAM 2.1 in batches (``pipeline.sam.model``): faithful to the SAM 2 tutorial, image by image, and
bounded in memory however many objects an image holds.

The reference is the tutorial's own ``SAM2ImagePredictor.set_image`` + ``predict`` on the same
checkpoint file, one image at a time, and ``pycocotools.mask.encode`` for the RLE.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SAM_IMAGE_SIZE, real_photos
from pipeline.config import SamConfig
from pipeline.sam import masks as mask_codec
from pipeline.sam.model import SamModel
from pipeline.sam.prompts import Prompt


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


@pytest.fixture(scope="module")
def scenes():
    """Four real photos of different sizes, each with six boxes and two clicks."""
    rng = np.random.default_rng(3)
    out = []
    for name in ("bus", "zidane", "astronaut", "coffee"):
        rgb = real_photos()[name]
        h, w = rgb.shape[:2]
        corner = rng.uniform(0, 0.6, (6, 2)) * [w, h]
        boxes = np.hstack([corner, np.minimum(corner + rng.uniform(0.1, 0.4, (6, 2)) * [w, h], [w, h])]).astype(np.float32)
        clicks = (rng.uniform(0.1, 0.9, (2, 2)) * [w, h]).astype(np.float32)
        out.append((rgb, boxes, clicks))
    return out


def _prompts(boxes, clicks):
    return [Prompt(box=b) for b in boxes] + [Prompt(points=c[None], point_labels=np.array([1], np.int32)) for c in clicks]


def _tutorial_masks(tutorial, rgb, boxes, clicks):
    """Per image, as the tutorial does it: all boxes in one predict, the clicks (one object each)
    in another; a lone click gives three candidates, of which the best is kept, as the pipeline
    keeps it."""
    h, w = rgb.shape[:2]
    with torch.inference_mode():
        tutorial.set_image(rgb)
        masks, scores, _ = tutorial.predict(box=boxes, multimask_output=False)
        out = [(m > 0, float(s)) for m, s in zip(masks.reshape(len(boxes), h, w), scores.reshape(-1))]
        masks, scores, _ = tutorial.predict(point_coords=clicks[:, None, :], point_labels=np.ones((len(clicks), 1)),
                                            multimask_output=True)
        for m, s in zip(masks, scores):
            out.append((m[int(np.argmax(s))] > 0, float(s.max())))
    return out


def _compare(sam, tutorial, scenes):
    answers = sam.segment_batch([rgb for rgb, _, _ in scenes], [_prompts(b, c) for _, b, c in scenes])
    ious, exact = [], 0
    for (rgb, boxes, clicks), answer in zip(scenes, answers):
        for mine, (theirs, score) in zip(answer, _tutorial_masks(tutorial, rgb, boxes, clicks)):
            assert mine.scores[0] == pytest.approx(score, abs=1e-5)
            ious.append(mask_codec.iou(mine.masks[0], theirs))
            exact += mine.rles[0] == mask_codec.encode(theirs[None])[0]
    return ious, exact


def test_images_through_the_encoder_together_give_each_image_s_own_features(checkpoints, tutorial, scenes):
    """Four images of different sizes in one encoder pass: each one's features are exactly
    those ``set_image`` computes for it alone."""
    sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=4))
    with torch.inference_mode():
        together = sam._encode([rgb for rgb, _, _ in scenes])
        for k, (rgb, _, _) in enumerate(scenes):
            tutorial.set_image(rgb)
            assert torch.equal(together["image_embed"][k:k + 1], tutorial._features["image_embed"])
            for mine, theirs in zip(together["high_res_feats"], tutorial._features["high_res_feats"]):
                assert torch.equal(mine[k:k + 1], theirs)


def test_a_decoded_image_is_read_only_and_goes_to_torch_without_a_warning(checkpoints):
    """Pillow's buffer is read-only; torch.from_numpy over it warned (issue 21). The image is
    copied instead: no warning (any would be an error: pyproject's filterwarnings), same input."""
    import io
    import warnings

    from pipeline.io.decode import decode_image

    buffer = io.BytesIO()
    Image.fromarray(real_photos()["coffee"]).save(buffer, "PNG")
    decoded, _ = decode_image(buffer.getvalue())
    assert not decoded.flags.writeable
    sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = sam._preprocess(decoded)
    assert torch.equal(pixels, sam._preprocess(decoded.copy()))


def test_one_image_per_decoder_call_equals_the_tutorial_bit_for_bit(checkpoints, tutorial, scenes):
    """With one image per batch (``sam.batch_size=1``) the decoder calls are the tutorial's (all
    boxes of the image together, its clicks together): every mask and score is the tutorial's,
    to the bit, through the device finishing and the device RLE."""
    sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=1))
    calls = []
    hook = sam.model.sam_mask_decoder.register_forward_hook(lambda m, args, out: calls.append(len(out[0])))
    ious, exact = _compare(sam, tutorial, scenes)
    hook.remove()
    assert calls == [6, 2] * 4
    assert exact == len(ious) == 32, (exact, min(ious))


def test_prompts_of_several_images_in_one_decoder_call(checkpoints, tutorial, scenes):
    """Boxes of all four images in one decoder call, each with its own image's features: the
    masks match the tutorial's per-image calls (IoU >= 0.9999; a different batch size changes
    the last float bits of a logit, which can flip a pixel whose logit is within 1e-7 of 0)."""
    sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=4, box_chunk=64))
    calls = []
    hook = sam.model.sam_mask_decoder.register_forward_hook(lambda m, args, out: calls.append(len(out[0])))
    ious, exact = _compare(sam, tutorial, scenes)
    hook.remove()
    assert calls == [24, 8]  # all boxes together; all lone clicks together
    assert min(ious) >= 0.9999 and exact >= 0.9 * len(ious), (min(ious), exact)
    # control: the IoU bound tells masks apart (another box of the same image falls below it)
    other = mask_codec.iou(_tutorial_masks(tutorial, *scenes[0])[0][0], _tutorial_masks(tutorial, *scenes[0])[1][0])
    assert other < 0.9999


def test_a_decoder_call_split_by_oom_answers_as_one_prompt_per_call_bit_for_bit(checkpoints, scenes):
    """A decoder call out of GPU memory is split in halves down to one prompt (injected OOM for
    more than one prompt at a time): every prompt gets, to the bit, the answer of a run of one
    prompt per call (``box_chunk=1``), so no split loses, repeats, misplaces or mixes a prompt.
    Against one call of all prompts the answers differ only in the last float bits (CPU kernels
    round a batch of prompts differently; test_faults compares runs with this in mind): the
    same masks at IoU >= 0.9999, while another prompt's mask is far below (control)."""
    from pipeline.run.faults import InjectedFaults

    images, prompts = [rgb for rgb, _, _ in scenes], [_prompts(b, c) for _, b, c in scenes]

    def answers(box_chunk, faults=None):
        sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=4, box_chunk=box_chunk))
        sam.faults = faults
        calls = []
        hook = sam.model.sam_mask_decoder.register_forward_hook(lambda m, args, out: calls.append(len(out[0])))
        found = [a for image in sam.segment_batch(images, prompts) for a in image]
        hook.remove()
        return found, calls

    split, split_calls = answers(64, InjectedFaults(oom_over_prompts=1))
    alone, alone_calls = answers(1)
    together, together_calls = answers(64)
    assert split_calls == alone_calls == [1] * 32 and together_calls == [24, 8]
    assert [(a.rles, a.scores.tolist()) for a in split] == [(a.rles, a.scores.tolist()) for a in alone]
    ious = [mask_codec.iou(a.masks[0], b.masks[0]) for a, b in zip(split, together)]
    assert min(ious) >= 0.9999, min(ious)
    assert mask_codec.iou(split[0].masks[0], together[1].masks[0]) < 0.9999  # control: another box's mask


def test_the_gpu_reduction_of_masks_gives_the_cpu_s_answers(checkpoints, scenes):
    """On a GPU the masks are reduced with torch (run boundaries, areas, boxes) and only the runs
    cross to the host; on a CPU pycocotools encodes them. Both ways, on the same images and
    prompts (here on the CPU), give the same RLE, areas, boxes and quality metrics."""
    from pipeline.config import QaConfig

    results = []
    for on_device in (True, False):
        sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=4), qa=QaConfig())
        sam.reduce_on_device = on_device
        answers = sam.segment_batch([rgb for rgb, _, _ in scenes], [_prompts(b, c) for _, b, c in scenes])
        results.append([(a.rles, a.areas.tolist(), a.boxes.tolist(), a.quality) for image in answers for a in image])
    assert results[0] == results[1] and len(results[0]) == 32


def test_device_rle_equals_pycocotools():
    """Run boundaries found with torch, compressed by pycocotools, are the string
    ``pycocotools.mask.encode`` gives, on awkward masks: empty, full, 1x1, 1xN, Nx1, noise,
    holes, and masks touching every edge."""
    rng = np.random.default_rng(7)
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.ones((1, 1), bool), np.zeros((1, 1), bool),
             rng.random((1, 33)) > 0.5, rng.random((33, 1)) > 0.5]
    masks += [rng.random((rng.integers(1, 60), rng.integers(1, 60))) > p for p in np.linspace(0.05, 0.95, 30)]
    ring = np.zeros((40, 50), bool)
    ring[5:35, 5:45] = True
    ring[12:28, 15:35] = False
    masks += [ring, ~ring, np.pad(np.ones((3, 3), bool), 1), np.eye(20, dtype=bool), np.fliplr(np.eye(20, dtype=bool))]
    masks += [np.asarray(Image.fromarray(rng.random((64, 64)) > 0.5).resize((300, 200), Image.NEAREST)) for _ in range(9)]
    assert len(masks) >= 50
    for mask in masks:
        stats = mask_codec.device_stats(torch.from_numpy(np.array(mask, copy=True))[None])
        rle = mask_codec.rle_from_changes(bool(stats["first"][0]), stats["changes"].numpy(), *mask.shape)
        assert rle == mask_codec.encode(mask[None])[0]
        assert int(stats["area"][0]) == mask.sum()
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        assert stats["bbox"][0].tolist() == expected


def test_memory_stays_bounded_with_hundreds_of_objects_on_a_large_image(checkpoints, tmp_path):
    """300 boxes on a 12-megapixel photo: holding their masks would take 3.4 GB (as bytes; the
    float32 masks SAM's predict returns, four times that). Finished on the device slice by
    slice (``MASK_PIXELS`` at a time), segmenting them raises the peak RSS of a fresh process
    above what loading took by far less."""
    script = f"""
import json, resource, sys
import numpy as np
from PIL import Image
sys.path.insert(0, {str(REPO)!r})
from pipeline.config import SamConfig
from pipeline.sam.model import SamModel
from pipeline.sam.prompts import Prompt
rng = np.random.default_rng(0)
photo = np.asarray(Image.open({str(REPO / 'samples' / 'images' / 'bus.jpg')!r}).convert("RGB").resize((4000, 3000)))
corner = rng.uniform(0, 3000, (300, 2))
boxes = np.hstack([corner, corner + rng.uniform(50, 900, (300, 2))]).astype(np.float32)
sam = SamModel(SamConfig(checkpoint={str(checkpoints['sam'])!r}, image_size={SAM_IMAGE_SIZE}))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, the model and the photo
(answers,) = sam.segment_batch([photo], [[Prompt(box=b) for b in boxes]])
rles = [a.rles[0] for a in answers]
print(json.dumps({{"objects": len(rles), "area": int(sum(a.areas[0] for a in answers)),
                  "growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - loaded}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    masks_mb = 300 * 4000 * 3000 / 2**20  # the masks held as one byte per pixel: 3,433 MB
    assert result["objects"] == 300 and result["area"] > 0
    assert result["growth_mb"] < 1024 < masks_mb, result  # the peak grows by a bounded slice, not by the masks
