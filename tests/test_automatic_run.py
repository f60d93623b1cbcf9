"""Segment everything wired in: ``automatic.enabled=true`` runs, ``autolabel predict --automatic``
and ``Predictor.label(automatic=True)`` against SAM 2.1's own ``SAM2AutomaticMaskGenerator``.

The reference is built as tests/test_automatic.py builds it (``build_sam2`` on the same
random-weight checkpoint at ``sam.image_size`` 256, ``_bb_feat_sizes`` set to the sizes the
library's own ``_prepare_backbone_features`` gives at that size) and run on the pixels the
pipeline decodes. Its calibration for random weights (image-wide masks: ``box_nms_thresh=1.0``,
a small stability offset) keeps a few dozen distinct masks per photo, so equal counts and a
one-to-one match at IoU >= 0.99 mean something.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.config import ConfigError, load_config

SIZE = 256
ARGS = dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.8, stability_score_offset=0.02, box_nms_thresh=1.0)
KEYS = [f"automatic.{k}={v}" for k, v in ARGS.items()]


@pytest.fixture(scope="module")
def reference(checkpoints):
    """``SAM2AutomaticMaskGenerator(model, **ARGS).generate(rgb)`` at 256 (CPU, float32)."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoints["sam"]), device="cpu",
                       hydra_overrides_extra=[f"++model.image_size={SIZE}"])
    with torch.inference_mode():
        feat_sizes = [tuple(s) for s in model._prepare_backbone_features(model.forward_image(torch.zeros(1, 3, SIZE, SIZE)))[3]]
    generator = SAM2AutomaticMaskGenerator(model, **ARGS)
    generator.predictor._bb_feat_sizes = feat_sizes  # hard-coded for 1024 in the library

    def generate(rgb: np.ndarray) -> list[dict]:
        return generator.generate(rgb)

    return generate


def decoded(uri: str) -> np.ndarray:
    """The pixels the pipeline segments for ``uri`` (its own decoder)."""
    from pipeline.io.decode import decode_rgb, read_bytes

    return np.array(decode_rgb(read_bytes(uri)))


def assert_same_masks(theirs: list[dict], rles: list[dict], scores: list[float]) -> int:
    """Equal counts, and a one-to-one matching of the library's masks with ours at IoU >= 0.99
    (among equal masks the closest score is the partner), with SAM's predicted IoU equal.
    Returns how many of the library's masks differ (IoU < 0.99) from all those before them:
    enough of them, and the matching means something."""
    from scipy.optimize import linear_sum_assignment

    from pipeline.sam import masks as mask_codec

    assert len(rles) == len(theirs), (len(rles), len(theirs))
    if not theirs:
        return 0
    mine = [mask_codec.to_coco(r) for r in rles]
    ref = [mask_utils.encode(np.asfortranarray(t["segmentation"].astype(np.uint8))) for t in theirs]
    iou = np.asarray(mask_utils.iou(mine, ref, [0] * len(ref)), np.float64).reshape(len(mine), len(ref))
    gap = np.abs(np.asarray(scores)[:, None] - np.array([t["predicted_iou"] for t in theirs])[None, :])
    rows, cols = linear_sum_assignment((1.0 - iou) + gap)
    assert iou[rows, cols].min() >= 0.99, iou[rows, cols].min()
    assert gap[rows, cols].max() <= 1e-4
    same = np.asarray(mask_utils.iou(ref, ref, [0] * len(ref)), np.float64).reshape(len(ref), len(ref))
    return int(sum(1 for k in range(len(ref)) if k == 0 or same[k, :k].max() < 0.99))


@pytest.fixture(scope="module")
def auto_run(ray_local, checkpoints, photo_folder, tmp_path_factory):
    """The photo folder (5 photos, one broken file) with automatic.enabled=true. detector.weights
    names a file that does not exist: the run must never look for it."""
    from pipeline.run.job import run

    out = tmp_path_factory.mktemp("auto-run") / "out"
    overrides = [f"input.uri={photo_folder}", f"output.uri={out}", f"sam.checkpoint={checkpoints['sam']}", f"sam.image_size={SIZE}",
                 "sam.device=cpu", "sam.dtype=float32", "sam.batch_size=2", "detector.weights=/nowhere/yolo.pt", "report.gallery=1",
                 "automatic.enabled=true", *KEYS]
    cfg = load_config(None, overrides)
    return {"manifest": run(cfg), "out": out, "cfg": cfg,
            "images": pq.read_table(out / "images").to_pandas(), "objects": pq.read_table(out / "objects").to_pandas()}


