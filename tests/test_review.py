"""Quality control and the human review loop (issue 13), on synthetic runs with the QA columns:

- Label Studio's brush RLE: our encoder against Label Studio's own converter (``label_studio_converter
  .brush``, a test-only dependency), byte for byte, and every exported mask decoded by their decoder
  and compared bit for bit with the Parquet mask;
- ``--flagged/--unflagged/--include-duplicates``: the report's SQL and the exports' pyarrow forms
  against pandas on the Parquet; runs made before the QA columns;
- ``autolabel review import``: a reviewed Label Studio export built the way Label Studio writes one
  (annotations whose new masks are encoded by the converter's ``encode_rle``), imported, and the
  COCO and PNG exports and the report checked against the expected objects with pycocotools.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from label_studio_converter import brush as ls_brush
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import autolabel_cli  # noqa: F401 - the CLI is driven through main() below, in-process
from synthetic_run import CLASS_NAMES, write_synthetic_run

from pipeline.outputs import labelstudio as ls
from pipeline.outputs.export import export
from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.report import ReportOptions, write_report


def _mask(rle: dict) -> np.ndarray:
    """A Parquet mask decoded by pycocotools itself."""
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}).astype(bool)


def _official_decode(rle: list[int], h: int, w: int) -> np.ndarray:
    """Label Studio's converter: RLE -> RGBA values; a mask pixel is one whose alpha byte is set."""
    values = ls_brush.decode_rle(rle)
    return np.reshape(values, [h, w, 4])[:, :, 3] >= 128


def _official_encode(mask: np.ndarray) -> list[int]:
    """What Label Studio's tools write for a mask: 255 in the four RGBA bytes of each mask pixel."""
    return ls_brush.encode_rle(np.repeat(mask.astype(np.uint8).ravel() * 255, 4))


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qa-run")
    write_synthetic_run(str(root / "run"), num_images=30, mean_objects=4.0, image_folder=root / "img", seed=21, qa=True)
    objects = pq.read_table(root / "run" / "objects").to_pandas()
    return {"root": root, "out": root / "run", "img": root / "img", "objects": objects,
            "images": pq.read_table(root / "run" / "images").to_pandas()}


