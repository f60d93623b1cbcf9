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
import shutil
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


# ------------------------------------------------------------------ long videos, in chunks
#
# The join is checked two ways. On the clip's true shape masks (no model: every mask is known),
# where chunks joined must give exactly the rows of the clip tracked as one chunk, and a control
# where the shapes are hidden on the shared frames gives more tracks: the join is what makes one
# track of each object. And end to end on the Ray job with random-weight SAM 2, whose masks are
# blobs that barely depend on the object: there the chunked run must have the unchunked run's
# tracks, frames and masks, every frame once, and survive a killed worker and a resume.

CN = 12  # frames of the clip the join tests cut into chunks


class _Frames:
    """What ``stages.track._rows`` asks of a FrameSource: frames ``start ..`` of the clip."""

    height, width = H, W

    def __init__(self, start: int, n: int):
        self.start, self.n = start, n

    def decoded_index(self, i: int) -> int:
        return self.start + i

    def time_s(self, i: int):
        return None

    def __len__(self) -> int:
        return self.n


def truth_chunk(uri: str, window, ids: dict, hidden=(), detect_every: int = 3):
    """One chunk's rows as the track stage makes them (``stages.track.compact`` then ``_rows``), with the true
    shape masks of the clip as the tracked masks: ``ids`` maps shape -> the chunk's track id;
    on the decoded frames in ``hidden`` the shapes are not there (no mask, no detection)."""
    from pipeline.sam.tracks import box_mask
    from pipeline.sam.video import TrackedMask
    from pipeline.stages.track import VideoRows, _rows, compact, video_row

    start, stop = window
    meta, per_frame = {}, {}
    for shape, track_id in ids.items():
        votes = [{"frame": f, "class_id": shape, "class_name": f"shape{shape}", "score": 0.5 + 0.25 * shape}
                 for f in range(start, stop) if f % detect_every == 0 and f not in hidden]
        meta[track_id] = {"object_key": None, "class_id": shape, "class_name": f"shape{shape}", "source": "detector", "prompt": "box",
                          "det_score": sum(v["score"] for v in votes) / len(votes) if votes else None, "votes": votes}
    for i, frame in enumerate(range(start, stop)):
        per_frame[i] = compact({track_id: TrackedMask(box_mask(shape_boxes(frame, W, H)[shape], H, W) & (frame not in hidden), 0.75)
                                for shape, track_id in ids.items()})
    out = VideoRows(video=video_row(uri, "000000", {"width": W, "height": H, "fps": 10.0, "frames": CN, "duration_s": CN / 10}))
    _rows(out, uri, "000000", _Frames(start, stop - start), range(stop - start), per_frame, meta, 2)
    return out


def commit_truth(root, windows: list, ids: list[dict], hidden=()) -> dict:
    """The chunks written as the track actors write them, then the video's commit; its tables."""
    import fsspec

    from pipeline.run.video_chunks import VideoPlan, write_chunk, write_plan
    from pipeline.run.video_flow import commit_video_shard

    fs, uri = fsspec.filesystem("file"), "file:///clips/clip.mp4"
    info = {"width": W, "height": H, "fps": 10.0, "frames": CN, "duration_s": CN / 10}
    write_plan(fs, str(root), VideoPlan("000000", "v", uri, 1, [list(w) for w in windows], info, CN))
    for k, (window, chunk_ids) in enumerate(zip(windows, ids)):
        rows = truth_chunk(uri, window, chunk_ids, hidden)
        write_chunk(fs, str(root), "000000", k, window, rows.images, rows.objects, rows.tracks, rows.video, [])
    marker = commit_video_shard(fs, str(root), "000000", [], {"match_iou": 0.5, "min_track_frames": 2})
    assert not list((root / "_chunks").iterdir()), "a committed video's chunks are removed"
    tables = {name: pq.read_table(root / name / "shard-000000.parquet") for name in ("images", "objects", "videos", "tracks")}
    return {"marker": marker, "rows": {name: t.to_pylist() for name, t in tables.items()},
            **{name: t.to_pandas() for name, t in tables.items()}}


