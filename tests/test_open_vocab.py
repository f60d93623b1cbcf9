"""Open-vocabulary classes wired into the job, ``autolabel predict`` and the Python API.

A random-weight YOLOE (conftest's ``yoloe_checkpoint``) and class embeddings made the way
ultralytics makes them (random text features through the head's ``get_tpe``, written by
``save_prompt_embeddings``): a run with ``detector.class_embeddings=FILE.npz`` must find exactly
the boxes, scores and classes of ``YOLOE.predict`` after ``load_prompt_embeddings`` on the same
pixels, name them everywhere (objects, run.json, report, exports), and refuse, before any work,
a class list that contradicts the file or text classes it cannot encode.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from pipeline.config import ConfigError, load_config

NAMES = ["forklift", "pallet", "person"]
DETECTOR = ["detector.imgsz=256", "detector.conf=0.1", "detector.max_det=6"]


@pytest.fixture(scope="module")
def class_file(yoloe_checkpoint, tmp_path_factory):
    """Random text features through the head's get_tpe, saved by ultralytics' save_prompt_embeddings."""
    from ultralytics import YOLOE

    model = YOLOE(str(yoloe_checkpoint))
    raw = torch.randn(1, len(NAMES), 512, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model.set_classes(NAMES, model.model.model[-1].get_tpe(raw))
    return model.save_prompt_embeddings(tmp_path_factory.mktemp("classes") / "classes.npz")


def ultralytics_yoloe(ckpt, npz):
    from ultralytics import YOLOE

    model = YOLOE(str(ckpt))
    model.load_prompt_embeddings(npz)
    return model


def decoded_bgr(uri: str) -> np.ndarray:
    """The pixels the pipeline's detector gets for ``uri`` (its own decoder), as ultralytics takes arrays."""
    from pipeline.io.decode import decode_rgb, read_bytes

    return np.ascontiguousarray(decode_rgb(read_bytes(uri))[:, :, ::-1])


@pytest.fixture(scope="module")
def open_vocab_run(ray_local, checkpoints, photo_folder, yoloe_checkpoint, class_file, tmp_path_factory):
    from pipeline.run.job import run

    out = tmp_path_factory.mktemp("ov-run") / "out"
    overrides = [f"input.uri={photo_folder}", f"output.uri={out}", f"detector.weights={yoloe_checkpoint}",
                 f"detector.class_embeddings={class_file}", f"sam.checkpoint={checkpoints['sam']}", "sam.image_size=256",
                 "sam.device=cpu", "report.gallery=1", *DETECTOR]
    cfg = load_config(None, overrides)
    return {"manifest": run(cfg), "out": out, "cfg": cfg, "overrides": overrides,
            "images": pq.read_table(out / "images").to_pandas(), "objects": pq.read_table(out / "objects").to_pandas()}


@pytest.mark.slow
def test_run_with_a_class_file_equals_yoloe_predict_after_load_prompt_embeddings(open_vocab_run, yoloe_checkpoint, class_file):
    theirs = ultralytics_yoloe(yoloe_checkpoint, class_file)
    det = open_vocab_run["cfg"].detector
    objects = open_vocab_run["objects"]
    ok = open_vocab_run["images"][open_vocab_run["images"]["status"] == "ok"]
    assert len(ok) == 5
    compared = 0
    for _, image in ok.iterrows():
        result = theirs.predict(decoded_bgr(image["uri"]), conf=det.conf, iou=det.iou, max_det=det.max_det, imgsz=det.imgsz, verbose=False)[0]
        mine = objects[objects["image_id"] == image["image_id"]].sort_values("object_id")
        assert len(mine) == len(result.boxes), image["uri"]
        if not len(mine):
            continue
        np.testing.assert_allclose(np.stack(mine["box"].to_numpy()), result.boxes.xyxy.numpy(), atol=0.05)
        np.testing.assert_allclose(mine["det_score"].to_numpy(), result.boxes.conf.numpy(), atol=1e-4)
        assert list(mine["class_id"]) == result.boxes.cls.int().tolist()
        assert list(mine["class_name"]) == [NAMES[i] for i in result.boxes.cls.int().tolist()]
        compared += len(mine)
    assert compared >= 10 and objects["class_name"].nunique() >= 2, "the calibrated random YOLOE must find boxes of several classes"


