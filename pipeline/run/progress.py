"""The driver's count of a run as it goes: which shards are complete (``ShardTracker``), and what
a person watching sees (``Progress``: images done, images/s, ETA) and run.json records."""
from __future__ import annotations

import time
from typing import Optional

from pipeline.run.sink import Totals


class ShardTracker:
    """Driver side: which images of each shard are staged, and when a shard is complete."""

    def __init__(self, shard_ids: list[str]):
        self.waiting: set[str] = set(shard_ids)
        self.seen: dict[str, set[str]] = {}
        self.expected: dict[str, int] = {}

    def add(self, rows: list[dict]) -> list[str]:
        """Staged images (shard_id, image_id, shard_rows) -> the shards now complete."""
        touched = set()
        for row in rows:
            shard = row["shard_id"]
            self.seen.setdefault(shard, set()).add(row["image_id"])
            if row["shard_rows"] is not None:
                self.expected[shard] = row["shard_rows"]
            touched.add(shard)
        complete = [s for s in sorted(touched) if s in self.waiting and len(self.seen[s]) == self.expected.get(s, -1)]
        for shard in complete:
            self.waiting.discard(shard)
            self.seen.pop(shard)
        return complete

    def remaining(self) -> list[str]:
        """After the dataset is exhausted: shards not yet committed (e.g. a tar with no images)."""
        left = sorted(self.waiting)
        self.waiting.clear()
        return left


