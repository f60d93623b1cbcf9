"""End to end on a real local Ray cluster, real photos, real YOLOv8n and SAM 2.1 tiny models.

The models have random weights (none can be downloaded here) but are saved to checkpoint
files in the official formats and loaded back through the pipeline's own loading code.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import SAM_IMAGE_SIZE, model_overrides
from pipeline.config import load_config
from pipeline.io.listing import image_id_for
from pipeline.models.weights import sha256_file
from pipeline.run.job import run
from pipeline.sam import masks as mask_codec

pytestmark = pytest.mark.slow


def test_every_listed_image_has_exactly_one_row(labeled, photo_folder):
    images = labeled["images"]
    listed = sorted(p for p in photo_folder.rglob("*") if p.suffix in (".jpg", ".png"))
    assert sorted(images["uri"]) == sorted(f"file://{p}" for p in listed)
    assert images["image_id"].is_unique
    assert all(images["image_id"] == images["uri"].map(image_id_for))
    broken = images.set_index("uri").loc[f"file://{photo_folder / 'broken.jpg'}"]
    assert broken["status"] == "error" and broken["error_class"] == "decode_error"
    assert broken["error"].startswith("decode_error: ")
    assert (images["status"] == "ok").sum() == 5
    ok = images[images["status"] == "ok"]
    assert ok["error"].isna().all()
    assert labeled["manifest"]["totals"]["images"] == 6
    assert labeled["manifest"]["totals"]["errors_by_class"] == {"decode_error": 1}


def test_counts_agree_with_objects_table(labeled):
    images, objects = labeled["images"], labeled["objects"]
    assert len(objects) > 0, "the calibrated random detector must produce boxes on real photos"
    per_image = objects.groupby("image_id").size()
    for _, row in images.iterrows():
        assert row["num_objects"] == per_image.get(row["image_id"], 0)
        by_class = objects[objects["image_id"] == row["image_id"]].groupby("class_name").size().to_dict()
        assert {c["class_name"]: c["count"] for c in row["class_counts"]} == by_class
    assert labeled["manifest"]["totals"]["objects"] == len(objects)
    assert (objects.groupby("image_id")["object_id"].apply(lambda s: sorted(s) == list(range(len(s))))).all()


def test_masks_are_coco_rle_in_original_pixels(labeled):
    images = labeled["images"].set_index("image_id")
    for _, obj in labeled["objects"].iterrows():
        size = [int(s) for s in obj["mask"]["size"]]
        assert size == [images.loc[obj["image_id"], "height"], images.loc[obj["image_id"], "width"]]
        decoded = mask_codec.decode(obj["mask"])
        assert decoded.shape == tuple(size)
        assert decoded.sum() == obj["area"]
        assert 0.0 <= obj["det_score"] <= 1.0
        x0, y0, x1, y1 = obj["box"]
        assert x0 <= x1 and y0 <= y1


def test_parquet_reads_unchanged_with_pandas_polars_duckdb(labeled):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    out = labeled["out"]
    for table in ("images", "objects"):
        files = sorted((out / table).glob("*.parquet"))
        assert files and not any(p.name.startswith(".tmp") for p in (out / table).iterdir())
        arrow = pq.read_table(out / table)
        for fld in arrow.schema:
            assert not isinstance(fld.type, pa.ExtensionType), fld
        assert len(pd.read_parquet(out / table)) == arrow.num_rows
        assert pl.read_parquet(str(out / table / "*.parquet")).height == arrow.num_rows
        assert duckdb.sql(f"select count(*) from read_parquet('{out / table}/*.parquet')").fetchall()[0][0] == arrow.num_rows
    # A counting query a report would run, straight from duckdb over the nested column.
    via_duckdb = duckdb.sql(
        f"select sum(c.count) from (select unnest(class_counts) as c from read_parquet('{out}/images/*.parquet'))"
    ).fetchall()[0][0]
    assert via_duckdb == len(labeled["objects"])


def test_run_json_records_config_models_and_totals(labeled, checkpoints):
    manifest = json.loads((labeled["out"] / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["random_weights"] is False  # weights came from checkpoint files
    assert manifest["models"]["sam"]["sha256"] == sha256_file(checkpoints["sam"])
    assert manifest["models"]["detector"]["sha256"] == sha256_file(checkpoints["yolo"])
    assert manifest["config"]["sam"]["image_size"] == SAM_IMAGE_SIZE
    for package in ("torch", "sam2", "ultralytics", "ray", "autolabel"):
        assert manifest["versions"][package]
    assert manifest["input"] == {"uri": str(labeled["cfg"].input.uri), "format": "images", "num_images": 6, "num_shards": 3, "metadata_columns": [],
                                 "num_videos": 0, "video_shards": []}  # no video in this folder (docs/video.md)
    assert manifest["started_at"] <= manifest["finished_at"]
    assert manifest["models"]["sam"]["dtype"] == "float32"  # sam.dtype=auto on a CPU-only cluster


def test_every_sam_actor_works_and_run_json_says_where_the_time_went(labeled):
    """ray.sam_actors=2: one Ray block per shard, so both SAM actors get images; run.json records
    each actor's images, the seconds each stage took, and the detector's mean batch."""
    timings = labeled["manifest"]["timings"]
    actors = timings["sam_actors"]
    assert len(actors) == 2 and all(a["images"] > 0 for a in actors.values()), actors
    assert sum(a["images"] for a in actors.values()) == len(labeled["images"])
    # (an actor whose images all had no box never ran the model: busy 0)
    assert all(0 <= a["busy_fraction"] <= 1 for a in actors.values()) and any(a["busy_fraction"] > 0 for a in actors.values())
    stages = timings["stages"]
    assert set(stages) == {"read", "decode", "detect", "encode", "masks", "rle", "write"}, stages
    assert all(v["seconds"] > 0 for v in stages.values()) and sum(v["share"] for v in stages.values()) == pytest.approx(1, abs=1e-3)
    assert timings["images"] == labeled["manifest"]["totals"]["images"]
    detector = timings["detector"]  # every ok image went through YOLO once; how many per call
    assert detector["images"] == labeled["manifest"]["totals"]["ok"] and 1 <= detector["calls"] <= detector["images"]
    assert detector["mean_batch_size"] == round(detector["images"] / detector["calls"], 3)


def test_boxes_equal_direct_yolo_predict(labeled, checkpoints):
    """Same checkpoint, same image: the pipeline's boxes are what ``YOLO(...).predict`` returns."""
    from ultralytics import YOLO

    cfg = labeled["cfg"].detector
    yolo = YOLO(str(checkpoints["yolo"]))
    objects = labeled["objects"]
    assert objects["image_id"].nunique() >= 3, "most photos must have boxes for this to compare anything"
    ok = labeled["images"][labeled["images"]["status"] == "ok"]
    for _, image in ok.iterrows():
        result = yolo.predict(image["uri"].removeprefix("file://"), conf=cfg.conf, iou=cfg.iou, max_det=cfg.max_det, imgsz=cfg.imgsz, verbose=False)[0]
        mine = objects[objects["image_id"] == image["image_id"]].sort_values("object_id")
        expected = result.boxes.xyxy.numpy()
        assert len(mine) == len(expected)
        if not len(expected):
            continue
        np.testing.assert_allclose(np.stack(mine["box"].to_numpy()), expected, atol=0.05)
        np.testing.assert_allclose(mine["det_score"].to_numpy(), result.boxes.conf.numpy(), atol=1e-4)
        assert list(mine["class_id"]) == result.boxes.cls.int().tolist()