def test_a_run_finds_the_library_s_masks_with_source_automatic_and_no_class(auto_run, reference):
    manifest, images, objects = auto_run["manifest"], auto_run["images"], auto_run["objects"]
    assert manifest["status"] == "finished" and "detector" not in manifest["models"] and manifest["class_names"] == {}
    assert manifest["fingerprint"]["config"]["automatic"]["points_per_side"] == 4
    ok = images[images["status"] == "ok"]
    assert len(ok) == 5 and (images["status"] == "error").sum() == 1  # broken.jpg: the usual error row
    assert set(objects["source"]) == {"automatic"} and objects["class_id"].isna().all() and objects["class_name"].isna().all()
    assert objects["det_score"].isna().all() and (objects["prompt"] == "points").all() and (objects["status"] == "ok").all()
    assert objects["stability"].notna().all() and objects["regions"].notna().all()  # QA ran on them
    distinct = 0
    for _, image in ok.iterrows():
        mine = objects[objects["image_id"] == image["image_id"]].sort_values("object_id")
        assert image["num_objects"] == len(mine)
        theirs = reference(decoded(image["uri"]))
        distinct += assert_same_masks(theirs, [dict(m) for m in mine["mask"]], list(mine["mask_score"]))
        boxes = {tuple(np.round(np.asarray(b, float), 3)) for b in mine["box"]}
        assert all((x, y, x + w + 1, y + h + 1) in boxes for x, y, w, h in (t["bbox"] for t in theirs if t["area"]))
    assert distinct >= 12, f"{distinct} distinct masks of {len(objects)}: too few for the matching to mean much"


def test_the_report_and_the_coco_export_work_on_classless_objects(auto_run, tmp_path):
    from pycocotools.coco import COCO

    from pipeline.outputs.export import export

    out, objects = auto_run["out"], auto_run["objects"]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["classes"]["defined_by"] == "automatic"
    page = (out / "report" / "report.html").read_text()
    assert "data-defined-by='automatic'" in page
    result = export(str(out), "coco", str(tmp_path / "coco"), progress=False)
    assert result.objects == len(objects)
    coco = COCO(str(tmp_path / "coco" / "instances.json"))  # pycocotools' own reader
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["(unlabeled)"]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(objects) and {a["source"] for a in anns} == {"automatic"} and all(a["score"] is None for a in anns)
    first = objects.sort_values(["image_id", "object_id"]).iloc[0]
    (image_id,) = [i["id"] for i in coco.loadImgs(coco.getImgIds()) if i["autolabel_image_id"] == first["image_id"]]
    assert np.array_equal(coco.annToMask(coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))[0]),
                          mask_utils.decode({"size": list(first["mask"]["size"]), "counts": first["mask"]["counts"].encode()}))


def test_predict_automatic_and_the_python_api_give_the_library_s_masks(checkpoints, reference, tmp_path, capfd):
    from PIL import Image

    from conftest import real_photos
    from pipeline.cli import main
    from pipeline.predict import Predictor
    from pipeline.sam import masks as mask_codec

    photo = tmp_path / "chelsea.png"
    Image.fromarray(real_photos()["chelsea"]).save(photo)
    theirs = reference(decoded(str(photo)))
    predictor = Predictor(checkpoint=str(checkpoints["sam"]), image_size=SIZE, device="cpu", dtype="float32", automatic=ARGS)
    objects = predictor.label(str(photo), automatic=True)
    assert {o.source for o in objects} == {"automatic"} and all(o.class_id is None and o.det_score is None for o in objects)
    assert assert_same_masks(theirs, mask_codec.encode(np.stack([o.mask for o in objects])), [o.mask_score for o in objects]) >= 3
    assert len(predictor.label(str(photo), automatic={"pred_iou_thresh": 0.99})) == 0  # per-call keys over the Predictor's
    other = predictor.label(str(photo), automatic={"points_per_side": 5})  # control: another grid is not the library's output
    with pytest.raises(AssertionError):
        assert_same_masks(theirs, mask_codec.encode(np.stack([o.mask for o in other])), [o.mask_score for o in other])
    with pytest.raises(ConfigError, match="without classes"):
        predictor.label(str(photo), classes=["cat"], automatic=True)

    out = tmp_path / "everything"
    code = main(["predict", str(photo), "--automatic", "--out", str(out), f"sam.checkpoint={checkpoints['sam']}",
                 f"sam.image_size={SIZE}", "sam.device=cpu", "sam.dtype=float32", *KEYS])
    assert code == 0, capfd.readouterr().err
    written = json.loads((out / "objects.json").read_text())
    masks = [np.array(Image.open(out / o["mask"])) > 0 for o in written]
    assert_same_masks(theirs, mask_codec.encode(np.stack(masks)), [o["mask_score"] for o in written])
    assert all(o["source"] == "automatic" and o["class_name"] is None for o in written) and (out / "overlay.png").is_file()
    for extra in (["--classes", "cat"], ["--point", "10,10"]):
        assert main(["predict", str(photo), "--automatic", *extra, "--out", str(out), "sam.checkpoint=random"]) == 2
        assert "give one or the other" in capfd.readouterr().err