def test_chunks_joined_equal_the_video_tracked_whole_and_need_the_overlap(tmp_path):
    from pipeline.run.video_chunks import plan_chunks

    windows = plan_chunks(CN, 7, 2, 3)
    assert windows == [[0, 7], [3, 10], [6, 12]]  # starts on keyframes; 4 shared frames (>= 2) each
    # Each chunk numbers its tracks its own way; the commit renumbers them.
    chunked = commit_truth(tmp_path / "chunked", windows, [{0: 1, 1: 2}, {0: 2, 1: 1}, {0: 9, 1: 4}])
    whole = commit_truth(tmp_path / "whole", [[0, CN]], [{0: 1, 1: 2}])
    for name in ("images", "objects", "videos", "tracks"):
        assert chunked["rows"][name] == whole["rows"][name], name
    assert chunked["marker"] == whole["marker"] and chunked["marker"]["images"] == CN
    images, tracks, objects = chunked["images"], chunked["tracks"], chunked["objects"]
    assert sorted(images["frame_index"]) == list(range(CN)), "every frame once: the shared ones from one chunk"
    assert list(tracks["num_frames"]) == [CN, CN] and list(tracks["class_name"]) == ["shape0", "shape1"]
    for row in objects.itertuples():  # the masks are the true ones, under the track of their shape
        frame = int(row.uri.rsplit("=", 1)[1])
        want = np.zeros((H, W), bool)
        x0, y0, x1, y1 = shape_boxes(frame, W, H)[row.track_id - 1]
        want[y0:y1, x0:x1] = True
        assert np.array_equal(mask_codec.decode(dict(row.mask)), want)

    # The control: the shapes are not on the shared frames, so nothing ties a later chunk's
    # tracks to an earlier's. The video tracked whole has one track per shape; in chunks, the
    # middle chunk (whose frames are all shared or hidden) adds nothing, and the last chunk's
    # tracks are new ones.
    hidden = range(3, 10)
    apart = commit_truth(tmp_path / "apart", windows, [{0: 1, 1: 2}, {0: 2, 1: 1}, {0: 9, 1: 4}], hidden)
    one = commit_truth(tmp_path / "one", [[0, CN]], [{0: 1, 1: 2}], hidden)
    assert len(one["tracks"]) == 2 and len(apart["tracks"]) == 4
    assert sorted(apart["images"]["frame_index"]) == list(range(CN))
    assert [(t.first_frame, t.last_frame) for t in apart["tracks"].itertuples()] == [(0, 2), (0, 2), (10, 11), (10, 11)]
    assert apart["videos"]["num_tracks"].iloc[0] == 4


