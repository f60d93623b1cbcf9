"""``autolabel export``: COCO through pycocotools and COCOeval, YOLO-seg through ultralytics' own
dataset loader, instance/class PNGs and RGBA cutouts pixel by pixel against the Parquet masks;
filters, fsspec URLs, refusals and damaged runs."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import autolabel_cli, counted_objects, model_overrides
from synthetic_run import write_synthetic_run

from pipeline.outputs.export import ExportError, export, mask_polygons
from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.rundata import read_rgb
from pipeline.sam import masks as mask_codec


def _counted(objects: pd.DataFrame) -> pd.DataFrame:
    """What an export writes: counted objects with a non-empty mask."""
    objects = counted_objects(objects)
    return objects[objects["area"] > 0]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synthetic-export")
    write_synthetic_run(str(root / "run"), num_images=60, image_folder=root / "img", seed=2)
    return {
        "out": root / "run",
        "images": pq.read_table(root / "run" / "images").to_pandas(),
        "objects": pq.read_table(root / "run" / "objects").to_pandas(),
    }


def _coco_eval_ap(gt_path: Path, iou_type: str) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with open(gt_path) as f:
        detections = json.load(f)["annotations"]
    gt = COCO(str(gt_path))
    dt = gt.loadRes(detections)
    ev = COCOeval(gt, dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0])


@pytest.mark.slow
def test_coco_export_matches_parquet_and_evaluates_to_ap_1(labeled, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    proc = subprocess.run([*autolabel_cli(), "export", str(labeled["out"]), "--format", "coco", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    images, objects = labeled["images"], _counted(labeled["objects"])
    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == (images["status"] == "ok").sum()
    assert len(coco.getAnnIds()) == len(objects) > 0
    by_key = {(r.uri, r.object_id): r for r in objects.itertuples()}
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        row = by_key[(img["uri"], ann["object_id"])]
        parquet_mask = mask_codec.decode(row.mask)
        assert np.array_equal(coco.annToMask(ann).astype(bool), parquet_mask)
        assert ann["area"] == row.area == parquet_mask.sum()
        assert coco.loadCats(ann["category_id"])[0]["name"] == row.class_name
        assert ann["category_id"] == row.class_id + 1
        ys, xs = np.nonzero(parquet_mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["score"] == pytest.approx(row.det_score, abs=1e-6)
        assert (img["width"], img["height"]) == (parquet_mask.shape[1], parquet_mask.shape[0])
    assert _coco_eval_ap(out / "instances.json", "segm") == pytest.approx(1.0)
    assert _coco_eval_ap(out / "instances.json", "bbox") == pytest.approx(1.0)


def test_coco_polygons_cover_the_masks(synthetic, tmp_path):
    from pycocotools.coco import COCO

    export(str(synthetic["out"]), "coco", str(tmp_path / "coco"), segmentation="polygon", progress=False)
    coco = COCO(str(tmp_path / "coco" / "instances.json"))
    objects = _counted(synthetic["objects"])
    assert len(coco.getAnnIds()) == len(objects)
    by_key = {(r.uri, r.object_id): r for r in objects.itertuples()}
    ious = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert isinstance(ann["segmentation"], list) and all(len(p) >= 6 for p in ann["segmentation"])
        row = by_key[(coco.loadImgs(ann["image_id"])[0]["uri"], ann["object_id"])]
        ious.append(mask_codec.iou(coco.annToMask(ann).astype(bool), mask_codec.decode(row.mask)))
    # Polygons run through pixel centres, so small masks lose their outer half-pixel ring.
    assert np.median(ious) > 0.75 and min(ious) > 0.2
    assert _coco_eval_ap(tmp_path / "coco" / "instances.json", "segm") == pytest.approx(1.0)


def test_mask_polygons_of_a_ring_and_a_dot():
    mask = np.zeros((40, 50), bool)
    mask[5:30, 5:30] = True
    mask[12:22, 12:22] = False  # a hole: dropped (outer contours only)
    mask[35, 40] = True  # a single pixel: its pixel square
    polys = mask_polygons(mask)
    assert len(polys) == 2
    areas = sorted(abs(0.5 * np.sum(p[:, 0] * np.roll(p[:, 1], 1) - np.roll(p[:, 0], 1) * p[:, 1])) for p in polys)
    assert areas == [1.0, 24.0 * 24.0]


@pytest.mark.slow
def test_yolo_export_loads_with_ultralytics_dataset_loader(labeled, tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    out = tmp_path / "yolo"
    result = export(str(labeled["out"]), "yolo", str(out), progress=False)
    assert not result.failed
    data = check_det_dataset(str(out / "data.yaml"))
    names = {int(k): v for k, v in labeled["manifest"]["models"]["detector"]["class_names"].items()}
    assert data["names"] == names and data["nc"] == len(names)
    cfg = get_cfg(overrides={"task": "segment", "imgsz": 320, "cache": False, "workers": 0})
    dataset = build_yolo_dataset(cfg, data["train"], batch=2, data=data, mode="val")
    images, objects = labeled["images"], _counted(labeled["objects"])
    ok = images[images["status"] == "ok"]
    assert len(dataset.labels) == len(ok)
    objects_by_stem = {}
    for row in objects.itertuples():
        objects_by_stem.setdefault(row.image_id, []).append(row)
    ious = []
    for label in dataset.labels:
        image_id = Path(label["im_file"]).stem.rsplit("-", 1)[1]
        rows = sorted(objects_by_stem.get(image_id, []), key=lambda r: r.object_id)
        height, width = label["shape"]
        assert len(label["segments"]) == len(rows) == len(label["cls"])
        assert [int(c) for c in label["cls"].reshape(-1)] == [r.class_id for r in rows]
        for segment, row in zip(label["segments"], rows):
            assert segment.min() >= 0 and segment.max() <= 1
            from pycocotools import mask as mask_utils

            poly = (segment * np.array([width, height])).reshape(-1).tolist()
            drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], height, width))).astype(bool)
            ious.append(mask_codec.iou(drawn, mask_codec.decode(row.mask)))
    assert ious and np.median(ious) > 0.6  # merged outer contours of SAM's (random-weight) masks
    batch = dataset[0]  # the training-time path: image letterboxed, polygons turned into masks
    assert batch["img"].shape[0] == 3 and "masks" in batch and batch["cls"].shape[0] == len(dataset.labels[0]["cls"])


def test_yolo_val_split_is_repeatable(synthetic, tmp_path):
    result = export(str(synthetic["out"]), "yolo", str(tmp_path / "y"), val_fraction=0.3, progress=False)
    train = {p.stem for p in (tmp_path / "y" / "labels" / "train").glob("*.txt")}
    val = {p.stem for p in (tmp_path / "y" / "labels" / "val").glob("*.txt")}
    assert train and val and not train & val and len(train | val) == result.images == (synthetic["images"].status == "ok").sum()
    again = export(str(synthetic["out"]), "yolo", str(tmp_path / "y"), val_fraction=0.3, overwrite=True, progress=False)
    assert {p.stem for p in (tmp_path / "y" / "labels" / "val").glob("*.txt")} == val and again.images == result.images
    assert "val: images/val" in (tmp_path / "y" / "data.yaml").read_text()


def test_png_export_instance_and_class_ids(synthetic, tmp_path):
    export(str(synthetic["out"]), "png", str(tmp_path / "png"), class_png=True, progress=False)
    objects = _counted(synthetic["objects"])
    with open(tmp_path / "png" / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == (synthetic["images"].status == "ok").sum()
    checked = 0
    for entry in index:
        instances = np.asarray(Image.open(tmp_path / "png" / entry["instances_png"]))
        classes = np.asarray(Image.open(tmp_path / "png" / entry["classes_png"]))
        assert instances.dtype == np.uint16 and classes.dtype == np.uint8
        rows = objects[objects["image_id"] == entry["image_id"]].sort_values("object_id")
        assert int(entry["objects"]) == len(rows)
        covered = np.zeros(instances.shape, bool)
        for row in rows.itertuples():  # lower object_id = better score = wins overlaps
            mask = mask_codec.decode(row.mask)
            expected = mask & ~covered
            assert np.array_equal(instances == row.object_id + 1, expected)
            assert (classes[expected] == row.class_id + 1).all()
            covered |= mask
            checked += 1
        assert (instances[~covered] == 0).all() and (classes[~covered] == 0).all()
    assert checked == len(objects)


@pytest.mark.slow
def test_cutouts_are_the_masked_pixels_of_the_real_photos(labeled, tmp_path):
    result = export(str(labeled["out"]), "cutouts", str(tmp_path / "cut"), progress=False)
    objects = _counted(labeled["objects"])
    assert result.objects == len(objects) and not result.failed
    with open(tmp_path / "cut" / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == len(objects)
    photos = {}
    by_key = {(r.image_id, r.object_id): r for r in objects.itertuples()}
    for entry in index:
        row = by_key[(entry["image_id"], int(entry["object_id"]))]
        rgb = photos.setdefault(row.uri, read_rgb(row.uri))
        mask = mask_codec.decode(row.mask)
        ys, xs = np.nonzero(mask)
        crop = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        cut = np.asarray(Image.open(tmp_path / "cut" / entry["path"]))
        assert cut.shape == (*mask[crop].shape, 4)
        assert np.array_equal(cut[..., 3] > 0, mask[crop]) and set(np.unique(cut[..., 3])) <= {0, 255}
        assert np.array_equal(cut[..., :3][mask[crop]], rgb[crop][mask[crop]])


def test_filters_select_the_same_objects_as_pandas(synthetic, tmp_path):
    from pycocotools.coco import COCO

    filt = ObjectFilter.parse(min_mask_score=0.5, min_area=30, classes="car,dog")
    result = export(str(synthetic["out"]), "coco", str(tmp_path / "c"), filt=filt, progress=False)
    objects = _counted(synthetic["objects"])
    kept = objects[(objects.mask_score >= 0.5) & (objects.area >= 30) & objects.class_name.isin(["car", "dog"])]
    coco = COCO(str(tmp_path / "c" / "instances.json"))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"car", "dog"}
    got = sorted((coco.loadImgs(a["image_id"])[0]["uri"], a["object_id"]) for a in coco.loadAnns(coco.getAnnIds()))
    assert got == sorted(zip(kept.uri, kept.object_id))
    assert result.objects == len(kept) and result.filtered_out == len(objects) - len(kept)
    assert len(coco.getImgIds()) == (synthetic["images"].status == "ok").sum()  # images left empty stay listed


def test_export_from_and_to_fsspec_urls(tmp_path):
    write_synthetic_run("memory://export-test/run", num_images=20, image_folder=tmp_path / "img", seed=4)
    result = export("memory://export-test/run", "png", "memory://export-test/png", progress=False)
    fs = fsspec.filesystem("memory")
    index = list(csv.DictReader(io.StringIO(fs.cat_file("/export-test/png/index.csv").decode())))
    assert len(index) == result.images > 0
    png = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"/export-test/png/{index[0]['instances_png']}"))))
    objects = pd.read_parquet("memory://export-test/run/objects")
    first = objects[objects["image_id"] == index[0]["image_id"]]
    assert set(np.unique(png)) - {0} <= set(first["object_id"] + 1)


def test_export_refusals_and_exit_codes(synthetic, tmp_path):
    cli = autolabel_cli()
    proc = subprocess.run([*cli, "export", str(tmp_path), "--format", "coco"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no run.json here" in proc.stderr
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("someone's file")
    proc = subprocess.run([*cli, "export", str(synthetic["out"]), "--format", "coco", "--out", str(dest)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not empty and is not an earlier autolabel export" in proc.stderr
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]  # more cases in test_overwrite.py
    proc = subprocess.run([*cli, "export", str(synthetic["out"]), "--format", "tiff"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'tiff'" in proc.stderr


def test_unreadable_images_fail_the_export_and_are_named(tmp_path):
    """Cutouts re-read the photos: a vanished file is reported (exit 1), the other images are exported."""
    run = tmp_path / "run"
    write_synthetic_run(str(run), num_images=12, image_folder=tmp_path / "img", seed=5)
    images = pq.read_table(run / "images").to_pandas()
    victim = images[(images.status == "ok") & (images.num_objects > 0)].iloc[0]
    Path(victim.uri[len("file://"):]).unlink()
    proc = subprocess.run([*autolabel_cli(), "export", str(run), "--format", "cutouts", "--out", str(tmp_path / "cut"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "1 images FAILED" in proc.stdout and victim.uri in proc.stdout
    exported = {p.name for p in (tmp_path / "cut").iterdir() if p.is_dir()}
    with_objects = images[(images.status == "ok") & (images.num_objects > 0)]
    assert len(exported) == len(with_objects) - 1


def test_a_damaged_run_is_refused_not_exported_with_holes(synthetic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(synthetic["out"], run)
    part = sorted((run / "objects").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)  # one mask lost
    with pytest.raises(ExportError, match="images table says .* objects, objects/.* has .*: the run is damaged"):
        export(str(run), "png", str(tmp_path / "png"), progress=False)
    assert not (tmp_path / "png").exists()  # no half-written export left behind


# ------------------------------------------------------------------ runs with prompt-manifest objects


@pytest.fixture(scope="module")
def mixed_run(ray_local, checkpoints, photo_folder, tmp_path_factory) -> dict:
    """A real run with ``prompts.source=both`` on two real photos: detector boxes, plus a manifest box
    with a label (bus) and a lone click without one (zidane). Manifest objects have a null det_score,
    the click a null class."""
    from pipeline.config import load_config
    from pipeline.run.job import run

    root = tmp_path_factory.mktemp("mixed")
    photos = root / "photos"
    photos.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        shutil.copy(photo_folder / name, photos / name)
    lines = [
        {"uri": "bus.jpg", "objects": [{"object_key": "driver", "box": [50, 400, 250, 900], "label": "person"}]},
        {"uri": "zidane.jpg", "objects": [{"object_key": "tie", "points": [[560, 440]], "point_labels": [1]}]},
    ]
    (photos / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = root / "run"
    cfg = load_config(None, [f"input.uri={photos}", f"output.uri={out}", "prompts.source=both",
                             f"prompts.manifest={photos / 'prompts.jsonl'}", "report.enabled=false", *model_overrides(checkpoints)])
    manifest = run(cfg)
    assert manifest["status"] == "finished"
    objects = _counted(pq.read_table(out / "objects").to_pandas())
    manual = objects[objects["source"] == "manifest"]
    assert len(manual) == 2 and (objects["source"] == "detector").any(), "a mixed run: detector and manifest objects"
    assert manual["det_score"].isna().all() and objects.loc[objects["source"] == "detector", "det_score"].notna().all()
    assert pd.isna(manual.set_index("object_key").loc["tie", "class_name"])
    return {"out": out, "objects": objects, "images": pq.read_table(out / "images").to_pandas()}


def _cli_main(capsys, *argv: str) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_every_format_exports_detector_and_manifest_objects(mixed_run, tmp_path, capsys):
    """Today COCO and cutouts died with a TypeError on the first null det_score."""
    from pycocotools.coco import COCO

    run, objects = str(mixed_run["out"]), mixed_run["objects"]
    for fmt in ("coco", "yolo", "png", "cutouts"):
        code, out, err = _cli_main(capsys, "export", run, "--format", fmt, "--out", str(tmp_path / fmt), "--quiet")
        assert code == 0, err
        assert f"{len(objects)} objects" in out
    by_key = {(r.uri, r.object_id): r for r in objects.itertuples()}

    # COCO: a null score stays null; every mask, class and detector score as in the Parquet.
    coco = COCO(str(tmp_path / "coco" / "instances.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(objects)
    for ann in anns:
        row = by_key[(coco.loadImgs(ann["image_id"])[0]["uri"], ann["object_id"])]
        if row.source == "manifest":
            assert ann["score"] is None
        else:
            assert ann["score"] == pytest.approx(row.det_score, abs=1e-6)
        assert ann["mask_score"] == pytest.approx(row.mask_score, abs=1e-6)
        assert coco.loadCats(ann["category_id"])[0]["name"] == ("(unlabeled)" if pd.isna(row.class_name) else row.class_name)
        assert np.array_equal(coco.annToMask(ann).astype(bool), mask_codec.decode(row.mask))

    # Cutouts: an empty det_score cell for manifest objects, the score for detector ones.
    with open(tmp_path / "cutouts" / "index.csv", newline="") as f:
        index = {(r["uri"], int(r["object_id"])): r for r in csv.DictReader(f)}
    assert set(index) == set(by_key)
    for key, row in by_key.items():
        entry = index[key]
        assert entry["det_score"] == ("" if row.source == "manifest" else f"{row.det_score:.6f}")
        assert entry["class_name"] == ("(unlabeled)" if pd.isna(row.class_name) else row.class_name)
        assert (tmp_path / "cutouts" / entry["path"]).is_file()

    # YOLO: one line per object, the unlabeled click under the extra "(unlabeled)" class.
    import yaml

    names = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())["names"]
    unlabeled = next(i for i, n in names.items() if n == "(unlabeled)")
    label_lines = [line.split()[0] for p in (tmp_path / "yolo" / "labels" / "train").glob("*.txt") for line in p.read_text().splitlines()]
    assert sorted(map(int, label_lines)) == sorted(unlabeled if pd.isna(c) else int(c) for c in objects["class_id"])

    # PNG: every object's id where it is not under a better-scoring (lower object_id) one.
    with open(tmp_path / "png" / "index.csv", newline="") as f:
        for entry in csv.DictReader(f):
            painted = np.asarray(Image.open(tmp_path / "png" / entry["instances_png"]))
            covered = np.zeros(painted.shape, bool)
            for row in objects[objects["image_id"] == entry["image_id"]].sort_values("object_id").itertuples():
                mask = mask_codec.decode(row.mask)
                assert np.array_equal(painted == row.object_id + 1, mask & ~covered)
                covered |= mask


@pytest.mark.slow
def test_report_gallery_labels_manifest_objects(mixed_run, tmp_path, capsys):
    """Today the gallery's label f"{det_score:.2f}" raised a TypeError for manifest objects."""
    code, out, err = _cli_main(capsys, "report", str(mixed_run["out"]), "--out", str(tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    per_image = mixed_run["objects"].groupby("image_id").size()
    assert len(summary["gallery"]) == 2
    assert all(g["drawn"] == g["n"] == per_image[g["image_id"]] and g["on_image"] for g in summary["gallery"])
    assert summary["totals"]["objects"] == len(mixed_run["objects"])
    assert "– for manifest prompts, which have no detector score" in (tmp_path / "report.html").read_text()



def test_labelstudio_export_is_replaced_by_overwrite_and_removed_by_run_overwrite(synthetic, tmp_path):
    from pipeline.outputs.export import remove_export

    out = tmp_path / "ls"
    first = export(str(synthetic["out"]), "labelstudio", str(out), progress=False)
    assert first.images == (synthetic["images"].status == "ok").sum() and first.objects == len(_counted(synthetic["objects"]))
    with pytest.raises(ExportError, match="already holds an autolabel labelstudio export"):
        export(str(synthetic["out"]), "labelstudio", str(out), progress=False)
    export(str(synthetic["out"]), "labelstudio", str(out), overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".autolabel-export.json", "labeling-config.xml", "tasks.json"]
    assert remove_export(fsspec.filesystem("file"), str(out)) and not out.exists()