def _fresh_copy(qa_run: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(qa_run["out"], run)
    return run


# ------------------------------------------------------------------------------- Label Studio's RLE


def test_rle_encoder_writes_label_studios_bytes_and_decoders_agree():
    rng = np.random.default_rng(5)
    masks = [rng.random((37, 53)) > 0.5, np.ones((300, 300), bool), np.zeros((4, 9), bool), np.ones((1, 1), bool)]
    corner = np.zeros((70, 90), bool)
    corner[-1, -1] = True
    line = np.zeros((400, 410), bool)
    line[:, 3] = True  # runs of 4 values between long ones
    blob = np.pad(np.ones((100, 200), bool), 60)  # runs longer than 65,536 values, cut into pieces
    masks += [corner, line, blob]
    for mask in masks:
        ours = ls.rle_encode(mask)
        assert ours == _official_encode(mask), f"bytes differ for a {mask.shape} mask"
        assert np.array_equal(_official_decode(ours, *mask.shape), mask)
        assert np.array_equal(ls.rle_decode(ours, *mask.shape), mask)
    # Streams with literal runs (Label Studio's browser writes them for anti-aliased strokes): our decoder reads them.
    for _ in range(10):
        values = rng.integers(0, 256, int(rng.integers(1, 3000))).astype(np.uint8)
        values[: len(values) // 2] = 7
        assert np.array_equal(ls.rle_decode_values(ls_brush.encode_rle(values)), values)
    with pytest.raises(ls.LabelStudioError, match="an RGBA image of 5x4 needs 80"):
        ls.rle_decode(ls.rle_encode(np.ones((3, 3), bool)), 4, 5)


def test_image_urls_label_studio_can_load():
    urls = ls.ImageUrls("/data/photos", None)
    assert urls("file:///data/photos/site a/x%y.jpg") == "/data/local-files/?d=site%20a/x%25y.jpg"
    assert urls("/data/photos/b.png") == "/data/local-files/?d=b.png"
    assert urls("s3://bucket/k.jpg") == "s3://bucket/k.jpg" and urls("https://h.test/k.jpg") == "https://h.test/k.jpg"
    assert urls.as_is == {"s3": 1, "https": 1}
    assert urls("file:///data/photos/shard.tar#m/1.jpg") == "file:///data/photos/shard.tar#m/1.jpg" and urls.tar_members == 1
    with pytest.raises(ls.LabelStudioError, match="is not under --image-root /data/photos"):
        urls("file:///elsewhere/a.jpg")
    mapped = ls.ImageUrls("s3://bucket/photos", "https://cdn.test/p")
    assert mapped("s3://bucket/photos/a/b c.jpg") == "https://cdn.test/p/a/b%20c.jpg"
    assert ls.common_folder(["file:///d/p/a/1.jpg", "file:///d/p/b/2.jpg", "s3://x/y.jpg"]) == "/d/p"


# ------------------------------------------------------------------------------- the labelstudio export


def _tasks(folder: Path) -> list[dict]:
    return json.loads((folder / "tasks.json").read_text())


def test_labelstudio_export_decodes_bit_for_bit_with_label_studios_decoder(qa_run, tmp_path, capsys):
    code, out, err = _cli(capsys, "export", str(qa_run["out"]), "--format", "labelstudio", "--out", str(tmp_path / "ls"), "--quiet")
    assert code == 0, err
    assert "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=" + str(qa_run["img"]) in out
    objects = qa_run["objects"]
    counted = objects[(objects.status == "ok") & (objects.area > 0)]
    ok = qa_run["images"][qa_run["images"].status == "ok"].astype({"width": int, "height": int}).set_index("image_id")
    config = ET.fromstring((tmp_path / "ls" / "labeling-config.xml").read_text())
    brush, image_tag = config.find("BrushLabels"), config.find("Image")
    assert image_tag.get("value") == "$image"
    assert {label.get("value") for label in brush.findall("Label")} == set(CLASS_NAMES.values())
    tasks = _tasks(tmp_path / "ls")
    assert len(tasks) == len(ok)  # no filter: every ok image is a task, also those without objects
    by_key = {(r.image_id, r.object_id): r for r in counted.itertuples()}
    seen = set()
    for task in tasks:
        meta = task["data"]["autolabel"]
        image = ok.loc[meta["image_id"]]
        assert meta["uri"] == image.uri and (meta["width"], meta["height"]) == (image.width, image.height)
        # data.image: Label Studio's local-files URL, relative to the document root the export printed.
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=")
        assert (qa_run["img"] / unquote(url.split("?d=", 1)[1])).resolve() == Path(image.uri.removeprefix("file://")).resolve()
        results = task["predictions"][0]["result"] if task["predictions"] else []
        assert {r["id"]: int(r["id"][1:]) for r in results} == meta["objects"]
        for result in results:
            row = by_key[(meta["image_id"], meta["objects"][result["id"]])]
            assert (result["from_name"], result["to_name"], result["type"]) == (brush.get("name"), brush.get("toName"), "brushlabels")
            assert brush.get("toName") == image_tag.get("name")
            assert (result["original_width"], result["original_height"], result["image_rotation"]) == (image.width, image.height, 0)
            assert result["value"]["format"] == "rle" and result["value"]["brushlabels"] == [row.class_name]
            assert result["score"] == pytest.approx(row.mask_score, abs=1e-6)
            decoded = _official_decode(result["value"]["rle"], image.height, image.width)
            assert np.array_equal(decoded, _mask(row.mask)), f"{row.uri} object {row.object_id}"
            seen.add((row.image_id, row.object_id))
        if results:
            assert task["predictions"][0]["score"] == pytest.approx(min(r["score"] for r in results), abs=1e-6)
    assert seen == set(by_key)  # every object, duplicates left out


def test_labelstudio_export_of_the_flagged_objects(qa_run, tmp_path, capsys):
    code, out, err = _cli(capsys, "export", str(qa_run["out"]), "--format", "labelstudio", "--flagged", "--out", str(tmp_path / "ls"),
                          "--image-root", str(qa_run["img"].parent), "--image-root-url", "http://files.test:8081/data", "--quiet")
    assert code == 0, err
    objects = qa_run["objects"]
    flagged = objects[(objects.status == "ok") & objects.needs_review]
    tasks = _tasks(tmp_path / "ls")
    got = {(t["data"]["autolabel"]["image_id"], oid) for t in tasks for oid in t["data"]["autolabel"]["objects"].values()}
    assert got == set(zip(flagged.image_id, flagged.object_id)) and got
    assert len(tasks) == flagged.image_id.nunique()  # with a filter, only images with something to review
    for task in tasks:
        uri = task["data"]["autolabel"]["uri"]
        assert task["data"]["image"] == "http://files.test:8081/data/img/" + uri.split("/img/", 1)[1]
        rows = flagged[flagged.image_id == task["data"]["autolabel"]["image_id"]]
        assert task["data"]["autolabel_flags"] == ",".join(sorted({f for fl in rows["flags"] for f in fl}))
        for row in rows.itertuples():
            assert f"o{row.object_id} {row.class_name}: {', '.join(row.flags)}" in task["data"]["autolabel_note"]
    assert f"{len(flagged)} objects" in out


# ------------------------------------------------------------------------------- filters


FILTER_CASES = [
    {},
    {"flagged": True},
    {"unflagged": True},
    {"include_duplicates": True},
    {"flagged": True, "include_duplicates": True, "classes": "person,car"},
    {"unflagged": True, "min_mask_score": 0.6, "min_area": 40},
]


def _expected(objects: pd.DataFrame, case: dict) -> pd.DataFrame:
    keep = objects.status.isin(["ok", "duplicate"] if case.get("include_duplicates") else ["ok"]) & (objects.candidate == 0)
    if case.get("flagged"):
        keep &= objects.needs_review.fillna(False).astype(bool)
    if case.get("unflagged"):
        keep &= ~objects.needs_review.fillna(False).astype(bool)
    if "classes" in case:
        keep &= objects.class_name.isin(case["classes"].split(","))
    if "min_mask_score" in case:
        keep &= objects.mask_score >= case["min_mask_score"]
    if "min_area" in case:
        keep &= objects.area >= case["min_area"]
    return objects[keep]


def test_flag_filters_select_the_same_objects_in_report_and_exports(qa_run, tmp_path):
    for n, case in enumerate(FILTER_CASES):
        filt = ObjectFilter.parse(**case)
        expected = _expected(qa_run["objects"], case)
        summary = write_report(str(qa_run["out"]), str(tmp_path / f"r{n}"), ReportOptions(gallery=0, flagged_gallery=0, filter=filt))["summary"]
        assert summary["totals"]["objects"] == len(expected), case
        result = export(str(qa_run["out"]), "coco", str(tmp_path / f"c{n}"), filt=filt, progress=False)
        coco = json.loads((tmp_path / f"c{n}" / "instances.json").read_text())
        uri_of = {i["id"]: i["uri"] for i in coco["images"]}
        got = sorted((uri_of[a["image_id"]], a["object_id"]) for a in coco["annotations"])
        assert got == sorted(zip(expected.uri, expected.object_id)) and result.objects == len(expected), case
        flags = {(r.uri, r.object_id): list(r.flags) for r in expected.itertuples()}
        assert all(a["flags"] == flags[(uri_of[a["image_id"]], a["object_id"])] and a["source"] == "detector" for a in coco["annotations"])
        if case.get("flagged") or not case:
            flagged = expected[expected.needs_review.astype(bool)]
            assert summary["quality"]["flagged"] == len(flagged)
            by_reason = pd.Series([f for fl in flagged["flags"] for f in fl]).value_counts().to_dict()
            assert summary["quality"]["flagged_by_reason"] == by_reason
    with pytest.raises(Exception, match="--flagged and --unflagged exclude each other"):
        ObjectFilter.parse(flagged=True, unflagged=True)


def test_quality_numbers_and_histograms_equal_the_parquet(qa_run, tmp_path):
    summary = write_report(str(qa_run["out"]), str(tmp_path), ReportOptions(gallery=2, flagged_gallery=6))["summary"]
    objects = qa_run["objects"]
    counted = objects[objects.status == "ok"]
    q = summary["quality"]
    assert q["recorded"] and q["objects"] == len(counted)
    assert q["duplicates"] == int((objects.status == "duplicate").sum()) > 0
    assert q["thresholds"]["min_stability"] == 0.8
    per_class = {c["class_name"]: (c["objects"], c["flagged"]) for c in q["flagged_by_class"]}
    expected = counted.groupby("class_name").agg(n=("object_id", "size"), f=("needs_review", "sum"))
    assert per_class == {k: (int(r.n), int(r.f)) for k, r in expected.iterrows()}
    for col in ("stability", "box_iou", "outside_box", "largest_region"):
        counts = np.histogram(np.clip(np.floor(counted[col].astype(np.float64) * 50), 0, 49), bins=np.arange(51))[0]
        assert q["histograms"][col]["counts"] == counts.tolist(), col
    regions = counted.regions.clip(upper=10).value_counts().sort_index()
    assert dict(zip(q["histograms"]["regions"]["values"], q["histograms"]["regions"]["objects"])) == regions.to_dict()
    assert q["histograms"]["hole_area"]["without_holes"] == int((counted.hole_area == 0).sum())
    assert sum(q["histograms"]["hole_area"]["counts"]) == int((counted.hole_area > 0).sum())
    gallery = q["gallery"]
    assert len(gallery) == 6 and len({g["flags"][0] for g in gallery}) >= 3  # taken in turn from each reason
    by_key = {(r.image_id, r.object_id): r for r in counted.itertuples()}
    assert all(list(by_key[(g["image_id"], g["object_id"])].flags) == g["flags"] and not g["problem"] for g in gallery)


@pytest.mark.parametrize("legacy", [True, False], ids=["no-qa-columns", "null-qa-columns"])
def test_runs_without_qa_count_as_nothing_flagged(tmp_path, capsys, legacy):
    """Runs made before the QA columns (legacy) or with them all null: nothing is flagged, every object is unflagged."""
    write_synthetic_run(str(tmp_path / "old"), num_images=12, image_folder=tmp_path / "img", seed=8, legacy=legacy)
    objects = pq.read_table(tmp_path / "old" / "objects").to_pandas()
    assert ("needs_review" not in objects.columns) if legacy else objects.needs_review.isna().all()
    code, out, err = _cli(capsys, "export", str(tmp_path / "old"), "--format", "coco", "--flagged", "--out", str(tmp_path / "f"), "--quiet")
    assert code == 0 and json.loads((tmp_path / "f" / "instances.json").read_text())["annotations"] == []
    code, out, err = _cli(capsys, "export", str(tmp_path / "old"), "--format", "labelstudio", "--unflagged", "--out", str(tmp_path / "u"), "--quiet")
    assert code == 0 and sum(len(t["data"]["autolabel"]["objects"]) for t in _tasks(tmp_path / "u")) == len(objects)
    for flag, expected in (("--flagged", 0), ("--unflagged", len(objects))):
        code, out, err = _cli(capsys, "report", str(tmp_path / "old"), "--out", str(tmp_path / flag), "--gallery", "0", flag)
        assert code == 0, err
        assert json.loads((tmp_path / flag / "summary.json").read_text())["totals"]["objects"] == expected
    code, out, err = _cli(capsys, "report", str(tmp_path / "old"), "--out", str(tmp_path / "r"), "--gallery", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["quality"] == {"recorded": False}
    assert "data-qa='not-recorded'>QA was not recorded for this run" in (tmp_path / "r" / "report.html").read_text()


# ------------------------------------------------------------------------------- the review round trip


def _reviewed_export(tasks: list[dict], plan: dict) -> tuple[list[dict], dict]:
    """Label Studio's JSON export of the project after review, as Label Studio writes it: tasks with ids,
    ``annotations`` (the person's regions; untouched ones copied from the prediction, new masks encoded by
    the converter's ``encode_rle``) and ``predictions`` as ids only. Returns it and what was done."""
    out, done = [], {"accepted": set(), "corrected": {}, "relabeled": {}, "rejected": set(), "added": {}}
    for n, task in enumerate(tasks, 1):
        meta = task["data"]["autolabel"]
        h, w = meta["height"], meta["width"]
        regions = copy.deepcopy(task["predictions"][0]["result"]) if task["predictions"] else []
        exported = {"id": n, "data": task["data"], "predictions": [1000 + n] if task["predictions"] else [], "meta": {},
                    "annotations": [], "drafts": [], "total_annotations": 1, "cancelled_annotations": 0, "project": 7}
        action = plan.get(n)
        if action == "cancelled":
            exported["annotations"] = [{"id": 50 + n, "result": [], "was_cancelled": True, "completed_by": 3}]
            out.append(exported)
            continue
        if action == "untouched":
            out.append(exported)
            continue
        for region in regions:
            region.pop("score", None)
            region["origin"] = "prediction"
        key = lambda r: (meta["image_id"], meta["objects"][r["id"]])  # noqa: E731
        if action == "correct":  # the person erases the region's right half
            region = regions[0]
            mask = ls.rle_decode(region["value"]["rle"], h, w)
            ys, xs = np.nonzero(mask)
            mask[:, (xs.min() + xs.max() + 1) // 2:] = False
            region["value"]["rle"] = _official_encode(mask)
            done["corrected"][key(region)] = mask
        elif action == "relabel":
            region = regions[0]
            new = "chair" if region["value"]["brushlabels"] != ["chair"] else "cup"
            region["value"]["brushlabels"] = [new]
            done["relabeled"][key(region)] = new
        elif action == "reject":
            done["rejected"].add(key(regions.pop(0)))
        elif action == "add":
            mask = np.zeros((h, w), bool)
            mask[2:9, 3:14] = True
            mask[5, 20] = True
            regions.append({"id": "Zx81kQp2rT", "from_name": "label", "to_name": "image", "type": "brushlabels", "origin": "manual",
                            "original_width": w, "original_height": h, "image_rotation": 0,
                            "value": {"format": "rle", "rle": _official_encode(mask), "brushlabels": ["dog"]}})
            done["added"][meta["image_id"]] = mask
        done["accepted"] |= {key(r) for r in regions if r["id"] in meta["objects"] and key(r) not in done["corrected"]
                             and key(r) not in done["relabeled"]}
        exported["annotations"] = [
            {"id": 90 + n, "completed_by": {"id": 3, "email": "reviewer@example.com"}, "was_cancelled": False,
             "result": [], "created_at": "2026-02-01T10:00:00Z", "updated_at": "2026-02-01T10:00:00Z"},  # an older version
            {"id": 100 + n, "completed_by": {"id": 3, "email": "reviewer@example.com"}, "was_cancelled": False, "ground_truth": False,
             "result": regions, "created_at": "2026-02-01T10:00:00Z", "updated_at": "2026-02-02T09:30:00.123Z", "lead_time": 12.5,
             "prediction": {}, "result_count": len(regions), "task": n, "parent_prediction": 1000 + n, "parent_annotation": None},
        ]
        out.append(exported)
    return out, done


def _expected_view(objects: pd.DataFrame, done: dict) -> dict[tuple[str, int], tuple[str, np.ndarray, str]]:
    """(image_id, object_id) -> (class name, mask, source) of every object after the review, from the Parquet."""
    view = {}
    for row in objects[(objects.status == "ok") & (objects.candidate == 0)].itertuples():
        key = (row.image_id, row.object_id)
        if key in done["rejected"]:
            continue
        mask, name, source = _mask(row.mask), row.class_name, row.source
        if key in done["corrected"]:
            mask, source = done["corrected"][key], "review"
        if key in done["relabeled"]:
            name, source = done["relabeled"][key], "review"
        view[key] = (name, mask, source)
    for image_id, mask in done["added"].items():
        view[(image_id, _added_id(objects, image_id))] = ("dog", mask, "review")
    return view


def _check_exports(run: Path, tmp: Path, view: dict, capsys) -> None:
    """COCO (pycocotools) and instance PNGs hold exactly the expected objects and masks."""
    for fmt in ("coco", "png"):
        code, out, err = _cli(capsys, "export", str(run), "--format", fmt, "--out", str(tmp / fmt), "--overwrite", "--quiet")
        assert code == 0, err
        assert "with the review decisions imported into the run" in out
    coco = COCO(str(tmp / "coco" / "instances.json"))
    got = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        got[(image["autolabel_image_id"], ann["object_id"])] = (coco.loadCats(ann["category_id"])[0]["name"],
                                                               coco.annToMask(ann).astype(bool), ann["source"])
    assert set(got) == set(view)
    for key, (name, mask, source) in view.items():
        assert got[key][0] == name and got[key][2] == source, key
        assert np.array_equal(got[key][1], mask), key
    with open(tmp / "png" / "index.csv", newline="") as f:
        for entry in csv.DictReader(f):
            painted = np.asarray(Image.open(tmp / "png" / entry["instances_png"]))
            expected = np.zeros(painted.shape, np.uint16)
            for (image_id, object_id), (_, mask, _) in sorted(view.items(), key=lambda kv: -kv[0][1]):
                if image_id == entry["image_id"]:
                    expected[mask] = object_id + 1  # the lowest object_id wins overlaps
            assert np.array_equal(painted, expected), entry["uri"]


def _files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.parts[len(run.parts)] in ("images", "objects", "run.json")}


def test_review_round_trip_through_label_studios_format(qa_run, tmp_path, capsys):
    run = _fresh_copy(qa_run, tmp_path)
    objects = qa_run["objects"]
    code, out, err = _cli(capsys, "export", str(run), "--format", "labelstudio", "--out", str(tmp_path / "ls"), "--quiet")
    assert code == 0, err
    tasks = _tasks(tmp_path / "ls")
    with_objects = [n for n, t in enumerate(tasks, 1) if len(t["data"]["autolabel"]["objects"]) >= 2]
    plan = {with_objects[0]: "correct", with_objects[1]: "reject", with_objects[2]: "add", with_objects[3]: "relabel",
            with_objects[4]: "cancelled", with_objects[5]: "untouched"}
    reviewed, done = _reviewed_export(tasks, plan)
    (tmp_path / "project-7-export.json").write_text(json.dumps(reviewed))
    before = _files(run)

    code, out, err = _cli(capsys, "review", "import", str(run), str(tmp_path / "project-7-export.json"))
    assert code == 0, err
    n_tasks = len(tasks)
    assert f"{n_tasks} tasks ({n_tasks - 2} reviewed, 2 without a submitted annotation)" in out
    assert f"{len(done['accepted'])} accepted, {len(done['corrected']) + len(done['relabeled'])} corrected, 1 rejected, 1 added" in out
    assert _files(run) == before  # the run's committed files are untouched
    decisions = pq.read_table(run / "review").to_pandas()
    assert set(decisions.decision) == {"accepted", "corrected", "rejected", "added"}
    added = decisions[decisions.decision == "added"].iloc[0]
    assert added.ls_result_id == "Zx81kQp2rT" and added.annotator == "reviewer@example.com" and added.reviewed_at.startswith("2026-02-02")
    corrected = {(r.image_id, r.object_id): r for r in decisions[decisions.decision == "corrected"].itertuples()}
    assert set(corrected) == set(done["corrected"]) | set(done["relabeled"])
    for key, mask in done["corrected"].items():
        assert np.array_equal(_mask(corrected[key].mask), mask) and corrected[key].area == mask.sum()
    for key, name in done["relabeled"].items():
        assert corrected[key].class_name == name and corrected[key].class_id == next(i for i, n in CLASS_NAMES.items() if n == name)

    view = _expected_view(objects, done)
    _check_exports(run, tmp_path, view, capsys)
    summary = write_report(str(run), str(tmp_path / "report"), ReportOptions(gallery=3, flagged_gallery=3))["summary"]
    assert summary["totals"]["objects"] == len(view)
    by_class = pd.Series([name for name, _, _ in view.values()]).value_counts().to_dict()
    assert {c["class_name"]: c["count"] for c in summary["totals"]["objects_by_class"]} == by_class
    assert {k: summary["review"][k] for k in ("accepted", "corrected", "rejected", "added")} == {
        "accepted": len(done["accepted"]), "corrected": 2, "rejected": 1, "added": 1}
    assert summary["review"]["reviewed"] == len(done["accepted"]) + 3
    reviewed_keys = done["accepted"] | set(done["corrected"]) | set(done["relabeled"])
    still_flagged = [k for k, r in objects.set_index(["image_id", "object_id"]).iterrows()
                     if r.status == "ok" and r.needs_review and k not in reviewed_keys and k not in done["rejected"]]
    assert summary["quality"]["flagged"] == len(still_flagged)  # reviewed objects are no longer flagged
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<div class=\"v\" data-review=\"added\">1</div>" in page and "Reviewed: " in page

    # --flagged after the review: what is still to be reviewed, nothing a person saw.
    flagged = export(str(run), "labelstudio", str(tmp_path / "again"), filt=ObjectFilter.parse(flagged=True), progress=False)
    again = {(t["data"]["autolabel"]["image_id"], o) for t in _tasks(tmp_path / "again") for o in t["data"]["autolabel"]["objects"].values()}
    assert again == set(still_flagged) and flagged.objects == len(still_flagged)

    # The same file again: the same decisions (the added region keeps its object_id), the same objects.
    code, out, err = _cli(capsys, "review", "import", str(run), str(tmp_path / "project-7-export.json"))
    assert code == 0, err
    imports = sorted((run / "review").glob("import-*.parquet"))
    assert len(imports) == 2
    first, second = (pq.read_table(p).to_pandas().drop(columns="import_id") for p in imports)
    pd.testing.assert_frame_equal(first, second)
    _check_exports(run, tmp_path, view, capsys)

    # A later review, of tasks exported from the reviewed run: the corrected object's original mask is
    # restored (-> accepted) and the added region deleted (-> rejected). The later import wins.
    code, out, err = _cli(capsys, "export", str(run), "--format", "labelstudio", "--out", str(tmp_path / "ls2"), "--quiet")
    assert code == 0, err
    tasks2 = {t["data"]["autolabel"]["image_id"]: t for t in _tasks(tmp_path / "ls2")}
    (image_id, object_id), corrected_mask = next(iter(done["corrected"].items()))
    original = objects[(objects.image_id == image_id) & (objects.object_id == object_id)].iloc[0]
    restored = copy.deepcopy(tasks2[image_id]["predictions"][0]["result"])
    region = next(r for r in restored if r["id"] == f"o{object_id}")
    assert np.array_equal(_official_decode(region["value"]["rle"], *corrected_mask.shape), corrected_mask)  # exported as corrected
    region["value"]["rle"] = _official_encode(_mask(original["mask"]))
    added_image = next(iter(done["added"]))
    added_id = _added_id(objects, added_image)
    kept = [r for r in tasks2[added_image]["predictions"][0]["result"] if r["id"] != f"o{added_id}"]
    assert len(kept) == len(tasks2[added_image]["predictions"][0]["result"]) - 1  # the added object was exported as o<id>
    later = [{"id": 500 + n, "data": tasks2[i]["data"], "predictions": [], "annotations": [
        {"id": 500 + n, "completed_by": 4, "was_cancelled": False, "result": result,
         "created_at": "2026-03-01T10:00:00Z", "updated_at": "2026-03-01T10:00:00Z"}]}
        for n, (i, result) in enumerate([(image_id, restored), (added_image, kept)])]
    (tmp_path / "later.json").write_text(json.dumps(later))
    code, out, err = _cli(capsys, "review", "import", str(run), str(tmp_path / "later.json"))
    assert code == 0, err
    view[(image_id, object_id)] = (original.class_name, _mask(original["mask"]), original.source)
    del view[(added_image, added_id)]
    _check_exports(run, tmp_path, view, capsys)
    summary = write_report(str(run), str(tmp_path / "report2"), ReportOptions(gallery=0, flagged_gallery=0))["summary"]
    assert summary["totals"]["objects"] == len(view)
    assert (summary["review"]["corrected"], summary["review"]["added"], len(summary["review"]["imports"])) == (1, 0, 3)


def _added_id(objects: pd.DataFrame, image_id: str) -> int:
    """The object_id a region drawn on this image gets: the next after every row of the image."""
    return int(objects[objects.image_id == image_id].object_id.max()) + 1


def test_review_import_refuses_what_it_cannot_place(qa_run, tmp_path, capsys):
    run = _fresh_copy(qa_run, tmp_path)
    export(str(run), "labelstudio", str(tmp_path / "ls"), progress=False)
    tasks = _tasks(tmp_path / "ls")
    cases = {
        "not.json": ("{not json", "is not JSON"),
        "min.json": (json.dumps([{"image": "x.png", "label": []}]), "the tasks have no 'annotations'"),
        "foreign.json": (json.dumps([{"id": 1, "data": {"image": "x"}, "annotations": []}]), "only tasks made by `autolabel export --format labelstudio`"),
    }
    other = copy.deepcopy(tasks[0])
    other["data"]["autolabel"]["image_id"] = "0123456789abcdef"
    cases["other-run.json"] = (json.dumps([{"id": 1, "data": other["data"], "annotations": []}]), "tasks show images this run does not have")
    elsewhere = copy.deepcopy(tasks[0])
    elsewhere["data"]["autolabel"]["run_fingerprint"] = "f" * 64
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "fingerprint": {"sha256": "a" * 64}}))
    cases["elsewhere.json"] = (json.dumps([{"id": 1, "data": elsewhere["data"], "annotations": []}]),
                               "the tasks were exported from another run (fingerprint ffffffffffff..., this run's is aaaaaaaaaaaa...)")
    giraffe = copy.deepcopy(next(t for t in tasks if t["predictions"]))
    result = giraffe["predictions"][0]["result"]
    result[0]["value"]["brushlabels"] = ["giraffe"]
    cases["giraffe.json"] = (json.dumps([{"id": 1, "data": giraffe["data"], "annotations": [{"id": 1, "result": result}]}]),
                             "label 'giraffe' is not one of the run's classes")
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        code, out, err = _cli(capsys, "review", "import", str(run), str(tmp_path / name))
        assert code == 2 and message in err, (name, err)
    assert not (run / "review").exists() or not list((run / "review").iterdir())


