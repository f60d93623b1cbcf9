"""The outputs of video runs (issue 19, part 3): the counting line's crossings, the video exports
(YouTube-VIS, MOT, Label Studio video), per-frame COCO, and the report's video section.

One detector-driven Ray run over a clip (every other frame kept) and a photo is shared by every
test that needs a run (random weights at image size 256). Each output is checked against an
independent reference: the crossings against ultralytics' own ``ObjectCounter.count_objects``
(its geometry through matplotlib, as shapely is not installed), YouTube-VIS masks through
pycocotools, MOT lines by a plain parse against the objects table, Label Studio video regions
against Label Studio's converter (``label_studio_converter.imports.pathtrack``, which turns MOT
boxes into ``videorectangle`` regions).
"""
from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from conftest import model_overrides
from pipeline.config import load_config
from video_clips import clip_frames, write_clip

W, H, N, STRIDE = 128, 96, 16, 2
# Not axis-aligned and with fractional ends, so no box centre (a multiple of 0.5) lies on it.
COUNT_LINE = [0.5, 30.25, 127.5, 33.75]


# ------------------------------------------------------------------------------ the reference counter


class _Segment:
    """shapely's ``LineString`` as far as ``ObjectCounter.count_objects`` uses it (``intersects``),
    on matplotlib's segment intersection (shapely is not installed)."""

    def __init__(self, points):
        self.points = [tuple(float(v) for v in p) for p in points]

    def intersects(self, other) -> bool:
        from matplotlib.path import Path

        return Path(self.points).intersects_path(Path(other.points), filled=False)


def ultralytics_counts(frames: dict, line, names: dict) -> dict:
    """{class name: {"IN": n, "OUT": n}} from ultralytics' ObjectCounter fed as its ``process`` feeds it:
    frame by frame, each track's box into its history (``store_tracking_history``), then
    ``count_objects(centre, id, previous centre, class)``. ``frames``: {frame: {track id: (box, class)}}."""
    import torch
    from ultralytics.solutions.object_counter import ObjectCounter

    counter = object.__new__(ObjectCounter)  # its counting alone: no model, no video, no window
    counter.region = [(line[0], line[1]), (line[2], line[3])]
    counter.LineString = _Segment
    counter.r_s = _Segment(counter.region)
    counter.names = names
    counter.counted_ids, counter.in_count, counter.out_count = set(), 0, 0
    counter.classwise_count = defaultdict(lambda: {"IN": 0, "OUT": 0})
    counter.track_history = defaultdict(list)
    for frame in sorted(frames):
        for track_id, (box, cls) in sorted(frames[frame].items()):
            counter.store_tracking_history(track_id, torch.tensor([float(v) for v in box]))
            history = counter.track_history[track_id]
            counter.count_objects(history[-1], track_id, history[-2] if len(history) > 1 else None, cls)
    return {name: dict(c) for name, c in counter.classwise_count.items() if c["IN"] or c["OUT"]}


def ours(frames: dict, line, names: dict) -> dict:
    """The same counts from pipeline/sam/crossings.py, in the reference's shape."""
    from pipeline.sam.crossings import box_centre, crossings

    paths, classes = defaultdict(list), {}
    for frame, tracks in frames.items():
        for track_id, (box, cls) in tracks.items():
            paths[track_id].append((frame, box_centre(box)))
            classes[track_id] = cls
    out = defaultdict(lambda: {"IN": 0, "OUT": 0})
    for track_id, way in crossings(dict(paths), line).items():
        out[names[classes[track_id]]][way.upper()] += 1
    return {k: dict(v) for k, v in out.items()}


def _frames_of(paths: dict) -> dict:
    """{track: (class, [(frame, (cx, cy)), ...])} -> {frame: {track: (10x10 box around the centre, class)}}."""
    frames = defaultdict(dict)
    for track_id, (cls, steps) in paths.items():
        for frame, (x, y) in steps:
            frames[frame][track_id] = ([x - 5, y - 5, x + 5, y + 5], cls)
    return frames


