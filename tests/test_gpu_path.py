"""The GPU code path without a GPU (issue 16, items 10, 11, 18, 19).

No GPU can be had in CI, so each test stands one in where the GPU would matter, named as a fake:
an image encoder that runs out of memory above a set batch (the real model runs on the CPU
below it), a SAM model that says it sits on ``cuda``, CUDA timing events that record which
stream they were put on. Everything else is the real code.

- An encoder pass out of memory halves the batch, and the padding shrinks with it: 4 -> 2 -> 1,
  and every image gets its masks (the un-faulted run's, bit for bit).
- After a worker crash (one image at a time) nothing is padded.
- TF32 is switched on in the job's SAM actors only; ``predict`` and the Python API leave the
  process's settings as they were.
- Timing events are recorded on the model's device's stream (``predict --device cuda:1``).
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import SAM_IMAGE_SIZE, real_photos
from pipeline.models import weights as models
from pipeline.stages import segment
from pipeline.config import SamConfig
from pipeline.predict import Predictor
from pipeline.sam.prompts import Prompt
from pipeline.sam.model import SamModel, SegmentOOM


class FakeGpuMemory:
    """Stands in for a GPU's memory, which a CPU cannot run out of on demand: the image encoder
    raises CUDA out-of-memory for any pass of more than ``fits`` images (blank padding images
    included), as a real GPU does for a batch too large; smaller passes run the real encoder."""

    def __init__(self, forward_image, fits: int = 1):
        self.forward_image = forward_image
        self.fits = fits
        self.passes: list[int] = []  # images per encoder pass, as asked

    def __call__(self, batch):
        self.passes.append(int(batch.shape[0]))
        if batch.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"fake GPU: CUDA out of memory ({batch.shape[0]} images at once)")
        return self.forward_image(batch)


def _scenes():
    """Four real photos of different sizes, two boxes each."""
    out = []
    for name in ("bus", "zidane", "astronaut", "coffee"):
        rgb = real_photos()[name]
        h, w = rgb.shape[:2]
        boxes = np.array([[0.1 * w, 0.1 * h, 0.6 * w, 0.7 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.95 * h]], np.float32)
        out.append((rgb, [Prompt(box=b) for b in boxes]))
    return out


def _masks(answers) -> list:
    return [[(a.rles[0], float(a.scores[0])) for a in image] for image in answers]


def test_an_encoder_out_of_memory_halves_the_padded_batch_and_every_image_is_segmented(checkpoints, caplog):
    """sam.batch_size=4, padding on (as on a GPU), an encoder that fits one image: the passes are
    4, 2, then one image at a time, and every image gets the masks of an un-faulted run that
    encodes one image per pass. (Before: every pass was padded back to 4, so halving never
    helped and all four images became ``oom`` error rows.)"""
    scenes = _scenes()
    sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=4))
    sam.pad_batches = True  # what a CUDA device (or sam.compile) turns on
    fake = sam.model.forward_image = FakeGpuMemory(sam.model.forward_image, fits=1)
    answers = sam.segment_batch([rgb for rgb, _ in scenes], [p for _, p in scenes])
    assert fake.passes == [4, 2, 1, 1, 1, 1]
    assert not any(isinstance(a, SegmentOOM) for a in answers)
    assert "retrying 2 at a time" in caplog.text and "retrying 1 at a time" in caplog.text
    reference = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=1))
    expected = _masks(reference.segment_batch([rgb for rgb, _ in scenes], [p for _, p in scenes]))
    assert _masks(answers) == expected and len(expected) == 4 and all(len(m) == 2 for m in expected)


def test_one_image_that_does_not_fit_even_alone_is_tried_twice_then_an_oom_row(checkpoints):
    """CONTROL for the test above: an encoder that fits nothing fails each image alone twice
    (the second time after the cache was emptied) and makes it an ``oom`` answer, the others
    unaffected by it."""
    (rgb, prompts), = _scenes()[:1]
    sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=2))
    sam.pad_batches = True
    fake = sam.model.forward_image = FakeGpuMemory(sam.model.forward_image, fits=0)
    (answer,) = sam.segment_batch([rgb], [prompts])
    assert fake.passes == [2, 1, 1]  # padded to the step, halved, then the lone image twice
    assert isinstance(answer, SegmentOOM) and answer.error_class == "oom" and "fake GPU" in str(answer)


def test_after_a_worker_crash_one_image_at_a_time_is_not_padded(checkpoints, monkeypatch):
    """The segment stage goes one image at a time when its batch may have killed a worker (here:
    a batch of one image, which the crash guard treats that way). Such a pass is one image, not
    padded to sam.batch_size: an encoder that fits one image segments it."""
    monkeypatch.setattr(segment, "worker_logging", lambda: None)  # this is the test process, not a Ray worker
    rgb = real_photos()["zidane"]
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    h, w = rgb.shape[:2]
    batch = pa.table({"uri": ["file:///zidane.png"], "status": ["ok"], "error_class": pa.array([None], pa.string()),
                      "error": pa.array([None], pa.string()), "width": pa.array([w], pa.int32()), "height": pa.array([h], pa.int32()),
                      "det_boxes": [[[0.1 * w, 0.1 * h, 0.6 * w, 0.9 * h]]], "det_class_ids": [[0]], "det_scores": [[0.9]],
                      "data": [png.getvalue()]})
    stage = segment.Segmenter(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, batch_size=4), {0: "person"})
    stage.sam.pad_batches = True
    fake = stage.sam.model.forward_image = FakeGpuMemory(stage.sam.model.forward_image, fits=1)
    out = stage(batch).to_pylist()[0]
    assert out["status"] == "ok", out["error"]
    assert fake.passes == [1] and [o["status"] for o in out["objects"]] == ["ok"]


def _tf32() -> tuple:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()


class _StopHere(Exception):
    pass


def test_predict_and_the_python_api_leave_tf32_alone(checkpoints, monkeypatch, tmp_path):
    """TF32 is a process-wide torch setting: a notebook that loads a Predictor must not find its
    float32 matmuls changed. A Predictor on a (fake) CUDA device is built up to the model, where
    the test stops it (the model itself would need a GPU); the settings are unchanged. Then a
    real one on the CPU predicts: unchanged too."""
    before = _tf32()
    monkeypatch.setattr(models, "pick_device", lambda requested: torch.device("cuda"))  # fake: no GPU here

    def stop(*args, **kwargs):
        raise _StopHere

    monkeypatch.setattr(models, "build_sam_model", stop)
    with pytest.raises(_StopHere):
        Predictor(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, device="cuda")
    assert _tf32() == before
    monkeypatch.undo()
    result = Predictor(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, device="cpu").predict(
        real_photos()["coffee"], box=[50, 50, 300, 250])
    assert result.masks.shape[0] >= 1
    assert _tf32() == before


def test_the_job_s_sam_actors_switch_tf32_on(monkeypatch):
    """The other side: a Segmenter (a Ray actor of the job, a process of its own) whose model is
    on a GPU switches TF32 on. The model is a fake that says it is on ``cuda``."""
    monkeypatch.setattr(segment, "worker_logging", lambda: None)

    class FakeCudaSam:
        """Stands in for a SamModel on a GPU."""

        def __init__(self, *args, **kwargs):
            self.device = torch.device("cuda")

    monkeypatch.setattr(segment, "SamModel", FakeCudaSam)
    before = _tf32()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        segment.Segmenter(SamConfig(), {0: "person"})
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:  # this process is the test session's: its settings go back as they were
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


class FakeStream:
    """Stands in for a CUDA stream: which device's stream it is."""

    def __init__(self, device):
        self.device = device


