"""Video wired into the Ray job (issue 19 phase 2): one run over a folder with a clip, a photo and
a broken video (detector-driven tracking), and one over a prompt manifest (prompted tracking),
both on the local Ray with random weights at image size 256.

The prompted run's masks are checked against sam2's own ``SAM2VideoPredictor`` used as its
tutorial does, on a folder of the clip's exact frames (PNG data under ``.jpg`` names, see
tests/test_video.py), never through our code: IoU >= 0.99 on every frame.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SAM_IMAGE_SIZE, model_overrides
from pipeline.config import load_config
from pipeline.sam import masks as mask_codec
from video_clips import clip_frames, shape_boxes, write_clip

W, H, N = 128, 96, 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photo_folder):
    from PIL import Image

    folder = tmp_path_factory.mktemp("videos")
    frames = clip_frames(N, W, H)
    write_clip(folder / "clip.mp4", frames)
    (folder / "broken.mov").write_bytes(b"not a video at all " * 40)
    Image.open(photo_folder / "bus.jpg").reduce(4).save(folder / "bus.jpg", quality=92)
    return {"folder": folder, "frames": frames}


def _tables(out):
    return {name: pq.read_table(out / name).to_pandas() for name in ("images", "objects", "videos", "tracks")}


@pytest.fixture(scope="module")
def detector_run(ray_local, checkpoints, inputs, tmp_path_factory):
    from pipeline.run.job import run

    out = tmp_path_factory.mktemp("video-run") / "out"
    cfg = load_config(None, [f"input.uri={inputs['folder']}", f"output.uri={out}", "sam.device=cpu", "sam.dtype=float32",
                             "report.gallery=4", *model_overrides(checkpoints), "detector.conf=0.01",
                             "video.detect_every=3", "video.match_iou=0.05", "video.min_track_frames=2"])
    return {"manifest": run(cfg), "cfg": cfg, "out": out, **_tables(out)}


def test_videos_and_images_in_one_run(detector_run, inputs):
    manifest, images, objects, videos, tracks = (detector_run[k] for k in ("manifest", "images", "objects", "videos", "tracks"))
    assert manifest["status"] == "finished", manifest.get("error")
    assert manifest["input"]["num_videos"] == 2 and manifest["input"]["num_images"] == 1
    videos = videos.set_index("uri")
    clip = next(u for u in videos.index if u.endswith("clip.mp4"))
    broken = next(u for u in videos.index if u.endswith("broken.mov"))
    assert videos.loc[broken, "status"] == "error" and videos.loc[broken, "error_class"] == "decode_error"
    assert videos.loc[clip, "status"] == "ok" and pd.isna(videos.loc[clip, "error_class"])
    assert (videos.loc[clip, "width"], videos.loc[clip, "height"], videos.loc[clip, "frames"]) == (W, H, N)
    assert videos.loc[clip, "frames_processed"] == N and videos.loc[clip, "fps"] == pytest.approx(10)
    # one images row per frame (uri VIDEO#frame=N), the photo as before, nothing for the broken video
    frames = images[images["video_uri"].notna()].sort_values("frame_index")
    assert list(frames["uri"]) == [f"{clip}#frame={i}" for i in range(N)] and list(frames["frame_index"]) == list(range(N))
    assert frames["time_s"].tolist() == pytest.approx([i / 10 for i in range(N)])
    still = images[images["video_uri"].isna()]
    assert len(still) == 1 and still["uri"].iloc[0].endswith("bus.jpg") and still["status"].iloc[0] == "ok"
    assert len(images) == N + 1 and manifest["totals"]["images"] == N + 1
    # objects: track ids on frames, null on the photo
    on_frames = objects[objects["uri"].isin(frames["uri"])]
    assert len(on_frames) and on_frames["track_id"].notna().all() and (on_frames["source"] == "detector").all()
    assert objects[objects["uri"] == still["uri"].iloc[0]]["track_id"].isna().all()
    assert len(objects[objects["uri"] == still["uri"].iloc[0]]), "the photo's detections are segmented as before"
    for _, frame in frames.iterrows():
        assert frame["num_objects"] == (on_frames["uri"] == frame["uri"]).sum()
    # tracks agree with the objects rows; unique counts are the long-enough tracks per class
    assert (tracks["video_uri"] == clip).all() and tracks["track_id"].is_unique
    assert videos.loc[clip, "num_tracks"] == len(tracks) > 0
    for _, track in tracks.iterrows():
        mine = on_frames[on_frames["track_id"] == track["track_id"]]
        assert track["num_frames"] == len(mine)
        assert (track["first_frame"], track["last_frame"]) == (frames.set_index("uri").loc[mine["uri"], "frame_index"].min(),
                                                               frames.set_index("uri").loc[mine["uri"], "frame_index"].max())
        assert (mine["class_name"] == track["class_name"]).all() and track["source"] == "detector"
        assert track["mean_mask_score"] == pytest.approx(mine["mask_score"].mean(), rel=1e-5)
        assert 0 < track["mean_det_score"] <= 1
    want = Counter(tracks[tracks["num_frames"] >= 2]["class_name"])
    got = {c["class_name"]: c["count"] for c in videos.loc[clip, "class_counts"]}
    assert got == dict(want)
    # the report ran over the frames too: outputs read a frame's pixels from its video
    from pipeline.outputs.rundata import read_rgb

    assert manifest.get("report_uri")
    assert np.array_equal(np.asarray(read_rgb(f"{clip}#frame=3")), inputs["frames"][3])


def test_overwrite_redoes_a_video_run(detector_run):
    """--overwrite owns videos/ and tracks/ (run/ownership.py) and a redone run writes them anew;
    the same command without it finds the run finished."""
    from pipeline.run.job import run

    cfg, out = detector_run["cfg"], detector_run["out"]
    again = run(cfg)
    assert again["status"] == "finished" and "nothing was redone" in again["note"]
    (out / "videos" / "stale.txt").write_text("not the run's")
    with pytest.raises(Exception, match="stale.txt"):
        run(cfg, overwrite=True)
    (out / "videos" / "stale.txt").unlink()
    redone = run(cfg, overwrite=True)
    assert redone["status"] == "finished", redone.get("error")
    assert redone["run_id"] != detector_run["manifest"]["run_id"]
    tables = _tables(out)
    assert len(tables["videos"]) == 2 and tables["tracks"].equals(detector_run["tracks"])


# ---------------------------------------------------------------------------------- prompted


def sam2_masks(checkpoint: str, folder, prompts: list[dict]) -> dict:
    """sam2's tutorial loop on a folder of frames: {frame: {obj_id: bool mask}}."""
    from sam2.build_sam import build_sam2_video_predictor

    predictor = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", checkpoint, device="cpu",
                                           hydra_overrides_extra=[f"++model.image_size={SAM_IMAGE_SIZE}"])
    state = predictor.init_state(str(folder))
    for obj_id, p in enumerate(prompts, start=1):
        labels = None if "points" not in p else p.get("point_labels", [1] * len(p["points"]))
        predictor.add_new_points_or_box(state, p["frame"], obj_id, points=p.get("points"), labels=labels, box=p.get("box"))
    masks = {}
    for frame, ids, logits in itertools.chain(predictor.propagate_in_video(state)):
        masks.setdefault(frame, {obj: (logits[i, 0] > 0.0).numpy() for i, obj in enumerate(ids)})
    return masks