def test_crossings_count_as_ultralytics_object_counter_does():
    names = {0: "car", 1: "person"}
    vertical = [50, 0, 50, 100]

    def walk(xs, y=50.0, start=0):
        return [(start + i, (float(x), y)) for i, x in enumerate(xs)]

    paths = {
        1: (0, walk([30, 40, 55, 65])),  # crosses moving right: in
        2: (1, walk([70, 60, 45, 35])),  # moving left: out
        3: (1, walk([30, 40, 55, 65], y=150.0)),  # control: crosses the infinite line below the segment's end
        4: (1, [(i, (20.0, 10.0 + 20 * i)) for i in range(5)]),  # control: parallel to it, never crosses
        5: (0, walk([40, 60, 40, 60])),  # crosses back and forth: counted once, at the first crossing
        6: (1, walk([40, 50, 60])),  # lands exactly on the line: touching counts
        7: (0, walk([40, 45], start=0) + walk([55, 60], start=5)),  # not seen on frames 2-4: the jump across counts
    }
    frames = _frames_of(paths)
    want = ultralytics_counts(frames, vertical, names)
    assert want == {"car": {"IN": 3, "OUT": 0}, "person": {"IN": 1, "OUT": 1}}  # the reference itself, by hand
    assert ours(frames, vertical, names) == want
    # A line more horizontal than vertical: moving down is in; the controls still never count.
    flat = [0, 40, 100, 60]
    down = {8: (0, [(i, (50.0, 20.0 + 15 * i)) for i in range(5)]), 9: (1, [(i, (30.0, 90.0 - 15 * i)) for i in range(5)]),
            10: (1, [(i, (150.0, 20.0 + 15 * i)) for i in range(5)])}
    frames = _frames_of(down)
    assert ultralytics_counts(frames, flat, names) == ours(frames, flat, names) == {"car": {"IN": 1, "OUT": 0}, "person": {"IN": 0, "OUT": 1}}


def test_crossings_of_random_walks_equal_the_references():
    rng = np.random.default_rng(7)
    names = {0: "car", 1: "person", 2: "dog"}
    checked = 0
    for _ in range(20):
        line = list(rng.uniform(0, 200, 4))
        paths = {}
        for track_id in range(1, 16):
            start, n = int(rng.integers(0, 10)), int(rng.integers(2, 25))
            xy = rng.uniform(0, 200, 2) + np.cumsum(rng.normal(0, 12, (n, 2)), axis=0)
            frames = sorted(rng.choice(np.arange(start, start + 3 * n), n, replace=False))  # with gaps
            paths[track_id] = (int(rng.integers(0, 3)), [(int(f), (float(x), float(y))) for f, (x, y) in zip(frames, xy)])
        frames = _frames_of(paths)
        want = ultralytics_counts(frames, line, names)
        assert ours(frames, line, names) == want
        checked += sum(c["IN"] + c["OUT"] for c in want.values())
    assert checked > 20, "the walks should cross the lines often enough to mean something"


# ------------------------------------------------------------------------------ the commit, without Ray


