"""Open-vocabulary classes (pipeline/models/yoloe.py) against ultralytics' own YOLOE and YOLO-World.

Random-weight models built from their yamls; text embeddings are random text features passed
through the head's ``get_tpe`` (what ``get_text_pe`` does after the encoder), saved with
``save_prompt_embeddings``: our path's boxes, scores and class names must equal
``YOLOE.predict`` after ``load_prompt_embeddings``, and by example, YOLOE's own visual-prompt
predict with ``refer_image``. Offline, without an encoder, the errors name both ways out.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import real_photos
from model_factory import make_open_vocab_checkpoint
from pipeline.config import ConfigError
from pipeline.models.yoloe import (
    TextEncoderError, apply_embeddings, class_names, detect, encoder_problem, load_open_vocab, load_with_embeddings,
    predict_kwargs, resolve_class_embeddings,
)

IMGSZ = 256
KWARGS = predict_kwargs(conf=0.1, iou=0.7, max_det=12, imgsz=IMGSZ)
NAMES = ["forklift", "pallet", "person"]


class StubTextModel:
    """ultralytics' text-model interface (``tokenize``, ``encode_text``) over a fixed random table:
    stands in for MobileCLIP / CLIP, whose weights cannot be downloaded here."""

    def __init__(self, words: list[str], dim: int = 512, seed: int = 1):
        self.index = {w: i for i, w in enumerate(words)}
        self.table = torch.randn(len(words), dim, generator=torch.Generator().manual_seed(seed))

    def tokenize(self, texts):
        return torch.tensor([self.index[t] for t in texts])

    def encode_text(self, tokens, dtype=torch.float32):
        return self.table[tokens].to(dtype)

    def raw(self, names):  # (1, n, dim), as get_text_pe reshapes the encoder's output
        return self.table[self.tokenize(names)][None]


ENCODER = StubTextModel(NAMES + ["chair"])


@pytest.fixture(scope="module")
def photos() -> dict:
    return {name: np.ascontiguousarray(rgb[:, :, ::-1]) for name, rgb in real_photos().items()}  # BGR, as the detector hands them


@pytest.fixture(scope="module")
def yoloe_ckpt(yoloe_checkpoint):
    return yoloe_checkpoint  # conftest's, shared with the end-to-end tests (tests/test_open_vocab.py)


@pytest.fixture(scope="module")
def reference_npz(yoloe_ckpt, tmp_path_factory):
    """Random text features through the head's get_tpe, saved by ultralytics' save_prompt_embeddings."""
    from ultralytics import YOLOE

    model = YOLOE(str(yoloe_ckpt))
    with torch.no_grad():
        tpe = model.model.model[-1].get_tpe(ENCODER.raw(NAMES))
    model.set_classes(NAMES, tpe)
    return model.save_prompt_embeddings(tmp_path_factory.mktemp("npz") / "classes.npz")


def ultralytics_yoloe(ckpt, npz):
    from ultralytics import YOLOE

    model = YOLOE(str(ckpt))
    model.load_prompt_embeddings(npz)
    return model


def assert_same(ours, result, exact=True):
    boxes, ids, scores = ours
    assert len(boxes) == len(result.boxes)
    if exact:
        np.testing.assert_array_equal(boxes, result.boxes.xyxy.numpy())
        np.testing.assert_array_equal(scores, result.boxes.conf.numpy())
    else:  # a batch letterboxes like a single image, but the convolutions may round differently
        np.testing.assert_allclose(boxes, result.boxes.xyxy.numpy(), atol=0.05)
        np.testing.assert_allclose(scores, result.boxes.conf.numpy(), atol=1e-4)
    assert ids.tolist() == result.boxes.cls.int().tolist()
    return len(boxes)


def test_text_classes_equal_yoloe_predict_per_image_and_in_batches(yoloe_ckpt, reference_npz, photos):
    driver = load_open_vocab(str(yoloe_ckpt))
    embeddings = resolve_class_embeddings(driver, NAMES, encoder=ENCODER)
    assert embeddings.names == tuple(NAMES) and embeddings.source == "text" and embeddings.model == "yoloe-11s"
    with np.load(reference_npz) as ref:  # our text path makes ultralytics' file, value for value
        np.testing.assert_array_equal(embeddings.array(), ref["embeddings"])
        assert ref["names"].tolist() == NAMES and str(ref["model"]) == "yoloe-11s"

    theirs = ultralytics_yoloe(yoloe_ckpt, reference_npz)
    actor = load_with_embeddings(str(yoloe_ckpt), embeddings)
    assert class_names(actor) == dict(enumerate(NAMES)) == theirs.names
    compared = 0
    for image in photos.values():  # per image, each at its own shape
        compared += assert_same(detect(actor, [image], **KWARGS)[0], theirs.predict(image, **KWARGS)[0])
    crops = [np.ascontiguousarray(p[:300, :448]) for p in photos.values()]  # one shape: batched as the detect stage does
    for ours, crop in zip(detect(actor, crops, **KWARGS), crops):
        compared += assert_same(ours, theirs.predict(crop, **KWARGS)[0], exact=False)
    assert compared >= 20, "the calibrated random YOLOE must find boxes"

    # control: the same names in another order give the same boxes with other class ids
    reordered = load_with_embeddings(str(yoloe_ckpt), resolve_class_embeddings(driver, NAMES[::-1], encoder=ENCODER))
    image = photos["bus"]
    ours, mine = detect(reordered, [image], **KWARGS)[0], theirs.predict(image, **KWARGS)[0]
    np.testing.assert_array_equal(ours[0], mine.boxes.xyxy.numpy())
    assert ours[1].tolist() != mine.boxes.cls.int().tolist()
    assert [NAMES[::-1][i] for i in ours[1]] == [NAMES[i] for i in mine.boxes.cls.int().tolist()]


def test_text_embeddings_are_cached_per_weights_in_ultralytics_format(yoloe_ckpt, tmp_path, monkeypatch):
    """Encoded once per weights digest and class list; the cached file is ultralytics' own format,
    and what actors receive is that file's bytes (picklable, as Ray sends them)."""
    import pickle

    from ultralytics import YOLOE

    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path))
    driver = load_open_vocab(str(yoloe_ckpt))
    first = resolve_class_embeddings(driver, NAMES, encoder=ENCODER, weights_sha256="a" * 64)
    cached = list(tmp_path.glob("embeddings/yoloe-11s-*.npz"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.data

    class Refuses:
        def tokenize(self, texts):
            raise AssertionError("encoded again although cached")

    assert resolve_class_embeddings(driver, NAMES, encoder=Refuses(), weights_sha256="a" * 64) == first
    assert pickle.loads(pickle.dumps(first)) == first
    model = YOLOE(str(yoloe_ckpt))
    model.load_prompt_embeddings(cached[0])
    assert model.names == dict(enumerate(NAMES))
    with pytest.raises(AssertionError, match="encoded again"):  # other weights, other entry
        resolve_class_embeddings(driver, NAMES, encoder=Refuses(), weights_sha256="b" * 64)
    with pytest.raises(AssertionError, match="encoded again"):  # other classes, other entry
        resolve_class_embeddings(driver, NAMES[:2], encoder=Refuses(), weights_sha256="a" * 64)


def test_class_embeddings_file_runs_without_encoder_and_must_match_classes(yoloe_ckpt, reference_npz, photos, tmp_path):
    from ultralytics import YOLO, YOLOE

    driver = load_open_vocab(str(yoloe_ckpt))
    embeddings = resolve_class_embeddings(driver, class_embeddings=str(reference_npz))
    assert embeddings.names == tuple(NAMES) and embeddings.source == "file"
    assert resolve_class_embeddings(driver, NAMES, class_embeddings=f"file://{reference_npz}").names == tuple(NAMES)
    actor = load_with_embeddings(str(yoloe_ckpt), embeddings)
    theirs = ultralytics_yoloe(yoloe_ckpt, reference_npz)
    assert assert_same(detect(actor, [photos["zidane"]], **KWARGS)[0], theirs.predict(photos["zidane"], **KWARGS)[0]) > 0

    with pytest.raises(ConfigError) as info:
        resolve_class_embeddings(driver, ["forklift", "chair"], class_embeddings=str(reference_npz))
    assert "['forklift', 'pallet', 'person']" in str(info.value) and "['forklift', 'chair']" in str(info.value)
    with pytest.raises(ConfigError, match="another order"):
        resolve_class_embeddings(driver, NAMES[::-1], class_embeddings=str(reference_npz))
    with pytest.raises(ConfigError, match="file not found"):
        resolve_class_embeddings(driver, class_embeddings=str(tmp_path / "missing.npz"))

    # made for another model: refused with ultralytics' own reasons
    other = YOLOE("yoloe-v8s-seg.yaml")
    with torch.no_grad():
        other.set_classes(NAMES, other.model.model[-1].get_tpe(ENCODER.raw(NAMES)))
    other_file = other.save_prompt_embeddings(tmp_path / "v8.npz")
    with pytest.raises(ConfigError, match=r"Prompt embeddings for model 'yoloe-v8s' cannot be loaded into 'yoloe-11s'"):
        resolve_class_embeddings(driver, class_embeddings=str(other_file))
    narrow = tmp_path / "narrow.npz"  # the right model name, another embedding width
    np.savez_compressed(narrow, embeddings=np.zeros((1, 3, 256), np.float32), names=np.asarray(NAMES), model=np.asarray("yoloe-11s"))
    with pytest.raises(ConfigError, match="does not match the class names or model embedding dimension"):
        resolve_class_embeddings(driver, class_embeddings=str(narrow))
    with pytest.raises(ConfigError, match="takes class names, not ids"):
        resolve_class_embeddings(driver, [0, 2])

    closed = YOLO("yolov8n.yaml")  # a closed-set YOLO: class ids to keep are not ours; names are refused
    assert resolve_class_embeddings(closed, [0, 2]) is None
    with pytest.raises(ConfigError, match="needs a YOLOE or YOLO-World model"):
        resolve_class_embeddings(closed, ["forklift"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a prompt-embedding .npz"):
        resolve_class_embeddings(driver, class_embeddings=str(tmp_path / "junk.npz"))


def test_text_classes_offline_without_encoder_name_both_ways(yoloe_ckpt, tmp_path, monkeypatch):
    """No encoder weights offline: a clear error naming the encoder file and class_embeddings; and
    ultralytics is never let near its pip-installing import of ``clip``."""
    from ultralytics.utils import checks

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("AUTOLABEL_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checks, "check_requirements", lambda *a, **k: pytest.fail(f"ultralytics tried to install {a}"))
    driver = load_open_vocab(str(yoloe_ckpt))
    with pytest.raises(TextEncoderError) as info:
        resolve_class_embeddings(driver, ["forklift", "pallet"])
    message = str(info.value)
    for part in ("['forklift', 'pallet']", "mobileclip_blt.ts", str(tmp_path / "checkpoints"), "offline",
                 "detector.class_embeddings=FILE.npz", "save_prompt_embeddings", "yoloe-11s"):
        assert part in message, (part, message)

    # the encoder's weights present (a random text encoder in the official TorchScript format)
    (tmp_path / "checkpoints").mkdir()
    encoder = torch.jit.script(TinyTextEncoder())
    encoder.save(str(tmp_path / "checkpoints" / "mobileclip_blt.ts"))
    problem = encoder_problem()
    if problem:  # the `clip` package is missing: said so, with both ways out, and nothing installed
        with pytest.raises(TextEncoderError) as info:
            resolve_class_embeddings(driver, ["forklift", "pallet"])
        assert "`clip` package" in str(info.value) and "detector.class_embeddings=FILE.npz" in str(info.value)
        assert "ultralytics.nn.text_model" not in sys.modules
    else:  # ultralytics' own MobileCLIPTS on that file, then the head's get_tpe
        import clip

        embeddings = resolve_class_embeddings(driver, ["forklift", "pallet"])
        with torch.no_grad():
            expected = driver.model.model[-1].get_tpe(encoder(clip.clip.tokenize(["forklift", "pallet"]))[None])
        np.testing.assert_allclose(embeddings.array(), expected.numpy(), atol=1e-6)


class TinyTextEncoder(torch.nn.Module):
    """Token ids (B, 77) -> (B, 512), as the official mobileclip_blt.ts maps them (random here)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 512)

    def forward(self, tokens):
        return self.embed(tokens % 1000).mean(1)


def write_examples(tmp_path, photos, lines: list[dict]) -> str:
    for name in {line["uri"].split(".")[0] for line in lines}:
        Image.fromarray(photos[name][:, :, ::-1]).save(tmp_path / f"{name}.png")
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_visual_prompts_equal_yoloe_visual_prompt_predict(yoloe_ckpt, photos, tmp_path):
    from ultralytics import YOLOE

    boxes = [[40, 30, 220, 300], [250, 60, 480, 400], [300, 300, 380, 500]]
    classes = ["forklift", "pallet", "forklift"]
    jsonl = write_examples(tmp_path, photos, [{"uri": "astronaut.png", "boxes": boxes, "classes": classes}])
    driver = load_open_vocab(str(yoloe_ckpt))
    embeddings = resolve_class_embeddings(driver, visual_prompts=jsonl, imgsz=IMGSZ)
    assert embeddings.names == ("forklift", "pallet") and embeddings.source == "examples"
    actor = load_with_embeddings(str(yoloe_ckpt), embeddings)

    theirs = YOLOE(str(yoloe_ckpt))
    prompts = {"bboxes": np.array(boxes, np.float32), "cls": np.array([0, 1, 0])}
    refer = str(tmp_path / "astronaut.png")  # ultralytics reads the reference itself
    compared = 0
    for name, image in photos.items():
        result = theirs.predict(image, visual_prompts=prompts, refer_image=refer, **KWARGS)[0]
        if name == "astronaut":
            np.testing.assert_array_equal(embeddings.array(), theirs.model.pe.numpy())
        compared += assert_same(detect(actor, [image], **KWARGS)[0], result)
    assert compared >= 10

    # several references of a class: averaged and normalised (YOLOEDetectValidator.get_visual_pe)
    more = write_examples(tmp_path, photos, [{"uri": "astronaut.png", "boxes": boxes, "classes": classes},
                                             {"uri": "coffee.png", "boxes": [[100, 50, 400, 300]], "classes": ["forklift"]}])
    combined = resolve_class_embeddings(driver, ["pallet", "forklift"], visual_prompts=more, imgsz=IMGSZ)
    assert combined.names == ("pallet", "forklift")  # detector.classes set the ids
    theirs.predict(photos["coffee"], visual_prompts={"bboxes": np.array([[100, 50, 400, 300]], np.float32), "cls": np.array([0])},
                   refer_image=str(tmp_path / "coffee.png"), **KWARGS)
    coffee = theirs.model.pe[0, 0]
    single = torch.from_numpy(embeddings.array()[0])
    forklift = torch.nn.functional.normalize((single[0] + coffee) / 2, dim=-1)
    np.testing.assert_allclose(combined.array()[0], torch.stack([single[1], forklift]).numpy(), atol=1e-6)
    assert not np.allclose(combined.array()[0, 1], single[0].numpy(), atol=1e-3)  # control: the second reference counted


@pytest.mark.parametrize("line, error", [
    ({"uri": "astronaut.png", "boxes": [[0, 0, 10, 10]], "classes": ["a", "b"]}, "same length"),
    ({"uri": "astronaut.png", "boxes": [[0, 0, 10, 10]], "classes": ["a"], "box": 1}, "unknown keys"),
    ({"uri": "astronaut.png", "boxes": [[10, 0, 5, 10]], "classes": ["a"]}, "x1 <= x0"),
    ({"uri": "astronaut.png", "boxes": [[0, 0, 10, 900]], "classes": ["a"]}, "outside the 512x512 image"),
    ({"uri": "nowhere.png", "boxes": [[0, 0, 10, 10]], "classes": ["a"]}, "not_found"),
])
def test_visual_prompt_file_mistakes_name_the_line(yoloe_ckpt, photos, tmp_path, line, error):
    Image.fromarray(photos["astronaut"][:, :, ::-1]).save(tmp_path / "astronaut.png")
    path = tmp_path / "examples.jsonl"
    path.write_text("\n" + json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=f"line 2: .*{error}"):
        resolve_class_embeddings(load_open_vocab(str(yoloe_ckpt)), visual_prompts=str(path), imgsz=IMGSZ)


def test_yolo_world_text_classes_equal_its_own_set_classes(tmp_path, photos, yoloe_ckpt, reference_npz):
    """YOLO-World takes raw CLIP text features (no get_tpe), kept in the same .npz format."""
    from ultralytics import YOLO

    ckpt = make_open_vocab_checkpoint(tmp_path / "yolov8s-worldv2.pt", [p[:, :, ::-1] for p in photos.values()],
                                      yaml="yolov8s-worldv2.yaml")
    driver = load_open_vocab(str(ckpt))
    embeddings = resolve_class_embeddings(driver, NAMES, encoder=ENCODER)
    assert embeddings.model == "yolov8s-worldv2"
    np.testing.assert_array_equal(embeddings.array(), ENCODER.raw(NAMES).numpy())
    actor = load_with_embeddings(str(ckpt), embeddings)

    theirs = YOLO(str(ckpt))  # ultralytics' YOLOWorld.set_classes, only its CLIP encoding stubbed
    theirs.model.get_text_pe = lambda text, batch=80, cache_clip_model=False: ENCODER.raw(text)
    theirs.set_classes(NAMES)
    compared = 0
    for image in photos.values():
        compared += assert_same(detect(actor, [image], **KWARGS)[0], theirs.predict(image, **KWARGS)[0])
    assert compared >= 10
    assert class_names(actor) == dict(enumerate(NAMES))

    with pytest.raises(ConfigError, match="Prompt embeddings for model 'yoloe-11s' cannot be loaded into 'yolov8s-worldv2'"):
        resolve_class_embeddings(driver, class_embeddings=str(reference_npz))
    with pytest.raises(ConfigError, match="need a YOLOE model"):
        resolve_class_embeddings(driver, visual_prompts=str(tmp_path / "any.jsonl"))
    with pytest.raises(ValueError, match="cannot be loaded into 'yoloe-11s'"):  # and the other way round
        apply_embeddings(load_open_vocab(str(yoloe_ckpt)), embeddings)