@pytest.mark.filterwarnings("ignore:cannot import name '_C':UserWarning")  # sam2 without its extension, per frame
def test_prompted_masks_equal_sam2s_own(ray_local, checkpoints, inputs, tmp_path):
    from PIL import Image

    from pipeline.run.job import run

    clip = inputs["folder"] / "clip.mp4"
    prompts = [{"object_key": "red", "label": "red", "frame": 0, "box": shape_boxes(0, W, H)[0]},
               {"object_key": "green", "frame": 0, "points": [[int(sum(shape_boxes(0, W, H)[1][0::2]) / 2),
                                                             int(sum(shape_boxes(0, W, H)[1][1::2]) / 2)]],
                "point_labels": [1]}]
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"uri": str(clip), "objects": prompts},
        {"uri": str(inputs["folder"] / "bus.jpg"), "objects": [{"box": [10, 10, 60, 60], "label": "red"}]},
    ]) + "\n")
    out = tmp_path / "out"
    cfg = load_config(None, [f"input.uri={inputs['folder']}", f"output.uri={out}", "prompts.source=manifest",
                             f"prompts.manifest={manifest}", "sam.device=cpu", "sam.dtype=float32", "report.enabled=false",
                             f"sam.checkpoint={checkpoints['sam']}", f"sam.image_size={SAM_IMAGE_SIZE}"])
    result = run(cfg)
    assert result["status"] == "finished", result.get("error")
    tables = _tables(out)
    objects, tracks, videos = tables["objects"], tables["tracks"], tables["videos"]
    assert len(videos) == 1 and videos["status"].iloc[0] == "ok"
    assert sorted(tracks["object_key"]) == ["green", "red"] and set(tracks["source"]) == {"manifest"}
    assert tracks.set_index("object_key").loc["red", "class_name"] == "red"
    assert objects[objects["uri"].str.endswith("bus.jpg")]["track_id"].isna().all()

    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, rgb in enumerate(inputs["frames"]):
        Image.fromarray(rgb).save(frames_dir / f"{i:05d}.jpg", format="PNG")  # exact pixels through sam2's own loader
    with torch.inference_mode():
        theirs = sam2_masks(str(checkpoints["sam"]), frames_dir, prompts)
    ids = dict(zip(tracks["object_key"], tracks["track_id"]))
    clip = videos["uri"].iloc[0]  # as listed: file://...
    compared = 0
    assert len(objects[objects["uri"].str.startswith(f"{clip}#frame=")]) > 0
    for frame in range(N):
        for obj_id, key in ((1, "red"), (2, "green")):
            want = theirs[frame][obj_id]
            rows = objects[(objects["uri"] == f"{clip}#frame={frame}") & (objects["track_id"] == ids[key])]
            mine = mask_codec.decode(dict(rows["mask"].iloc[0])) if len(rows) else np.zeros_like(want)
            union = (mine | want).sum()
            assert (float((mine & want).sum() / union) if union else 1.0) >= 0.99, (frame, key)
            compared += bool(want.any())
    assert compared >= N, "most masks should be non-empty for the comparison to mean something"