def _chunked_video(fs, root: str, shard_id: str, uri: str, tracks: dict, classes: dict) -> None:
    """A video's one chunk as the track stage writes it (run/video_chunks.py: its plan, its chunk's files), from
    ``tracks``: {track id: [(frame, centre x), ...]} (boxes 10x10 around (x, 40))."""
    from pipeline.io.listing import image_id_for
    from pipeline.run.video_chunks import VideoPlan, write_chunk, write_plan

    frames = sorted({f for steps in tracks.values() for f, _ in steps})
    objects, images = [], []
    for frame in frames:
        furi = f"{uri}#frame={frame}"
        here = [(t, x) for t, steps in sorted(tracks.items()) for f, x in steps if f == frame]
        for k, (track_id, x) in enumerate(here):
            cid, cname = classes[track_id]
            objects.append({"image_id": image_id_for(furi), "uri": furi, "object_id": k, "status": "ok", "candidate": 0, "source": "detector",
                            "class_id": cid, "class_name": cname, "box": [x - 5.0, 35.0, x + 5.0, 45.0], "area": 100, "track_id": track_id})
        images.append({"image_id": image_id_for(furi), "uri": furi, "width": W, "height": H, "status": "ok", "num_objects": len(here),
                       "class_counts": [], "num_prompt_errors": 0, "num_flagged": 0, "shard_id": shard_id, "video_uri": uri,
                       "frame_index": frame, "time_s": frame / 10})
    track_rows = [{"video_uri": uri, "track_id": t, "class_id": classes[t][0], "class_name": classes[t][1], "first_frame": steps[0][0],
                   "last_frame": steps[-1][0], "num_frames": len(steps), "source": "detector", "shard_id": shard_id}
                  for t, steps in sorted(tracks.items())]
    video = {"uri": uri, "status": "ok", "width": W, "height": H, "frames": max(frames) + 1, "frames_processed": len(frames),
             "num_tracks": len(tracks), "class_counts": [], "shard_id": shard_id}
    plan = VideoPlan(shard_id, image_id_for(uri), uri, 1, [[0, max(frames) + 1]], {"width": W, "height": H, "fps": 10.0,
                     "frames": max(frames) + 1, "duration_s": None}, max(frames) + 1)
    write_plan(fs, root, plan)
    write_chunk(fs, root, shard_id, 0, (0, max(frames) + 1), images, objects, track_rows, video, [])


@pytest.mark.parametrize("line", [[64, 0, 64, 96], None])
def test_the_commit_writes_the_line_counts_per_class(tmp_path, line):
    """commit_video_shard fills videos.line_in/line_out from the chunk's rows and the run's line; a
    track too short to be a unique object does not count; without a line both stay null."""
    from fsspec.core import url_to_fs

    from pipeline.run.video_flow import commit_video_shard

    fs, root = url_to_fs(str(tmp_path))
    tracks = {1: [(0, 40), (1, 50), (2, 60), (3, 70)],  # car: in (moving right)
              2: [(0, 90), (1, 80), (3, 60), (4, 50)],  # person: out, across a frame it was not seen on
              3: [(1, 55), (2, 70)],  # car: in, but 2 frames: not a unique object, not counted
              4: [(0, 10), (1, 20), (2, 30), (3, 40)],  # dog: never reaches the line
              5: [(2, 70), (3, 80), (4, 60), (5, 70)]}  # car: starts past the line, crosses left (out), then back: counted once
    classes = {1: (2, "car"), 2: (0, "person"), 3: (2, "car"), 4: (16, "dog"), 5: (2, "car")}
    _chunked_video(fs, root, "000000", "file:///v/clip.mp4", tracks, classes)
    marker = commit_video_shard(fs, root, "000000", [], {"count_line": line, "min_track_frames": 3, "match_iou": 0.5})
    assert marker["images"] == 6
    row = pq.read_table(tmp_path / "videos").to_pylist()[0]
    if line is None:
        assert row["line_in"] is None and row["line_out"] is None
        return
    assert row["line_in"] == [{"class_id": 2, "class_name": "car", "count": 1}]
    assert row["line_out"] == [{"class_id": 0, "class_name": "person", "count": 1}, {"class_id": 2, "class_name": "car", "count": 1}]


# ------------------------------------------------------------------------------ one Ray run