class FakeEvent:
    """Stands in for ``torch.cuda.Event``: records the stream it was recorded on; 250 ms apart."""

    def __init__(self, enable_timing: bool = False):
        self.stream = "never recorded"

    def record(self, stream=None):
        self.stream = stream

    def synchronize(self):
        pass

    def elapsed_time(self, end) -> float:
        return 250.0


def test_timing_events_are_recorded_on_the_model_s_device(checkpoints, monkeypatch):
    """``predict --device cuda:1``: the model runs on GPU 1 while GPU 0 is the current device.
    Its timing events must be recorded on GPU 1's stream: an event on GPU 0's stream would time
    nothing of the model's work (and elapsed_time across devices fails). The events and streams
    are fakes that remember where they were recorded."""
    sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE))
    sam.device = torch.device("cuda", 1)  # only the timing code runs below: it sees a model on GPU 1
    asked = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device) or FakeStream(device))
    started = sam._mark()
    sam._elapsed(started, "encode")
    (_, _, ended), = sam._events
    sam._settle()
    assert asked == [torch.device("cuda", 1)] * 2
    assert isinstance(started.stream, FakeStream) and started.stream.device == torch.device("cuda", 1)
    assert isinstance(ended.stream, FakeStream) and ended.stream.device == torch.device("cuda", 1)
    assert sam.clock.spent["encode"] == pytest.approx(0.25) and sam.busy_s == pytest.approx(0.25)