def _coco_objects(run: Path, out: Path) -> set[tuple[str, int]]:
    export(str(run), "coco", str(out), progress=False)
    coco = json.loads((out / "instances.json").read_text())
    image_ids = {i["id"]: i["autolabel_image_id"] for i in coco["images"]}
    shutil.rmtree(out)
    return {(image_ids[a["image_id"]], a["object_id"]) for a in coco["annotations"]}


def test_decisions_of_another_run_are_ignored_with_a_warning(qa_run, tmp_path, caplog):
    """Issue 16: decisions carry the run_id of the run they were made on. Today they carried none, so
    a later run in the same folder lost its object 0 to a rejection made on an earlier run's object 0."""
    import logging

    from pipeline.outputs.review import import_review

    run = _fresh_copy(qa_run, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "run_id": "a" * 32}))
    export(str(run), "labelstudio", str(tmp_path / "ls"), progress=False)
    task = next(t for t in _tasks(tmp_path / "ls") if t["data"]["autolabel"]["objects"])
    gone_region, gone_id = next(iter(task["data"]["autolabel"]["objects"].items()))
    reviewed = [{"id": 1, "data": task["data"], "predictions": [], "annotations": [
        {"id": 1, "completed_by": 1, "was_cancelled": False, "created_at": "2026-02-02T10:00:00Z",
         "result": [r for r in task["predictions"][0]["result"] if r["id"] != gone_region]}]}]
    (tmp_path / "reviewed.json").write_text(json.dumps(reviewed))
    everything = _coco_objects(run, tmp_path / "c")
    gone = (task["data"]["autolabel"]["image_id"], gone_id)
    assert gone in everything

    assert import_review(str(run), str(tmp_path / "reviewed.json")).decisions["rejected"] == 1
    assert _coco_objects(run, tmp_path / "c") == everything - {gone}

    # Another run in the same folder (as the previous version's --overwrite left it): the decisions do not apply.
    (run / "run.json").write_text(json.dumps({**manifest, "run_id": "b" * 32}))
    with caplog.at_level(logging.WARNING, logger="autolabel.review"):
        assert _coco_objects(run, tmp_path / "c") == everything
    decisions = pq.read_table(run / "review")
    assert f"ignoring {decisions.num_rows} decisions (1 import files in file://{run}/review)" in caplog.text
    assert set(decisions.column("run_id").to_pylist()) == {"a" * 32}
    assert json.loads(next((run / "review" / "_logs").glob("import-*.json")).read_text())["run_id"] == "a" * 32