@pytest.fixture(scope="module")
def video_run(ray_local, checkpoints, photo_folder, tmp_path_factory):
    from PIL import Image

    from pipeline.run.job import run

    folder = tmp_path_factory.mktemp("video-outputs")
    write_clip(folder / "clip.mp4", clip_frames(N, W, H))
    Image.open(photo_folder / "bus.jpg").reduce(4).save(folder / "bus.jpg", quality=92)
    out = tmp_path_factory.mktemp("video-outputs-run") / "out"
    cfg = load_config(None, [f"input.uri={folder}", f"output.uri={out}", "sam.device=cpu", "sam.dtype=float32", "report.enabled=false",
                             *model_overrides(checkpoints), "detector.conf=0.01", f"video.stride={STRIDE}", "video.detect_every=2",
                             "video.match_iou=0.05", "video.min_track_frames=2", f"video.count_line={json.dumps(COUNT_LINE)}"])
    manifest = run(cfg)
    assert manifest["status"] == "finished", manifest.get("error")
    tables = {name: pq.read_table(out / name).to_pandas() for name in ("images", "objects", "videos", "tracks")}
    clip = tables["videos"]["uri"].iloc[0]
    frames = tables["images"][tables["images"]["video_uri"] == clip].sort_values("frame_index")
    objects = tables["objects"]
    on_frames = objects[objects["uri"].isin(frames["uri"]) & (objects["status"] == "ok") & (objects["candidate"] == 0)].copy()
    on_frames["frame_index"] = on_frames["uri"].map(dict(zip(frames["uri"], frames["frame_index"]))).astype(int)
    assert len(on_frames) and on_frames["track_id"].notna().all()
    on_frames["track_id"] = on_frames["track_id"].astype(int)  # a float column in pandas: the photo's rows are null
    return {"out": out, "folder": folder, "clip": clip, "frames": frames, "on_frames": on_frames, **tables}


def _mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]})


def _export(run, fmt: str, tmp_path, **kwargs):
    from pipeline.outputs.export import export

    return export(str(run["out"]), fmt, str(tmp_path / fmt), progress=False, **kwargs)


