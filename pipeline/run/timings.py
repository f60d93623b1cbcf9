"""Where the time goes: seconds per stage, measured in the workers, carried to the driver on the
rows, summed into run.json's ``timings`` (and the report), so a user can see the bottleneck.

Each stage adds its time to columns ``t_<stage>`` (seconds per image: a batch's time shared out
over its rows); the sink hands them to the driver with the rest of a row's summary. Stages:
``read`` (bytes and headers), ``decode`` (pixels, in the model actors' threads), ``detect``
(YOLO), ``encode`` (SAM's image encoder), ``masks`` (prompt encoder, mask decoder and the
masks finished on the device), ``rle`` (the host threads' work on finished masks: quality metrics
and clean-up, COCO strings, rows), ``write`` (staging Parquet). The SAM actors also report how busy their device was (``sam_busy_s`` of
``sam_wall_s``) and how many images each did. Counts travel the same way in ``n_<name>``
columns: the detector's calls and the images they held (``timings.detector``: its mean batch).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import pyarrow as pa

STAGES = ("read", "decode", "detect", "encode", "masks", "rle", "write")
PREFIX = "t_"
COUNT_PREFIX = "n_"


class StageClock:
    """A worker's stopwatch: ``time(stage)`` around work, ``add`` for time measured elsewhere
    (decode threads), ``count`` for events (detector calls), ``stamp`` to put what was spent on
    a batch's rows."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[stage] += time.perf_counter() - started

    def add(self, stage: str, seconds: float) -> None:
        self.spent[stage] += seconds

    def count(self, name: str, n: float = 1) -> None:
        self.counts[name] += n

    def stamp(self, batch: pa.Table) -> pa.Table:
        """Add this batch's seconds (and counts) per image to its ``t_<stage>`` (``n_<name>``)
        columns, then start afresh."""
        n = max(batch.num_rows, 1)
        spent = {PREFIX + stage: seconds for stage, seconds in self.spent.items()}
        spent.update({COUNT_PREFIX + name: value for name, value in self.counts.items()})
        for name, seconds in spent.items():
            share = [seconds / n] * batch.num_rows
            if name in batch.column_names:
                before = batch.column(name).to_pylist()
                share = [(b or 0.0) + s for b, s in zip(before, share)]
                batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(share, pa.float64()))
            else:
                batch = batch.append_column(name, pa.array(share, pa.float64()))
        self.spent.clear()
        self.counts.clear()
        return batch


class Timings:
    """Driver side: the run's seconds per stage (summed over workers), and per SAM actor its images
    and how busy its device was."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.images = 0
        self.actors: dict[str, dict] = {}

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.images += 1
            for key, value in row.items():
                if key.startswith(PREFIX) and value:
                    self.seconds[key[len(PREFIX):]] += value
                elif key.startswith(COUNT_PREFIX) and value:
                    self.counts[key[len(COUNT_PREFIX):]] += value
            actor = row.get("sam_actor")
            if actor:
                entry = self.actors.setdefault(actor, {"images": 0, "node": row.get("sam_node"), "dtype": row.get("sam_dtype"),
                                                       "busy_s": 0.0, "wall_s": 0.0})
                entry["images"] += 1
                entry["busy_s"] = max(entry["busy_s"], row.get("sam_busy_s") or 0.0)
                entry["wall_s"] = max(entry["wall_s"], row.get("sam_wall_s") or 0.0)

    def as_dict(self) -> dict:
        total = sum(self.seconds.values()) or 1.0
        stages = {
            stage: {"seconds": round(self.seconds[stage], 6), "ms_per_image": round(1000 * self.seconds[stage] / max(self.images, 1), 3),
                    "share": round(self.seconds[stage] / total, 4)}
            for stage in [*STAGES, *sorted(set(self.seconds) - set(STAGES))] if stage in self.seconds
        }
        actors = {
            actor: {**entry, "busy_s": round(entry["busy_s"], 3), "wall_s": round(entry["wall_s"], 3),
                    "busy_fraction": round(entry["busy_s"] / entry["wall_s"], 4) if entry["wall_s"] else None}
            for actor, entry in sorted(self.actors.items())
        }
        timings = {"images": self.images, "stages": stages, "sam_actors": actors}
        calls = round(self.counts.get("detect_calls", 0))
        if calls:  # YOLO calls and the images they held: how well mixed sizes batch
            images = round(self.counts.get("detect_images", 0))
            timings["detector"] = {"calls": calls, "images": images, "mean_batch_size": round(images / calls, 3)}
        return timings
