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
    """What a person watching the run sees: images done of the total with images/s and an ETA,
    moving each time a batch of images is staged (not only when a whole shard is committed), as
    a bar on a terminal and as a log line every ``every_s`` seconds; and the shard counts that
    run.json records. Images done before this attempt count as done."""

    def __init__(self, total_shards: int, done_before: int, totals: Totals, total_images: Optional[int] = None,
                 every_s: float = 10.0, bar: Optional[bool] = None):
        import sys

        self.total = total_shards
        self.done_before = done_before
        self.done = done_before
        self.totals = totals
        self.images_before = totals.images
        self.total_images = total_images  # None for tar shards: their members are counted as they are read
        self.staged = 0  # images staged in this attempt (ahead of the commits that fold them into totals)
        self.first_staged: Optional[tuple[float, int]] = None  # (when, how many) of the first staged batch
        self.last_staged: Optional[float] = None
        self.started = time.time()
        self.every_s = every_s
        self.last_log = 0.0
        self.show_bar = bar if bar is not None else sys.stderr.isatty()
        self.bar = None

    @property
    def images(self) -> int:
        return self.totals.images

    def images_staged(self, n: int) -> bool:
        """Count ``n`` images staged by the sink; True when it is time for a log line."""
        now = time.time()
        if self.first_staged is None:
            self.first_staged = (now, n)  # the first batch pays for actor start-up: steady rate starts after it
        self.last_staged = now
        self.staged += n
        if self.show_bar:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total_images, initial=self.images_before, unit="img", desc="labeling", dynamic_ncols=True)
            self.bar.update(n)
        return self._due()

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
        return self.staged / max(time.time() - self.started, 1e-9)

    def steady_rate(self) -> Optional[float]:
        """Images/s from the first staged batch to the last: the rate without Ray's and the
        models' start-up, which is what a long run sees."""
        if self.first_staged is None or self.last_staged <= self.first_staged[0]:
            return None
        return round((self.staged - self.first_staged[1]) / (self.last_staged - self.first_staged[0]), 4)

    def line(self) -> str:
        done = self.images_before + self.staged
        rate = self.rate()
        if self.total_images:
            left = max(self.total_images - done, 0)
            eta = f", ETA {_duration(left / rate)}" if rate > 0 and left else ""
            images = f"images {done}/{self.total_images} ({100 * done / self.total_images:.0f}%)"
        else:
            eta, images = "", f"images {done}"
        resumed = f", {self.done_before} done before this attempt" if self.done_before else ""
        return f"{images}, {rate:.2f} images/s this attempt{eta}; shards {self.done}/{self.total} done{resumed}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def as_dict(self) -> dict:
        return {
            "shards_total": self.total,
            "shards_done": self.done,
            "shards_done_before_this_attempt": self.done_before,
            "images_done": self.images,
            "images_this_attempt": self.images - self.images_before,
            "steady_images_per_second": self.steady_rate(),
        }


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
