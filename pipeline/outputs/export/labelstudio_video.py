"""Label Studio video tasks (``--format labelstudio-video``): one task per video, each track a
``videorectangle`` region whose ``sequence`` has a keyframe per frame the track was seen, and the
project's labeling config (``Video`` + ``VideoRectangle`` + ``Labels``, Label Studio's "Video
Object Tracking" template).

Label Studio has no video masks: its video tags are rectangles (and timeline labels), so the masks
go as their tight boxes. Keyframes are written as Label Studio's own ML backend writes them for
ultralytics' tracks: ``frame`` 1-based, ``time`` = frame / fps, ``x``/``y``/``width``/``height``
in percent of the frame, ``enabled`` true while the box carries on to the next kept frame (false
on a track's last frame, and before a frame where its mask is missing, so the box is not
interpolated over the gap).
"""
from __future__ import annotations

import json
from collections import Counter
from xml.sax.saxutils import quoteattr

from pipeline.outputs import labelstudio as ls
from pipeline.outputs.colors import class_color
from pipeline.outputs.columns import UNLABELED
from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.labels import ExportError, package_version, utc_now
from pipeline.outputs.export.videos import VideoFrames, VideoTracks, track_class
from pipeline.outputs.rundata import RunData

FROM_NAME = "box"  # the VideoRectangle tag
TO_NAME = "video"  # the Video tag
LABELS_NAME = "videoLabels"  # the Labels tag the rectangles take their label from
DATA_KEY = "autolabel_video"  # which run and video a task is (not ls.DATA_KEY: review import reads image tasks only)
DEFAULT_FPS = 24.0  # Label Studio's Video tag default, for a video whose container gave no frame rate


def video_labeling_config(class_names, colors: dict, fps: float) -> str:
    labels = "\n".join(f"    <Label value={quoteattr(n)}" + (f" background={quoteattr(colors[n])}" if n in colors else "") + "/>"
                       for n in class_names)
    return (
        "<View>\n"
        f"  <Labels name=\"{LABELS_NAME}\" toName=\"{TO_NAME}\" allowEmpty=\"true\">\n{labels}\n  </Labels>\n"
        f"  <Video name=\"{TO_NAME}\" value=\"${TO_NAME}\" framerate=\"{fps:g}\"/>\n"
        f"  <VideoRectangle name=\"{FROM_NAME}\" toName=\"{TO_NAME}\"/>\n"
        "</View>\n"
    )


def track_region(track_id: int, video: VideoTracks, fps: float, frames_count: int, duration: float) -> dict:
    """One track as a ``videorectangle`` region."""
    by_frame = video.tracks[track_id]
    kept = video.frame_indices
    following = {f: kept[i + 1] if i + 1 < len(kept) else None for i, f in enumerate(kept)}
    w, h = float(video.width), float(video.height)
    sequence = []
    for frame in sorted(by_frame):
        x0, y0, x1, y1 = (float(v) for v in by_frame[frame]["box"])
        sequence.append({"frame": frame + 1, "enabled": following[frame] in by_frame, "rotation": 0,
                         "x": x0 / w * 100, "y": y0 / h * 100, "width": (x1 - x0) / w * 100, "height": (y1 - y0) / h * 100,
                         "time": (frame + 1) / fps})
    _, class_name = track_class(by_frame.values())
    scores = [o["mask_score"] for o in by_frame.values() if o["mask_score"] is not None]
    region = {"id": f"t{track_id}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "videorectangle", "origin": "prediction",
              "value": {"framesCount": frames_count, "duration": duration, "sequence": sequence, "labels": [class_name]}}
    if scores:
        region["score"] = round(sum(scores) / len(scores), 6)
    return region


class LabelStudioVideoWriter(VideoFrames):
    """``tasks.json`` (one task per video, its tracks as one prediction) and ``labeling-config.xml``."""

    def __init__(self, dest: Destination, run: RunData, classes: dict[int, str], urls: ls.ImageUrls):
        super().__init__()
        self.dest, self.run, self.classes, self.urls = dest, run, classes, urls
        self.tasks = 0
        models = run.manifest.get("models") or {}
        self.model_version = " ".join(filter(None, [
            f"autolabel {(run.manifest.get('versions') or {}).get('autolabel') or package_version() or ''}".strip(),
            f"SAM 2.1 {(models.get('sam') or {}).get('size')}" if (models.get("sam") or {}).get("size") else None,
            "(random weights)" if run.manifest.get("random_weights") else None,
        ]))
        self.fps_used: Counter = Counter()

    def abort(self) -> None:
        pass

    def close(self) -> list[str]:
        rows = self.run.video_rows()
        tasks = []
        for video in self.sorted_videos():
            row = rows.get(video.uri) or {}
            fps = float(row.get("fps") or DEFAULT_FPS)
            self.fps_used[fps] += 1
            frames_count = int(row.get("frames") or video.frame_indices[-1] + 1)
            duration = float(row.get("duration_s") or frames_count / fps)
            try:
                url = self.urls(video.uri)
            except ls.LabelStudioError as exc:
                raise ExportError(str(exc)) from None
            results = [track_region(t, video, fps, frames_count, duration) for t in sorted(video.tracks)]
            task = {"data": {TO_NAME: url, DATA_KEY: {"format": 1, "run": self.run.url(), "video_uri": video.uri, "width": video.width,
                                                      "height": video.height, "fps": row.get("fps"), "frames": frames_count,
                                                      "exported_frames": len(video.frames), "export_date": utc_now()}},
                    "predictions": []}
            if results:
                scores = [r["score"] for r in results if "score" in r]
                prediction = {"model_version": self.model_version, "result": results}
                if scores:
                    prediction["score"] = min(scores)
                task["predictions"].append(prediction)
            tasks.append(task)
        self.tasks = len(tasks)
        names = list(dict.fromkeys(name for _, name in sorted(self.classes.items())))
        colors = {name: "#" + "".join(f"{int(round(c * 255)):02x}" for c in class_color(None if name == UNLABELED else cid))
                  for cid, name in self.classes.items()}
        fps = self.fps_used.most_common(1)[0][0] if self.fps_used else DEFAULT_FPS
        body = "[" + ",\n".join(json.dumps(t, separators=(",", ":")) for t in tasks) + "]\n"
        return [self.dest.write("tasks.json", body.encode()),
                self.dest.write("labeling-config.xml", video_labeling_config(names, colors, fps).encode())]

    def notes(self, fmt: str) -> list[str]:
        notes = super().notes(fmt)
        notes.append("Label Studio has no video masks: each track is a videorectangle (its masks' boxes, a keyframe per frame)")
        if len(self.fps_used) > 1:
            notes.append(f"Label Studio: one frame rate per project; labeling-config.xml says {self.fps_used.most_common(1)[0][0]:g} fps, "
                         f"the videos have {', '.join(f'{f:g}' for f in sorted(self.fps_used))}: make a project per frame rate")
        return notes
