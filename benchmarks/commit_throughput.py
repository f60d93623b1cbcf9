"""Committing shards: in the driver (threads, as before) vs in Ray tasks (as the job does now).

Stages N shards of images with realistic objects (COCO RLE of full-HD masks, ~1-2 KB each, as
SAM's masks of real objects are) through the job's own ``sink.write_batch``, then commits them
all and measures committed shards/s, the driver process's CPU seconds and its peak RSS:

  driver: ``sink.commit_shard`` in a thread pool of the driver, reading every staged part and
          writing every shard file itself (every output byte passes through it twice);
  tasks:  ``sink.ShardCommits``, one Ray task per shard; the driver only collects done markers.

    .venv/bin/python benchmarks/commit_throughput.py --shards 40 --images 128 --objects 10
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.run.sink import ShardCommits, commit_shard, write_batch  # noqa: E402
from pipeline.sam import masks as mask_codec  # noqa: E402
from pipeline.stages.segment import OBJECT_TYPE  # noqa: E402

MB = 1024 * 1024


def realistic_rles(n: int, h: int = 1080, w: int = 1920) -> list[dict]:
    """RLEs of irregular blobs of assorted sizes at full HD (a noisy-edged ellipse): run lengths
    like those of real object masks (a few KB each), all different, so Parquet cannot fold them."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ry, rx = int(rng.uniform(40, 300)), int(rng.uniform(40, 400))
        yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
        edge = 1 + 0.08 * np.sin(np.arctan2(yy, xx) * rng.integers(3, 12) + rng.uniform(0, 6)) + rng.normal(0, 0.02, yy.shape)
        blob = (yy / ry) ** 2 + (xx / rx) ** 2 <= edge
        mask = np.zeros((h, w), bool)
        y0, x0 = int(rng.uniform(0, h - blob.shape[0])), int(rng.uniform(0, w - blob.shape[1]))
        mask[y0:y0 + blob.shape[0], x0:x0 + blob.shape[1]] = blob
        out.append(mask_codec.encode(mask[None])[0])
    return out


def stage(run: Path, shards: int, images: int, objects: int, rles: list[dict]) -> int:
    staged_bytes = 0
    for s in range(shards):
        shard_id = f"{s:06d}"
        rows = []
        for i in range(images):
            objs = [{"object_id": k, "object_key": None, "source": "detector", "prompt": "box", "candidate": 0, "status": "ok",
                     "error": None, "class_id": k % 5, "class_name": f"c{k % 5}", "det_score": 0.5, "mask_score": 0.9,
                     "box": [0.0, 0.0, 10.0, 10.0], "area": 100, "mask": rles[(i * objects + k) % len(rles)]} for k in range(objects)]
            rows.append((f"s3://bucket/{shard_id}/{i:05d}.jpg", f"{s:04d}{i:012d}", objs))
        table = pa.table({
            "shard_id": [shard_id] * images, "uri": [r[0] for r in rows], "image_id": [r[1] for r in rows],
            "shard_rows": pa.array([images] * images, pa.int32()), "width": pa.array([1920] * images, pa.int32()),
            "height": pa.array([1080] * images, pa.int32()), "status": ["ok"] * images,
            "error_class": pa.array([None] * images, pa.string()), "error": pa.array([None] * images, pa.string()),
            "note": pa.array([None] * images, pa.string()),
        }).append_column(pa.field("objects", pa.list_(OBJECT_TYPE)), pa.array([r[2] for r in rows], pa.list_(OBJECT_TYPE)))
        for start in range(0, images, 16):  # as the sink stages them: 16 images per part
            write_batch(table.slice(start, 16), str(run))
    staged_bytes = sum(p.stat().st_size for p in (run / "_staging").rglob("*.parquet"))
    return staged_bytes


class Sampler:
    def __init__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def commit_all(mode: str, run: Path, shards: int) -> dict:
    import fsspec

    ids = [f"{s:06d}" for s in range(shards)]
    before_cpu, started = cpu_seconds(), time.perf_counter()
    with Sampler() as rss:
        if mode == "driver":
            fs = fsspec.filesystem("file")
            with ThreadPoolExecutor(4) as pool:
                markers = list(pool.map(lambda s: commit_shard(fs, str(run), s), ids))
        else:
            commits = ShardCommits(f"file://{run}", None, [], retries=1)
            for s in ids:
                commits.launch(s)
            markers = []
            while commits.pending:
                markers += commits.finished(block=True)
    seconds = time.perf_counter() - started
    assert len(markers) == shards and all(m["images"] > 0 for m in markers)
    return {"mode": mode, "shards": shards, "seconds": round(seconds, 3), "shards_per_second": round(shards / seconds, 2),
            "driver_cpu_s": round(cpu_seconds() - before_cpu, 3), "driver_peak_rss_mb": round(rss.peak / MB, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--images", type=int, default=128, help="images per shard")
    ap.add_argument("--objects", type=int, default=10, help="objects per image")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rles = realistic_rles(1024)
    rle_bytes = np.median([len(r["counts"]) for r in rles])
    results = {"args": vars(args), "median_rle_bytes": float(rle_bytes), "runs": []}
    try:
        warm = Path(tempfile.mkdtemp(prefix="commit-warm-"))  # workers import the sink once, not in the timing
        stage(warm, 8, 16, 1, rles)
        commit_all("tasks", warm, 8)
        for mode in ("driver", "tasks"):
            run = Path(tempfile.mkdtemp(prefix=f"commit-{mode}-"))
            staged = stage(run, args.shards, args.images, args.objects, rles)
            result = {**commit_all(mode, run, args.shards), "staged_mb": round(staged / MB, 1)}
            results["runs"].append(result)
            print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