@pytest.mark.slow
def test_the_runs_classes_reach_run_json_the_report_and_the_exports(open_vocab_run, class_file, tmp_path):
    from pipeline.outputs.export import export
    from pipeline.run.folder import RunFolder

    out = open_vocab_run["out"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["class_names"] == {"0": "forklift", "1": "pallet", "2": "person"}
    record = manifest["models"]["detector"]["classes"]
    assert record["defined_by"] == "file" and record["model_kind"] == "yoloe"
    assert record["embeddings"]["source"] == "file" and record["embeddings"]["model"] == "yoloe-11s"
    assert (out / "class_embeddings.npz").read_bytes() == class_file.read_bytes()  # ultralytics' own file, to reuse
    assert manifest["fingerprint"]["models"]["class_embeddings"] == record["embeddings"]["sha256"]

    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["classes"]["defined_by"] == "file" and summary["classes"]["names"] == NAMES
    page = (out / "report" / "report.html").read_text()
    assert "data-defined-by='file'" in page and "forklift, pallet, person" in page

    export(str(out), "coco", str(tmp_path / "coco"), progress=False)
    coco = json.loads((tmp_path / "coco" / "instances.json").read_text())
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == NAMES
    found = {coco_cat["name"] for coco_cat in coco["categories"] if any(a["category_id"] == coco_cat["id"] for a in coco["annotations"])}
    assert found == set(open_vocab_run["objects"]["class_name"])
    export(str(out), "labelstudio", str(tmp_path / "ls"), progress=False, image_root_url="http://localhost:8081/data")
    config = (tmp_path / "ls" / "labeling-config.xml").read_text()
    assert all(f'value="{name}"' in config for name in NAMES)

    # --overwrite may remove the file (the run wrote it), and a resume with other embeddings is refused
    folder = RunFolder(open_vocab_run["cfg"])
    assert "class_embeddings.npz" in folder.inventory(manifest).files
    other = tmp_path / "other.npz"
    with np.load(class_file) as npz:
        np.savez_compressed(other, embeddings=npz["embeddings"][:, ::-1].copy(), names=npz["names"], model=npz["model"])
    from pipeline.run.job import run

    cfg = load_config(None, [o for o in open_vocab_run["overrides"] if not o.startswith("detector.class_embeddings=")]
                      + [f"detector.class_embeddings={other}"])
    with pytest.raises(ConfigError, match="cannot be resumed(.|\n)*class embeddings: "):
        run(cfg)
    assert (out / "class_embeddings.npz").read_bytes() == class_file.read_bytes()


@pytest.mark.parametrize("case", ["file and classes differ", "offline without encoder or file"])
def test_class_mistakes_stop_the_run_before_any_work(case, photo_folder, yoloe_checkpoint, class_file, tmp_path, monkeypatch, capfd):
    """``autolabel run`` exits 2 before Ray is asked for or anything is written: the file's classes
    against detector.classes (both lists shown); text classes with no text encoder here (both ways
    to get embeddings named)."""
    from pipeline import cli
    from pipeline.run import job

    monkeypatch.setattr(job, "connect_ray", lambda cfg: pytest.fail("Ray was asked for before the classes were checked"))
    out = tmp_path / "out"
    common = [f"input.uri={photo_folder}", f"output.uri={out}", f"detector.weights={yoloe_checkpoint}", "sam.checkpoint=random", *DETECTOR]
    if case == "file and classes differ":
        code = cli.main(["run", *common, f"detector.class_embeddings={class_file}", "detector.classes=[forklift, chair]"])
        expected = ["detector.class_embeddings", "['forklift', 'pallet', 'person']", "['forklift', 'chair']"]
    else:
        for name, value in (("YOLO_OFFLINE", "1"), ("AUTOLABEL_CHECKPOINTS", tmp_path / "none"), ("AUTOLABEL_CACHE", tmp_path / "cache")):
            monkeypatch.setenv(name, str(value))
        code = cli.main(["run", *common, "detector.classes=forklift,pallet"])
        expected = ["mobileclip_blt.ts", str(tmp_path / "none"), "offline", "detector.class_embeddings=FILE.npz",
                    "save_prompt_embeddings", "yoloe-11s"]
    err = capfd.readouterr().err
    assert code == 2, err
    for part in expected:
        assert part in err, (part, err)
    assert not out.exists(), "nothing may be written before the classes are known"


@pytest.mark.slow
def test_predict_and_the_python_api_label_with_the_same_classes(checkpoints, yoloe_checkpoint, class_file, tmp_path, capfd):
    """``Predictor.label`` finds what YOLOE.predict finds and segments each box as ``Predictor.predict``
    does; ``autolabel predict --classes ... --class-embeddings FILE`` writes the same objects."""
    from PIL import Image

    from conftest import real_photos
    from pipeline.cli import main
    from pipeline.predict import Predictor

    photo = tmp_path / "bus.jpg"
    Image.fromarray(real_photos()["bus"]).save(photo, quality=92)
    det = {"weights": str(yoloe_checkpoint), "imgsz": 256, "conf": 0.1, "max_det": 6}
    predictor = Predictor(checkpoint=str(checkpoints["sam"]), image_size=256, device="cpu", detector=det)
    objects = predictor.label(str(photo), class_embeddings=str(class_file))
    result = ultralytics_yoloe(yoloe_checkpoint, class_file).predict(decoded_bgr(str(photo)), conf=0.1, max_det=6, imgsz=256, verbose=False)[0]
    assert len(objects) == len(result.boxes) >= 2
    np.testing.assert_allclose(np.stack([o.box for o in objects]), result.boxes.xyxy.numpy(), atol=1e-3)
    assert [o.class_name for o in objects] == [NAMES[i] for i in result.boxes.cls.int().tolist()]
    alone = predictor.predict(str(photo), box=objects[0].box, multimask=False)
    assert np.array_equal(alone.masks[0], objects[0].mask) and alone.scores[0] == pytest.approx(objects[0].mask_score)
    with pytest.raises(ConfigError, match="differ from detector.classes"):
        predictor.label(str(photo), classes=["pallet", "forklift", "person"], class_embeddings=str(class_file))

    out = tmp_path / "labeled"
    code = main(["predict", str(photo), "--classes", ",".join(NAMES), "--class-embeddings", str(class_file), "--out", str(out),
                 f"sam.checkpoint={checkpoints['sam']}", "sam.image_size=256", "sam.device=cpu", f"detector.weights={yoloe_checkpoint}", *DETECTOR])
    assert code == 0, capfd.readouterr().err
    written = json.loads((out / "objects.json").read_text())
    assert [o["class_name"] for o in written] == [o.class_name for o in objects]
    np.testing.assert_allclose([o["box"] for o in written], np.stack([o.box for o in objects]), atol=2e-3)
    assert all((out / o["mask"]).is_file() for o in written) and (out / "overlay.png").is_file()
    assert main(["predict", str(photo), "--classes", "forklift", "--box", "1,1,20,20", "--out", str(out), "sam.checkpoint=random"]) == 2
    assert "give one or the other" in capfd.readouterr().err


def test_class_keys_are_checked_when_the_config_is_read():
    assert load_config(None, ["detector.classes=forklift, pallet"]).detector.classes == ["forklift", "pallet"]
    assert load_config(None, ["detector.classes=0,2"]).detector.classes == [0, 2]
    for overrides, message in (
        (["detector.classes=[0, pallet]"], r"class ids \(a closed-set YOLO\) or class names"),
        (["detector.classes=[a, a]"], "distinct"),
        (["detector.class_embeddings=a.npz", "detector.visual_prompts=b.jsonl"], "both define the classes"),
        (["detector.class_embeddings=a.npz", "detector.classes=[0]"], "classes are names"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    cfg = load_config(None, ["detector.class_embeddings=s3://KEY:SECRET@bucket/classes.npz"])  # read with detector.storage_options
    assert cfg.detector.class_embeddings == "s3://bucket/classes.npz" and cfg.detector.storage_options == {"key": "KEY", "secret": "SECRET"}


def test_official_open_vocabulary_files_come_from_the_release_ultralytics_uses(tmp_path):
    """checkpoints/download_ckpts.sh fetches each official name from the URL weights.py uses (a fake
    curl records them); text encoders from the v8.4.0 release, YOLO-World's CLIP from clip's own URL."""
    import clip

    from pipeline.models import weights

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text('#!/bin/sh\nwhile [ $# -gt 1 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                                  'echo "$1" >> "$CURL_LOG"; echo x > "$out"\n')
    (bin_dir / "curl").chmod(0o755)
    work = tmp_path / "checkpoints"
    work.mkdir()
    script = work / "download_ckpts.sh"
    script.write_text((REPO / "checkpoints" / "download_ckpts.sh").read_text())
    names = sorted(weights.OFFICIAL_OPEN_VOCAB | weights.OFFICIAL_TEXT_ENCODERS) + ["ViT-B-32.pt"]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CURL_LOG": str(tmp_path / "urls")}
    subprocess.run(["bash", str(script), *names], check=True, env=env, capture_output=True)
    alias = tmp_path / "alias"
    alias.mkdir()
    (alias / "download_ckpts.sh").write_text(script.read_text())
    subprocess.run(["bash", str(alias / "download_ckpts.sh"), "open-vocab"], check=True, env={**env, "CURL_LOG": str(tmp_path / "alias.log")},
                   capture_output=True)
    fetched = (tmp_path / "urls").read_text().split()
    expected = [f"{weights.OPEN_VOCAB_BASE_URL}/{n}" for n in names[:-1]] + [clip.clip._MODELS["ViT-B/32"]]
    assert fetched == expected
    assert "yoloe-11s-seg.pt" in weights.OFFICIAL_OPEN_VOCAB and "yolov8l-worldv2.pt" in weights.OFFICIAL_OPEN_VOCAB
    assert (tmp_path / "alias.log").read_text().split() == [f"{weights.OPEN_VOCAB_BASE_URL}/{n}" for n in ("yoloe-11s-seg.pt", "mobileclip_blt.ts")]
    from pipeline.models.yoloe import ASSETS_URL, ENCODER_FILES

    assert ASSETS_URL == weights.OPEN_VOCAB_BASE_URL and {ENCODER_FILES["mobileclip:blt"], ENCODER_FILES["mobileclip2:b"]} == weights.OFFICIAL_TEXT_ENCODERS


def test_the_report_says_how_the_classes_were_defined(tmp_path):
    """From run.json's record: text, examples, a file, the detector's own (COCO named as such), a
    manifest's labels, or automatic; runs made before the record count as closed-set."""
    from synthetic_run import write_synthetic_run

    from pipeline.outputs.report.html import _classes_defined
    from pipeline.outputs.rundata import COCO_NAMES, RunData

    write_synthetic_run(str(tmp_path / "run"), num_images=4)
    path = tmp_path / "run" / "run.json"
    original = json.loads(path.read_text())

    def defined(change) -> dict:
        manifest = json.loads(json.dumps(original))
        change(manifest)
        path.write_text(json.dumps(manifest))
        return RunData(str(tmp_path / "run")).class_definition()

    assert defined(lambda m: None)["defined_by"] == "closed-set"
    coco = defined(lambda m: m["models"]["detector"].update(class_names={str(i): n for i, n in enumerate(COCO_NAMES)}))
    assert coco["description"].endswith("the 80 COCO classes") and "person, bicycle" not in _classes_defined(coco)
    assert defined(lambda m: m["models"].pop("detector"))["defined_by"] == "manifest"
    assert defined(lambda m: m["config"].update(automatic={"enabled": True}))["defined_by"] == "automatic"
    text = defined(lambda m: m["models"]["detector"].update(
        class_names={"0": "forklift", "1": "pallet"},
        classes={"defined_by": "text", "model_kind": "yoloe",
                 "embeddings": {"source": "text", "model": "yoloe-11s", "sha256": "0" * 64, "file": "class_embeddings.npz"}}))
    assert text["defined_by"] == "text" and text["names"] == ["forklift", "pallet"] and text["embeddings"]["model"] == "yoloe-11s"
    shown = _classes_defined(text)
    assert "named in text" in shown and "forklift, pallet" in shown and "class_embeddings.npz" in shown


def test_class_keys_are_in_the_resume_fingerprint_and_unset_ones_change_nothing():
    """detector.classes / class_embeddings / visual_prompts change a run's output, so a resume must
    refuse a change; unset, the new keys leave the fingerprint of older runs as it was."""
    from pipeline.run.folder import fingerprint

    models = {"sam": {"sha256": "s"}, "detector": {"sha256": "d"}}
    plain = fingerprint(load_config(None, []), models)
    assert {"class_embeddings", "visual_prompts"}.isdisjoint(plain["config"]["detector"])
    named = fingerprint(load_config(None, ["detector.class_embeddings=a.npz"]), models)
    assert named["config"]["detector"]["class_embeddings"] == "a.npz" and named["sha256"] != plain["sha256"]
    assert fingerprint(load_config(None, ["detector.classes=[forklift]"]), models)["sha256"] != plain["sha256"]
    embedded = {**models, "detector": {"sha256": "d", "classes": {"embeddings": {"sha256": "e"}}}}
    assert fingerprint(load_config(None, []), embedded)["models"]["class_embeddings"] == "e"


def test_detector_stage_applies_the_drivers_embeddings_in_batches(yoloe_checkpoint, class_file, tmp_path):
    """The detect actor, given the driver's ClassEmbeddings: same-shape images go through YOLOE
    together, and each image's boxes, scores and classes equal a per-image YOLOE.predict after
    load_prompt_embeddings."""
    import pyarrow as pa
    from PIL import Image

    from conftest import real_photos
    from pipeline.config import DetectorConfig
    from pipeline.models.detector import resolve_classes
    from pipeline.stages.detect import Detector
    from pipeline.stages.read import read_batch

    paths = []
    for i, rgb in enumerate(list(real_photos().values())[:3]):  # three real photos cut to one shape
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.ascontiguousarray(rgb[:300, :448])).save(paths[-1])
    cfg = DetectorConfig(weights=str(yoloe_checkpoint), class_embeddings=str(class_file), imgsz=256, conf=0.1, max_det=6, batch_size=2)
    _, classes = resolve_classes(cfg, str(yoloe_checkpoint))
    detector = Detector(cfg, class_embeddings=classes.embeddings)
    calls = []
    predict = detector.model.predict
    detector.model.predict = lambda images, **kw: calls.append(len(images)) or predict(images, **kw)
    rows = detector(read_batch(pa.table({"uri": [f"file://{p}" for p in paths]}))).to_pylist()
    assert calls == [2, 1]
    theirs = ultralytics_yoloe(yoloe_checkpoint, class_file)
    compared = 0
    for path, row in zip(paths, rows):
        alone = theirs.predict(decoded_bgr(str(path)), conf=0.1, max_det=6, imgsz=256, verbose=False)[0]
        assert len(row["det_boxes"]) == len(alone.boxes), path
        if len(alone.boxes):
            np.testing.assert_allclose(np.array(row["det_boxes"]), alone.boxes.xyxy.numpy(), atol=0.05)
            np.testing.assert_allclose(row["det_scores"], alone.boxes.conf.numpy(), atol=1e-4)
            assert row["det_class_ids"] == alone.boxes.cls.int().tolist()
        compared += len(alone.boxes)
    assert compared >= 6