def test_the_run_counts_line_crossings_as_ultralytics_does(video_run):
    videos, tracks, on_frames = video_run["videos"], video_run["tracks"], video_run["on_frames"]
    assert list(videos["frames_processed"]) == [N // STRIDE]
    counted = tracks[tracks["num_frames"] >= 2]
    names = dict(zip(counted["class_id"], counted["class_name"]))
    frames: dict = defaultdict(dict)
    for row in on_frames[on_frames["track_id"].isin(counted["track_id"])].itertuples():
        frames[row.frame_index][int(row.track_id)] = (list(row.box), int(counted.set_index("track_id").loc[row.track_id, "class_id"]))
    want = ultralytics_counts(frames, COUNT_LINE, names)
    row = videos.iloc[0]
    got = {way: {c["class_name"]: c["count"] for c in row[f"line_{way.lower()}"]} for way in ("IN", "OUT")}
    for name in set(names.values()):
        assert got["IN"].get(name, 0) == want.get(name, {}).get("IN", 0) and got["OUT"].get(name, 0) == want.get(name, {}).get("OUT", 0)
    assert row["line_in"] is not None and row["line_out"] is not None  # the line was set: lists, empty when nothing crossed


def test_ytvis_export_holds_every_tracked_mask(video_run, tmp_path):
    result = _export(video_run, "ytvis", tmp_path)
    data = json.loads((tmp_path / "ytvis" / "instances.json").read_text())
    frames, on_frames, tracks = video_run["frames"], video_run["on_frames"], video_run["tracks"]
    assert [v["uri"] for v in data["videos"]] == [video_run["clip"]]
    video = data["videos"][0]
    assert (video["width"], video["height"], video["length"]) == (W, H, N // STRIDE)
    assert video["file_names"] == list(frames["uri"]) and video["frame_indices"] == list(range(0, N, STRIDE))
    assert any("1 still images left out" in note for note in result.notes), result.notes
    cats = {c["id"]: c["name"] for c in data["categories"]}
    assert sorted(a["track_id"] for a in data["annotations"]) == sorted(on_frames["track_id"].unique())
    compared = 0
    for ann in data["annotations"]:
        assert ann["video_id"] == video["id"] and len(ann["segmentations"]) == len(ann["bboxes"]) == len(ann["areas"]) == N // STRIDE
        track = tracks.set_index("track_id").loc[ann["track_id"]]
        assert cats[ann["category_id"]] == track["class_name"]
        mine = on_frames[on_frames["track_id"] == ann["track_id"]].set_index("frame_index")
        for i, frame in enumerate(video["frame_indices"]):
            if frame not in mine.index:
                assert ann["segmentations"][i] is None and ann["bboxes"][i] is None and ann["areas"][i] is None
                continue
            rle = ann["segmentations"][i]
            expected = _mask(mine.loc[frame, "mask"])
            assert np.array_equal(_mask(rle), expected)
            coco = {"size": rle["size"], "counts": rle["counts"].encode()}
            assert ann["bboxes"][i] == pytest.approx(list(mask_utils.toBbox(coco)))
            assert ann["areas"][i] == int(mask_utils.area(coco)) == int(expected.sum())
            compared += 1
    assert compared == len(on_frames) == result.objects


def test_mot_export_lines_are_the_tracked_boxes(video_run, tmp_path):
    _export(video_run, "mot", tmp_path)
    folder = tmp_path / "mot"
    sequences = json.loads((folder / "sequences.json").read_text())["sequences"]
    assert len(sequences) == 1 and sequences[0]["uri"] == video_run["clip"]
    seq = sequences[0]
    lines = [line.split(",") for line in (folder / f"{seq['name']}.txt").read_text().splitlines()]
    on_frames = video_run["on_frames"].set_index(["frame_index", "track_id"])
    assert len(lines) == len(on_frames)
    for frame, track_id, x, y, w, h, conf, *rest in lines:
        assert rest == ["-1", "-1", "-1"]
        row = on_frames.loc[(int(frame) - 1, int(track_id))]  # MOT frames are 1-based, decoded-frame numbers
        bbox = mask_utils.toBbox({"size": list(row["mask"]["size"]), "counts": row["mask"]["counts"].encode()})
        assert [float(v) for v in (x, y, w, h)] == pytest.approx(list(bbox))
        assert float(conf) == pytest.approx(row["mask_score"], abs=1e-6)
    tracks = video_run["tracks"].set_index("track_id")
    assert {int(t): c["class_name"] for t, c in seq["tracks"].items()} == {t: tracks.loc[t, "class_name"] for t in on_frames.index.unique(1)}
    assert (seq["width"], seq["height"], seq["frames"], seq["fps"]) == (W, H, N, pytest.approx(10))


def test_labelstudio_video_tasks_are_label_studios_own_regions(video_run, tmp_path):
    """The regions equal those Label Studio's converter makes from the same boxes in MOT form
    (label_studio_converter.imports.pathtrack), and the labeling config is Label Studio's video
    tracking template with the run's classes."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from label_studio_converter.imports import pathtrack  # it sets the root logger to DEBUG on stdout at import

    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)

    result = _export(video_run, "labelstudio-video", tmp_path)
    assert any("no video masks" in note for note in result.notes)
    tasks = json.loads((tmp_path / "labelstudio-video" / "tasks.json").read_text())
    assert len(tasks) == 1 and tasks[0]["data"]["video"] == "/data/local-files/?d=clip.mp4"
    regions = tasks[0]["predictions"][0]["result"]
    config = ET.fromstring((tmp_path / "labelstudio-video" / "labeling-config.xml").read_text())
    video_tag, rect, labels = config.find("Video"), config.find("VideoRectangle"), config.find("Labels")
    assert video_tag.get("value") == "$video" and float(video_tag.get("framerate")) == pytest.approx(10)
    assert rect.get("toName") == labels.get("toName") == video_tag.get("name")
    assert {r["from_name"] for r in regions} == {rect.get("name")} and {r["to_name"] for r in regions} == {video_tag.get("name")}
    assert {r["value"]["labels"][0] for r in regions} <= {label.get("value") for label in labels}

    # Label Studio's converter on the same boxes, written as its PathTrack ground truth (frame id x y w h).
    on_frames = video_run["on_frames"].sort_values(["frame_index", "track_id"])
    gt = tmp_path / "gt.txt"
    gt.write_text("".join(f"{f + 1} {int(t)} {int(b[0])} {int(b[1])} {int(b[2] - b[0])} {int(b[3] - b[1])}\n"
                          for f, t, b in zip(on_frames["frame_index"], on_frames["track_id"], on_frames["box"])))
    info = SimpleNamespace(fps=10.0, original_width=W, original_height=H, frame_count=N)
    original = pathtrack.get_info
    pathtrack.get_info = lambda path: info
    try:
        theirs = pathtrack.convert_shot("clip.mp4", str(gt), "info.xml")["annotations"][0]["result"]
    finally:
        pathtrack.get_info = original
    first_seen = list(dict.fromkeys(on_frames["track_id"].astype(int)))
    assert len(theirs) == len(regions) == len(first_seen)
    kept = list(range(0, N, STRIDE))
    for region in regions:
        track_id = int(region["id"][1:])
        reference = theirs[first_seen.index(track_id)]
        assert region["type"] == reference["type"] == "videorectangle"
        assert region["value"]["framesCount"] == reference["value"]["framesCount"] == N
        mine, ref = region["value"]["sequence"], reference["value"]["sequence"]
        assert len(mine) == len(ref)
        seen = {k["frame"] for k in mine}
        for a, b in zip(mine, ref):
            for key in ("frame", "rotation", "x", "y", "width", "height", "time"):
                assert a[key] == pytest.approx(b[key]), (track_id, key)
            # Label Studio's converter enables every keyframe but the last; a track missing on the next kept frame
            # is also disabled, so its box is not drawn over the gap.
            nxt = kept.index(a["frame"] - 1) + 1
            assert a["enabled"] == (nxt < len(kept) and kept[nxt] + 1 in seen)
            assert a["enabled"] == b["enabled"] or (not a["enabled"] and a is not mine[-1])


def test_labelstudio_image_tasks_leave_the_frames_out(video_run, tmp_path):
    result = _export(video_run, "labelstudio", tmp_path)
    tasks = json.loads((tmp_path / "labelstudio" / "tasks.json").read_text())
    assert [t["data"]["autolabel"]["uri"].rsplit("/", 1)[-1] for t in tasks] == ["bus.jpg"]
    assert any(f"{N // STRIDE} video frames left out" in note and "labelstudio-video" in note for note in result.notes), result.notes


def test_coco_export_keeps_the_frames_with_their_tracks(video_run, tmp_path):
    from pycocotools.coco import COCO

    _export(video_run, "coco", tmp_path)
    coco = COCO(str(tmp_path / "coco" / "instances.json"))
    frames = [img for img in coco.dataset["images"] if img.get("video_uri")]
    assert sorted(img["frame_index"] for img in frames) == list(range(0, N, STRIDE))
    assert {img["video_uri"] for img in frames} == {video_run["clip"]}
    on_frames = video_run["on_frames"]
    anns = [a for img in frames for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))]
    assert len(anns) == len(on_frames)
    by_uri = {img["id"]: img["uri"] for img in frames}
    for ann in anns:
        row = on_frames[(on_frames["uri"] == by_uri[ann["image_id"]]) & (on_frames["object_id"] == ann["object_id"])].iloc[0]
        assert ann["track_id"] == row["track_id"]
        assert np.array_equal(coco.annToMask(ann).astype(bool), _mask(row["mask"]))


def test_report_has_a_video_section(video_run, tmp_path):
    from pipeline.outputs.report import ReportOptions, write_report

    result = write_report(str(video_run["out"]), str(tmp_path / "report"), ReportOptions(gallery=2))
    summary = result["summary"]
    assert summary["gallery_unreadable"] == [], "gallery frames are drawn on their own pixels"
    v, videos, tracks, on_frames = summary["videos"], video_run["videos"], video_run["tracks"], video_run["on_frames"]
    row = videos.iloc[0]
    assert (v["videos"], v["ok"], v["error"], v["frames"], v["tracks"]) == (1, 1, 0, N // STRIDE, len(tracks))
    counted = Counter(tracks[tracks["num_frames"] >= 2]["class_name"])
    assert {c["class_name"]: c["count"] for c in v["unique_by_class"]} == dict(counted)
    assert v["count_line"] == COUNT_LINE
    assert v["line_in"] == sorted(list(row["line_in"]), key=lambda c: (-c["count"], c["class_name"]))
    drawn = v["frames_drawn"]
    assert 1 <= len(drawn) <= 3 and all(d["problem"] is None for d in drawn)
    for d in drawn:
        assert d["tracks"] == sorted(on_frames[on_frames["uri"] == d["uri"]]["track_id"].astype(int))
    page = (tmp_path / "report" / "report.html").read_text()
    section = page[page.index('<section id="videos">'):]
    section = section[:section.index("</section>")]
    assert 'data-chart="tracks-over-time"' in section
    assert section.count("data-video-frame=") == len(drawn) and "data-unreadable" not in section
    for name, n in counted.items():
        assert f"data-video-class='{name}'>{n:,}<" in section


def test_report_of_a_run_without_videos_has_no_video_section(tmp_path):
    from synthetic_run import write_synthetic_run

    from pipeline.outputs.report import ReportOptions, write_report

    write_synthetic_run(str(tmp_path / "run"), num_images=6, image_folder=tmp_path / "img")
    result = write_report(str(tmp_path / "run"), str(tmp_path / "report"), ReportOptions(gallery=2))
    assert result["summary"]["videos"] is None
    assert 'id="videos"' not in (tmp_path / "report" / "report.html").read_text()


def test_video_formats_of_a_run_without_videos_say_so(tmp_path):
    from synthetic_run import write_synthetic_run

    from pipeline.outputs.export import export

    write_synthetic_run(str(tmp_path / "run"), num_images=4, image_folder=tmp_path / "img")
    result = export(str(tmp_path / "run"), "mot", str(tmp_path / "mot"), progress=False)
    assert result.objects == 0 and any("no video frames" in n for n in result.notes)
    assert json.loads((tmp_path / "mot" / "sequences.json").read_text())["sequences"] == []


@pytest.mark.parametrize("value", ["[1,2,3]", "[1,2,1,2]", "[0,0,a,1]", "5", "[0,0,.inf,1]"])
def test_a_bad_count_line_is_refused_naming_the_key(value):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="count_line"):
        load_config(None, [f"video.count_line={value}"])
    assert load_config(None, ["video.count_line=[0, 10, 100, 10.5]"]).video.count_line == [0.0, 10.0, 100.0, 10.5]


def test_a_track_missing_on_a_kept_frame_is_not_drawn_over_the_gap():
    """Label Studio interpolates a box from an enabled keyframe to the next one: a track's keyframe
    before a kept frame where its mask is missing, and its last one, are disabled (by hand)."""
    from pipeline.outputs.export.labelstudio_video import track_region
    from pipeline.outputs.export.videos import VideoTracks

    video = VideoTracks("file:///v/a.mp4", 200, 100, frames={f: f"file:///v/a.mp4#frame={f}" for f in (0, 2, 4, 6, 8)})
    video.tracks[3] = {f: {"box": [10 * f, 20, 10 * f + 50, 70], "class_id": 0, "class_name": "car", "mask_score": 0.5} for f in (0, 2, 6, 8)}
    region = track_region(3, video, fps=25.0, frames_count=9, duration=0.36)
    sequence = region["value"]["sequence"]
    assert [k["frame"] for k in sequence] == [1, 3, 7, 9]
    assert [k["enabled"] for k in sequence] == [True, False, True, False]
    assert sequence[2]["x"] == pytest.approx(60 / 200 * 100) and sequence[2]["width"] == pytest.approx(25.0)
    assert sequence[2]["y"] == pytest.approx(20.0) and sequence[2]["height"] == pytest.approx(50.0)
    assert sequence[2]["time"] == pytest.approx(7 / 25)
    assert region["id"] == "t3" and region["value"]["labels"] == ["car"] and region["score"] == 0.5
