"""What the video formats (ytvis, mot, labelstudio-video) write from: the run's frames gathered per
video, each track's objects by frame. Exports stream image by image, but a video's frames may
come from several parts in any order, so a video format keeps its videos' tracks (boxes, and for
ytvis the RLE strings, a few hundred bytes per mask) until ``close``; it never holds pixels.

Still images and objects without a track (added in a review) have no place in a video format:
they are counted and the export says so.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

from pipeline.outputs.export.labels import ImageLabels

KEPT = ("object_id", "class_id", "class_name", "det_score", "mask_score", "box", "area", "mask")


@dataclass
class VideoTracks:
    """One video's exported frames and tracks."""
    uri: str
    width: int
    height: int
    frames: dict = field(default_factory=dict)  # frame_index -> the frame's images-table uri
    tracks: dict = field(default_factory=dict)  # track_id -> {frame_index: object (KEPT columns)}

    @property
    def frame_indices(self) -> list[int]:
        return sorted(self.frames)

    @property
    def name(self) -> str:
        """A readable, unique name: the file's stem plus the video's image_id (as images rows name frames)."""
        from pipeline.io.listing import image_id_for

        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(self.uri.rstrip("/").rsplit("/", 1)[-1])[0])[:80] or "video"
        return f"{stem}-{image_id_for(self.uri)}"


def track_class(objects) -> tuple[int, str]:
    """A track's class in an export: the most common among its exported objects (a review may have
    relabelled some), the lowest class id on a tie."""
    counts = Counter((o["class_id"], o["class_name"]) for o in objects)
    return min(counts, key=lambda k: (-counts[k], k[0]))


class VideoFrames:
    """The frames of every video in the export, as ``add`` receives them (the format writers' shared part)."""

    def __init__(self):
        self.videos: dict[str, VideoTracks] = {}
        self.still_images = 0
        self.untracked = 0

    def skips(self, image: ImageLabels) -> bool:
        if image.video_uri is None:
            self.still_images += 1
            return True
        return False

    def add(self, image: ImageLabels) -> int:
        video = self.videos.setdefault(image.video_uri, VideoTracks(image.video_uri, image.width, image.height))
        video.frames[int(image.frame_index)] = image.uri
        written = 0
        for obj in image.objects:
            if obj.get("track_id") is None:
                self.untracked += 1
                continue
            video.tracks.setdefault(int(obj["track_id"]), {})[int(image.frame_index)] = {k: obj.get(k) for k in KEPT}
            written += 1
        return written

    def sorted_videos(self) -> list[VideoTracks]:
        return [self.videos[u] for u in sorted(self.videos)]

    def notes(self, fmt: str) -> list[str]:
        notes = []
        if self.still_images:
            notes.append(f"{fmt}: {self.still_images:,} still images left out (a video format holds video frames only; "
                         "export them with --format coco, yolo, png, cutouts or labelstudio)")
        if self.untracked:
            notes.append(f"{fmt}: {self.untracked:,} objects on video frames without a track (added in a review) left out")
        return notes