def _tutorial_predictor(checkpoints):
    """The SAM 2 tutorial's own ``build_sam2`` + ``SAM2ImagePredictor`` on the test checkpoint."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoints["sam"]), device="cpu",
        hydra_overrides_extra=[f"++model.image_size={SAM_IMAGE_SIZE}"],
    )
    predictor = SAM2ImagePredictor(model)
    s = SAM_IMAGE_SIZE
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor


def test_masks_equal_sam2_tutorial_code(labeled, checkpoints):
    """Same checkpoint, same boxes: masks equal the SAM 2 tutorial's set_image + predict."""
    predictor = _tutorial_predictor(checkpoints)
    objects = labeled["objects"]
    compared = 0
    for image_id, mine in objects.groupby("image_id"):
        mine = mine.sort_values("object_id")
        image = np.array(Image.open(mine["uri"].iloc[0].removeprefix("file://")).convert("RGB"))
        boxes = np.stack(mine["box"].to_numpy())
        with torch.inference_mode():
            predictor.set_image(image)
            masks, scores, _ = predictor.predict(box=boxes, multimask_output=False)
        masks = masks.reshape(len(boxes), *image.shape[:2]) > 0
        scores = scores.reshape(len(boxes))
        for j, (_, obj) in enumerate(mine.iterrows()):
            assert mask_codec.iou(mask_codec.decode(obj["mask"]), masks[j]) >= 0.99
            assert obj["mask_score"] == pytest.approx(scores[j], abs=1e-3)
            compared += 1
    assert compared == len(objects) > 0