def test_the_stage_answers_manifest_prompts_then_adds_the_automatic_masks(ray_local, checkpoints, tmp_path):
    """prompts.source=manifest with automatic.enabled: one Segmenter call gives the manifest's
    objects first (as SAM answers their prompts) and then exactly the generator's masks."""
    import pyarrow as pa
    from PIL import Image

    from conftest import real_photos
    from pipeline.config import SamConfig
    from pipeline.sam.automatic import AutomaticArgs, AutomaticMaskGenerator
    from pipeline.sam.prompts import Prompt
    from pipeline.stages.read import read_batch
    from pipeline.stages.segment import Segmenter

    photo = tmp_path / "coffee.png"
    Image.fromarray(real_photos()["coffee"]).save(photo)
    box = [40, 30, 300, 260]
    batch = read_batch(pa.table({"uri": [str(photo)]}))
    batch = batch.append_column("prompts", pa.array([json.dumps([{"object_key": "cup", "box": box, "label": "cup"}])]))
    cfg = SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SIZE, dtype="float32", device="cpu")
    stage = Segmenter(cfg, {0: "cup"}, automatic=ARGS)
    rows = stage(batch).column("objects").to_pylist()[0]
    rgb = decoded(str(photo))
    (own,) = stage.sam.segment(rgb, [Prompt(box=np.asarray(box, np.float32), source="manifest")], multimask=False)
    everything = AutomaticMaskGenerator(stage.sam, AutomaticArgs(**ARGS)).generate(rgb)
    assert [r["object_id"] for r in rows] == list(range(1 + len(everything))) and len(everything) >= 3
    assert rows[0]["source"] == "manifest" and rows[0]["class_name"] == "cup" and rows[0]["mask"] == own.rles[0]
    assert all(r["source"] == "automatic" and r["class_id"] is None and r["status"] == "ok" for r in rows[1:])
    assert [r["mask"] for r in rows[1:]] == everything.rles
    assert [r["mask_score"] for r in rows[1:]] == pytest.approx(everything.scores.tolist())


@pytest.mark.parametrize("overrides, message", [
    (["automatic.enabled=true", "prompts.source=both", "prompts.manifest=m.jsonl"], "prompts.source=both"),
    (["automatic.points_per_side=0"], "automatic.points_per_side"),
    (["automatic.crop_overlap_ratio=1.0"], "automatic.crop_overlap_ratio"),
    (["automatic.points_per_side=4", "automatic.crop_n_layers=3", "automatic.crop_n_points_downscale_factor=2"],
     "leaves no points in crop layer 3"),
    (["automatic.nms=0.5"], "unknown config key 'automatic.nms'"),
])
def test_automatic_mistakes_are_refused_when_the_config_is_read(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_config_s_keys_are_the_generator_s_with_its_bounds():
    """Defaults equal ``AutomaticArgs``' (themselves tested equal to sam2's); what AutomaticArgs
    refuses, the config refuses, and the reverse, on each key's edges."""
    from pipeline.config import AutomaticConfig
    from pipeline.sam.automatic import AutomaticArgs

    assert AutomaticConfig().model_dump(exclude={"enabled"}) == AutomaticArgs().__dict__
    edges = dict(points_per_side=[0, 1], points_per_batch=[0, 1], pred_iou_thresh=[-0.1, 0.0, 1.0, 1.1],
                 stability_score_thresh=[-0.1, 1.0, 1.1], stability_score_offset=[-1.0, 0.0], box_nms_thresh=[0.0, 1.1],
                 crop_n_layers=[-1, 0, 2], crop_nms_thresh=[-0.1, 1.0], crop_overlap_ratio=[-0.1, 0.0, 0.99, 1.0],
                 crop_n_points_downscale_factor=[0, 1, 64], min_mask_region_area=[-1, 0])
    for key, values in edges.items():
        for value in values:
            try:
                AutomaticArgs(**{key: value})
                args_ok = True
            except ValueError:
                args_ok = False
            try:
                AutomaticConfig(**{key: value})
                config_ok = True
            except ValueError:
                config_ok = False
            assert args_ok == config_ok, (key, value, args_ok)


def test_automatic_keys_enter_the_resume_fingerprint_only_when_enabled():
    from pipeline.run.folder import fingerprint

    models = {"sam": {"sha256": "abc"}}
    plain = fingerprint(load_config(None, []), models)
    assert "automatic" not in plain["config"] and "detector" in plain["config"]
    assert fingerprint(load_config(None, ["automatic.points_per_side=8"]), models) == plain  # off: changes nothing
    on = fingerprint(load_config(None, ["automatic.enabled=true"]), models)
    assert "automatic" in on["config"] and "detector" not in on["config"]
    assert fingerprint(load_config(None, ["automatic.enabled=true", "automatic.points_per_batch=8"]), models) == on
    assert fingerprint(load_config(None, ["automatic.enabled=true", "automatic.pred_iou_thresh=0.5"]), models) != on