class Progress:
    """What a person watching the run sees: images done of the total with images/s, video frames
    done of theirs with frames/s, and an ETA, moving each time a batch of images or a chunk of
    video is staged (not only when a whole shard is committed), as a bar on a terminal and as a
    log line every ``every_s`` seconds; and the shard counts that run.json records. Work done
    before this attempt counts as done.

    Frames are counted apart from images because a frame costs what SAM 2's tracking of every
    object in it costs, not what an image costs: the ETA is the images left at the images' rate
    plus the frames left at the frames' rate. The frames to do are known once the videos are
    planned (their frame counts probed: run/video_flow.py), when their turn comes after the
    images; the bar counts both, as both are images rows."""

    def __init__(self, total_shards: int, done_before: int, totals: Totals, total_images: Optional[int] = None,
                 every_s: float = 10.0, bar: Optional[bool] = None, videos: int = 0, done_frames: int = 0):
        import sys

        self.total = total_shards
        self.done_before = done_before
        self.done = done_before
        self.totals = totals
        self.images_before = totals.images  # images rows of the shards committed before, video frames among them
        self.total_images = total_images  # images only (None for tar shards: their members are counted as they are read)
        self.videos = videos  # videos listed
        self.done_frames = done_frames  # frames of the videos committed before this attempt (in images_before)
        self.planned_frames: Optional[int] = None  # frames of the videos still to do, once planned
        self.frames_before = 0  # of those, frames of chunks committed before this attempt
        self.staged = 0  # images staged in this attempt (ahead of the commits that fold them into totals)
        self.frames = 0  # video frames staged in this attempt
        self.first_staged: Optional[tuple[float, int]] = None  # (when, how many) of the first staged batch
        self.last_staged: Optional[float] = None
        self.videos_started: Optional[float] = None  # when the videos' turn came
        self.first_frames: Optional[tuple[float, int]] = None  # (when, how many) of the first committed chunk
        self.last_frames: Optional[float] = None
        self.started = time.time()
        self.every_s = every_s
        self.last_log = 0.0
        self.show_bar = bar if bar is not None else sys.stderr.isatty()
        self.bar = None

    @property
    def images(self) -> int:
        return self.totals.images

    @property
    def total_frames(self) -> Optional[int]:
        """Kept frames of every video of the run (None until the videos still to do are planned)."""
        return None if self.planned_frames is None else self.done_frames + self.planned_frames

    def frames_done(self) -> int:
        return self.done_frames + self.frames_before + self.frames

    def images_done(self) -> int:
        return self.images_before - self.done_frames + self.staged

    def videos_planned(self, planned_frames: int, frames_before: int = 0) -> None:
        """The videos' turn: those still to do have ``planned_frames`` kept frames, ``frames_before``
        of them in chunks committed before this attempt."""
        self.videos_started = time.time()
        self.planned_frames, self.frames_before = planned_frames, frames_before
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + planned_frames
            self.bar.update(frames_before)

    def rows_staged(self, rows: list[dict]) -> bool:
        """Count a batch of the driver's summary rows, images or video chunks (those carry
        ``video_frames``); True when it is time for a log line."""
        if rows and "video_frames" in rows[0]:
            return self.frames_staged(sum(r["video_frames"] or 0 for r in rows))
        return self.images_staged(len(rows))

    def images_staged(self, n: int) -> bool:
        """Count ``n`` images staged by the sink; True when it is time for a log line."""
        now = time.time()
        if self.first_staged is None:
            self.first_staged = (now, n)  # the first batch pays for actor start-up: steady rate starts after it
        self.last_staged = now
        self.staged += n
        self._bar(n)
        return self._due()

    def frames_staged(self, n: int) -> bool:
        """Count ``n`` video frames of a committed chunk; True when it is time for a log line."""
        now = time.time()
        if self.first_frames is None:
            self.first_frames = (now, n)  # as for images: the first chunk pays for the track actors' start
        self.last_frames = now
        self.frames += n
        self._bar(n)
        return self._due()

    def _bar(self, n: int) -> None:
        if not self.show_bar:
            return
        if self.bar is None:
            from tqdm import tqdm

            total = None if self.total_images is None else self.total_images + (self.total_frames or self.done_frames)
            self.bar = tqdm(total=total, initial=self.images_before + self.frames_before, unit="img", desc="labeling",
                            dynamic_ncols=True)
        self.bar.update(n)

    def shard_done(self) -> bool:
        """Count a committed shard (its totals already merged); True when it is time to log."""
        self.done += 1
        return self._due() or self.done == self.total

    def _due(self) -> bool:
        now = time.time()
        if now - self.last_log >= self.every_s:
            self.last_log = now
            return True
        return False

    def rate(self) -> float:
        """Images/s this attempt (until the videos' turn, which is not the images' time)."""
        return self.staged / max((self.videos_started or time.time()) - self.started, 1e-9)

    def frame_rate(self) -> float:
        """Video frames/s this attempt, since the videos' turn came."""
        return self.frames / max(time.time() - self.videos_started, 1e-9) if self.videos_started else 0.0

    def steady_rate(self) -> Optional[float]:
        """Images/s from the first staged batch to the last: the rate without Ray's and the
        models' start-up, which is what a long run sees."""
        return _steady(self.first_staged, self.last_staged, self.staged)

    def steady_frame_rate(self) -> Optional[float]:
        """Video frames/s from the first committed chunk to the last (as ``steady_rate``)."""
        return _steady(self.first_frames, self.last_frames, self.frames)

    def eta(self) -> Optional[float]:
        """Seconds left: the images left at the images' rate plus the frames left at the frames'
        (None while a rate that is needed is not known yet)."""
        left = 0.0
        images_left = max(self.total_images - self.images_done(), 0) if self.total_images else 0
        frames_left = max(self.total_frames - self.frames_done(), 0) if self.total_frames else 0
        for todo, rate in ((images_left, self.rate()), (frames_left, self.frame_rate())):
            if todo:
                if rate <= 0:
                    return None
                left += todo / rate
        return left if images_left or frames_left else None

    def line(self) -> str:
        parts = []
        if self.total_images:
            done = self.images_done()
            parts.append(f"images {done}/{self.total_images} ({100 * done / self.total_images:.0f}%), {self.rate():.2f} images/s this attempt")
        elif self.total_images is None:
            parts.append(f"images {self.images_before + self.staged}, {self.rate():.2f} images/s this attempt")
        if self.videos and self.total_frames is not None:
            done, total = self.frames_done(), self.total_frames
            share = f" ({100 * done / total:.0f}%)" if total else ""
            parts.append(f"frames {done}/{total}{share}, {self.frame_rate():.2f} frames/s this attempt")
        elif self.videos:
            parts.append(f"then {self.videos} video{'s' if self.videos > 1 else ''}")
        eta = self.eta()
        if eta is not None:
            parts[-1] += f", ETA {_duration(eta)}" + (" for the images" if self.videos and self.total_frames is None else "")
        resumed = f", {self.done_before} done before this attempt" if self.done_before else ""
        return f"{', '.join(parts) if parts else 'videos'}; shards {self.done}/{self.total} done{resumed}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def as_dict(self) -> dict:
        out = {
            "shards_total": self.total,
            "shards_done": self.done,
            "shards_done_before_this_attempt": self.done_before,
            "images_done": self.images,
            "images_this_attempt": self.images - self.images_before,
            "steady_images_per_second": self.steady_rate(),
        }
        if self.videos:
            spent = (self.last_frames - self.videos_started) if self.last_frames and self.videos_started else None
            out.update(frames_total=self.total_frames, frames_done=self.frames_done(), frames_this_attempt=self.frames,
                       frames_per_second=round(self.frames / spent, 4) if spent else None,
                       steady_frames_per_second=self.steady_frame_rate())
        return out


def _steady(first: Optional[tuple[float, int]], last: Optional[float], count: int) -> Optional[float]:
    if first is None or last <= first[0]:
        return None
    return round((count - first[1]) / (last - first[0]), 4)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