def test_chunk_plans_cover_every_frame_once(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.run.video_chunks import VideoPlan, plan_chunks, unfinished_chunk_files

    for kept, size, overlap, every in ((100, 30, 10, 5), (31, 30, 10, 5), (30, 30, 10, 5), (1000, 64, 8, 1), (17, 7, 2, 3)):
        chunks = plan_chunks(kept, size, overlap, every)
        plan = VideoPlan("000001", "v", "x.mp4", 1, chunks)
        owned = [f for k in range(len(chunks)) for f in range(*plan.owned(k))]
        assert owned == list(range(kept)), (kept, size, chunks)
        assert all(a % every == 0 and b - a <= size for a, b in chunks)
        assert all(chunks[k][1] - chunks[k + 1][0] >= overlap for k in range(len(chunks) - 1))
        assert all(b - a > chunks[k - 1][1] - a for k, (a, b) in enumerate(chunks) if k), "each chunk adds frames"
    assert plan_chunks(500, None, 10, 5) == [[0, 500]]
    with pytest.raises(ConfigError, match="video.chunk_frames=12 must be at least"):
        load_config(None, ["video.chunk_frames=12", "video.chunk_overlap=10", "video.detect_every=5"])
    # What a resume removes from _chunks/: parts of chunks without a marker, files of videos
    # already committed, temporary files; plans and whole chunks of videos still to do stay.
    names = ["shard-000001.plan.json", "shard-000001-c0000.objects.parquet", "shard-000001-c0000.images.parquet",
             "shard-000001-c0000.tracks.parquet", "shard-000001-c0000.json", "shard-000001-c0001.objects.parquet",
             "shard-000002.plan.json", "shard-000002-c0000.json", f".tmp-{'0' * 32}-shard-000001-c0001.json"]
    from pipeline.run.ownership import RUN_FILE_NAMES

    assert all(RUN_FILE_NAMES["_chunks"].fullmatch(n) for n in names), "the run's own names: --overwrite and a resume may delete them"
    assert not RUN_FILE_NAMES["_chunks"].fullmatch("shard-000001-c0000.notes.txt")
    assert sorted(unfinished_chunk_files(names, {"000001"})) == sorted(
        ["shard-000001-c0001.objects.parquet", "shard-000002.plan.json", "shard-000002-c0000.json", f".tmp-{'0' * 32}-shard-000001-c0001.json"])


def test_progress_counts_video_frames_with_their_own_rate_and_an_eta():
    from pipeline.run.progress import Progress
    from pipeline.run.sink import Totals

    progress = Progress(3, 0, Totals(), total_images=4, bar=False, videos=2)
    progress.images_staged(4)
    assert "then 2 videos" in progress.line()
    progress.videos_planned(120, frames_before=20)  # a chunk of 20 frames was committed by an earlier attempt
    progress.rows_staged([{"shard_id": "000001", "image_id": "v:c0001", "shard_rows": 3, "video_frames": 40}])
    line = progress.line()
    assert "images 4/4 (100%)" in line and "frames 60/120 (50%)" in line and "frames/s this attempt" in line and "ETA" in line
    assert progress.as_dict()["frames_done"] == 60 and progress.as_dict()["frames_this_attempt"] == 40


CHUNKED = ["video.chunk_frames=6", "video.chunk_overlap=2"]  # with detect_every=3: chunks [0, 6) and [3, 8) of the clip


@pytest.fixture(scope="module")
def chunk_inputs(tmp_path_factory, inputs):
    """The clip and the broken video of ``inputs`` (no photo: the image pipeline is not needed here)."""
    folder = tmp_path_factory.mktemp("chunk-inputs")
    for name in ("clip.mp4", "broken.mov"):
        shutil.copy(inputs["folder"] / name, folder / name)
    return folder


def chunked_overrides(folder, out, checkpoints) -> list[str]:
    """detector_run's settings, in chunks."""
    return [f"input.uri={folder}", f"output.uri={out}", "sam.device=cpu", "sam.dtype=float32", "report.enabled=false",
            *model_overrides(checkpoints), "detector.conf=0.01", "video.detect_every=3", "video.match_iou=0.05",
            "video.min_track_frames=2", *CHUNKED]


@pytest.fixture(scope="module")
def chunked_run(ray_local, checkpoints, chunk_inputs, tmp_path_factory):
    from pipeline.run.job import run

    out = tmp_path_factory.mktemp("chunked-run") / "out"
    manifest = run(load_config(None, chunked_overrides(chunk_inputs, out, checkpoints)))
    return {"manifest": manifest, "out": out, **_tables(out)}


def _clip_rows(tables: dict, folder) -> dict:
    """The clip's rows, its URIs relative to its folder (two runs read it from two folders)."""
    prefix = f"file://{folder}/"
    out = {}
    for name, key in (("images", "uri"), ("objects", "uri"), ("videos", "uri"), ("tracks", "video_uri")):
        df = tables[name][tables[name][key].str.contains("clip.mp4")].copy()
        for column in ("uri", "video_uri"):
            if column in df:
                df[column] = df[column].str.replace(prefix, "", regex=False)
        out[name] = df.drop(columns=["shard_id"], errors="ignore").reset_index(drop=True)
    return out


@pytest.mark.filterwarnings("ignore:cannot import name '_C':UserWarning")
def test_a_chunked_run_has_the_tracks_of_the_unchunked_run(chunked_run, detector_run, inputs, chunk_inputs):
    """The clip in two chunks sharing three frames, against detector_run (the same settings, the
    clip whole): the same tracks (ids up to renumbering), on the same frames, with the same masks;
    every frame once. The broken video, which cannot be planned, still gets its error row."""
    manifest = chunked_run["manifest"]
    assert manifest["status"] == "finished", manifest.get("error")
    chunked, whole = _clip_rows(chunked_run, chunk_inputs), _clip_rows(detector_run, inputs["folder"])
    assert sorted(chunked["images"]["frame_index"]) == list(range(N)) and chunked["images"]["uri"].is_unique
    assert len(chunked["tracks"]) == len(whole["tracks"]) > 0
    assert chunked["videos"]["num_tracks"].iloc[0] == whole["videos"]["num_tracks"].iloc[0]
    assert (chunked["videos"]["frames_processed"].iloc[0], chunked["videos"]["status"].iloc[0]) == (N, "ok")
    masks = {which: {(r.track_id, r.uri): mask_codec.decode(dict(r.mask)) for r in rows["objects"].itertuples()}
             for which, rows in (("chunked", chunked), ("whole", whole))}
    frames = [f"clip.mp4#frame={i}" for i in range(N)]
    empty = np.zeros((H, W), bool)

    def agreement(t: int, u: int) -> list[float]:
        return [mask_codec.iou(masks["chunked"].get((t, f), empty), masks["whole"].get((u, f), empty)) for f in frames]

    whole_tracks = whole["tracks"].set_index("track_id")
    paired = set()
    for track in chunked["tracks"].itertuples():
        u = max((u for u in whole_tracks.index if u not in paired), key=lambda u: min(agreement(track.track_id, u)))
        paired.add(u)
        assert min(agreement(track.track_id, u)) >= 0.9, (track.track_id, u, agreement(track.track_id, u))
        assert (track.first_frame, track.last_frame, track.num_frames) == tuple(whole_tracks.loc[u, ["first_frame", "last_frame", "num_frames"]])
    assert (chunked["images"]["num_objects"].sum(), len(chunked["objects"])) == (whole["images"]["num_objects"].sum(), len(whole["objects"]))
    videos = chunked_run["videos"].set_index("uri")
    broken = next(u for u in videos.index if u.endswith("broken.mov"))
    assert (videos.loc[broken, "status"], videos.loc[broken, "error_class"]) == ("error", "decode_error")
    # progress counted the clip's frames; the chunks' files are gone once the videos are committed
    assert (manifest["progress"]["frames_total"], manifest["progress"]["frames_done"]) == (N, N)
    assert not (chunked_run["out"] / "_chunks").exists() and not (chunked_run["out"] / "_staging").exists()
    assert manifest["timings"]["stages"]["track"]["seconds"] > 0


TRACKER_TITLE = "ray::MapWorker(MapBatches(Tracker))"


def _tracker_pids() -> set:
    import os
    from pathlib import Path

    from session_processes import SESSION_ENV, started_by

    pids = set()
    for pid in started_by(os.environ[SESSION_ENV]):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").startswith(TRACKER_TITLE):
                pids.add(pid)
        except OSError:
            pass
    return pids


def _wait_for(condition, timeout: float, what: str):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _first_chunk_of_clip_done(out) -> bool:
    for plan in (out / "_chunks").glob("shard-*.plan.json") if (out / "_chunks").is_dir() else ():
        found = json.loads(plan.read_text())
        if found["uri"].endswith("clip.mp4") and (out / "_chunks" / f"shard-{found['shard_id']}-c0000.json").exists():
            return True
    return False


@pytest.mark.filterwarnings("ignore:cannot import name '_C':UserWarning")
def test_a_track_worker_killed_mid_video_then_a_resume_gives_the_uninterrupted_output(ray_local, checkpoints, chunk_inputs,
                                                                                       chunked_run, tmp_path):
    """The run of chunked_run, as `autolabel run`: the test-only fault injection SIGKILLs the
    track worker whenever it reaches frame 7 of the clip, in its second chunk (Ray restarts it
    and it dies again); once it has died at least once, the driver is killed too. The same
    command then resumes: the clip's first chunk, committed before the kill, is kept (its frames
    count as done before this attempt), the second is tracked, the video joined; the output is
    the uninterrupted run's, row for row, mask for mask."""
    import os
    import signal
    import subprocess
    import time

    from conftest import autolabel_cli
    from pipeline.run.job import run
    from session_processes import alive

    out = tmp_path / "out"
    overrides = [*chunked_overrides(chunk_inputs, out, checkpoints), "ray.max_image_crashes=1000"]
    env = {**os.environ, "AUTOLABEL_TEST_FAULTS": json.dumps({"kill": {"track": "clip.mp4#frame=7"}})}
    first = subprocess.Popen([*autolabel_cli(), "run", *overrides], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        _wait_for(lambda: _first_chunk_of_clip_done(out), 300, "the clip's first chunk to be committed")
        pid = next(iter(_wait_for(_tracker_pids, 120, "the track actor")))
        _wait_for(lambda: not alive(pid), 180, "the track worker to die on frame 7")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        time.sleep(2)
        try:
            os.killpg(first.pid, signal.SIGKILL)  # Ray's processes the driver's death left behind
        except ProcessLookupError:
            pass
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert not list((out / "_chunks").glob("shard-*-c0001.json")), "the second chunk never finished"

    resumed = run(load_config(None, overrides))
    assert resumed["status"] == "finished", resumed.get("error")
    assert len(resumed["attempts"]) == 2
    progress = resumed["progress"]
    assert (progress["frames_total"], progress["frames_done"], progress["frames_this_attempt"]) == (N, N, N - 6), progress
    for name in ("images", "objects", "videos", "tracks"):
        assert pq.read_table(out / name).to_pylist() == pq.read_table(chunked_run["out"] / name).to_pylist(), name
    assert len(chunked_run["objects"]) > 0