def test_memory_filesystem_input_with_bfloat16(ray_local, checkpoints, tmp_path):
    """memory:// lives in the driver process only; the pipeline carries the bytes to workers.

    Also the bf16 path through the whole job (CPU autocast at a small ``sam.image_size``)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    bus = Path(__file__).parent.parent / "samples" / "images" / "bus.jpg"
    fs.pipe_file("/inbox/a/bus.jpg", bus.read_bytes())
    fs.pipe_file("/inbox/b/empty.jpg", b"")
    cfg = load_config(None, ["input.uri=memory://inbox", f"output.uri={tmp_path / 'out'}", "sam.dtype=bfloat16", *model_overrides(checkpoints)])
    manifest = run(cfg)
    images = pq.read_table(tmp_path / "out" / "images").to_pandas().set_index("uri")
    assert images.loc["memory:///inbox/a/bus.jpg", "status"] == "ok"
    assert images.loc["memory:///inbox/b/empty.jpg", "error_class"] == "decode_error"
    assert manifest["totals"]["images"] == 2
    assert manifest["models"]["sam"]["dtype"] == "bfloat16"
    objects = pq.read_table(tmp_path / "out" / "objects").to_pandas()
    assert len(objects) == images.loc["memory:///inbox/a/bus.jpg", "num_objects"] > 0
    # The masks the bf16 job stored are the fp32 tutorial's masks for the same boxes, object by
    # object (the bound of test_stages' bf16 test); the control, the fp32 mask of the same box
    # moved by a fifth of the image, must fail that bound.
    from test_stages import BF16_MIN_IOU

    predictor = _tutorial_predictor(checkpoints)
    image = np.array(Image.open(bus).convert("RGB"))
    h, w = image.shape[:2]
    boxes = np.stack(objects.sort_values("object_id")["box"].to_numpy())
    moved = boxes + np.array([w, h, w, h], np.float32) / 5
    moved = np.minimum(moved, [w, h, w, h])
    with torch.inference_mode():
        predictor.set_image(image)
        fp32 = predictor.predict(box=boxes, multimask_output=False)[0].reshape(len(boxes), h, w) > 0
        control = predictor.predict(box=moved, multimask_output=False)[0].reshape(len(boxes), h, w) > 0
    for j, (_, obj) in enumerate(objects.sort_values("object_id").iterrows()):
        stored = mask_codec.decode(obj["mask"])
        assert mask_codec.iou(stored, fp32[j]) >= BF16_MIN_IOU
        assert mask_codec.iou(stored, control[j]) < BF16_MIN_IOU


def test_progress_in_a_terminal_is_a_bar_and_in_logs_lines_with_rate_and_eta(checkpoints, tmp_path):
    """`autolabel run` in a real pseudo-terminal draws a bar that moves per staged batch (images
    done/total, images/s); its log lines say images done of the total, images/s and an ETA."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    from conftest import REPO, autolabel_cli

    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(p.name for p in (REPO / "samples" / "images").iterdir()):
        (images / name).write_bytes((REPO / "samples" / "images" / name).read_bytes())
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 columns wide
    proc = subprocess.Popen(
        [*autolabel_cli(), "run", f"input.uri={images}", f"output.uri={tmp_path / 'out'}", "input.shard_size=1",
         "report.enabled=false", "sam.batch_size=1", *model_overrides(checkpoints), "detector.batch_size=1"],
        stdin=follower, stdout=follower, stderr=follower, close_fds=True, cwd=tmp_path,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is closed once the process has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "labeling:" in screen and "4/4" in screen and "img/s" in screen, screen[-3000:]
    assert "labeling: 100%" in screen
    lines = [line for line in screen.splitlines() if "autolabel: images " in line]
    assert lines and "4/4 (100%)" in lines[-1] and "images/s this attempt" in lines[-1], lines
    assert "4/4" not in lines[0] and "ETA" in lines[0], lines  # it moved before the end, with an ETA


def test_quality_control_off_or_default_changes_no_mask(labeled, ray_local, tmp_path):
    """qa.enabled=false and the defaults (metrics and flags, no clean-up, no de-duplication) give
    the same rows; only the quality columns differ: null when off, filled by default."""
    from pipeline.stages.segment import QUALITY_FIELDS

    out = tmp_path / "qa-off"
    overrides = [o if not o.startswith("output.uri=") else f"output.uri={out}" for o in labeled["cfg_overrides"]]
    manifest = run(load_config(None, [*overrides, "qa.enabled=false", "report.enabled=false"]))
    assert manifest["status"] == "finished" and manifest["qa"]["enabled"] is False
    off = pq.read_table(out / "objects").to_pandas().sort_values(["image_id", "object_id"]).reset_index(drop=True)
    on = labeled["objects"].sort_values(["image_id", "object_id"]).reset_index(drop=True)
    same = [c for c in on.columns if c not in QUALITY_FIELDS]
    assert len(off) == len(on) > 0
    assert off[same].astype(str).equals(on[same].astype(str))
    assert off[list(QUALITY_FIELDS)].isna().all().all()
    assert on["stability"].notna().all() and on["flags"].notna().all()
    images_off = pq.read_table(out / "images").to_pandas().set_index("image_id").sort_index()
    assert (images_off["num_flagged"] == 0).all()
