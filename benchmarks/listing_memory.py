"""Driver memory while listing and streaming many images: does it grow with the number of images?

Writes N tiny PNGs (8x8) into a local folder for each N, then in ONE driver process, on one local
Ray, runs the job's own listing (``job.work_items`` + ``shards.write_shards``) and streams every
image through the job's own read stage and sink (``stages.read.read_shards``, ``sink.write_batch``)
while the driver tracks staged images and commits complete shards (``progress.ShardTracker``,
``sink.ShardCommits``: each complete shard's commit a Ray task), exactly as ``job.run`` does. Only detection and segmentation are left out: they are replaced by a stub stage named
``_TEST_ONLY_no_models`` (every image gets zero objects) so that tens of thousands of images fit in
a CI minute. A thread samples the driver's RSS every 20 ms; the peak of each phase is reported.

    python benchmarks/listing_memory.py --images 2000 20000 [--shard-size 500] [--json out.json]

``--s3``: the listing phase only, over s3:// — a moto S3 server on loopback (tests/moto_server.py)
holding N keys for each N, 1,000 per "folder". Each listing runs in a fresh process (RSS sampled
as above; s3fs's listings cache counted after it): the job's listing (``job.work_items`` +
``shards.write_shards``), and as a control what it did before (``fs.walk``, which s3fs caches).

    python benchmarks/listing_memory.py --s3 --images 2000 20000
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.io.shards import write_shards  # noqa: E402
from pipeline.run.folder import RunFolder  # noqa: E402
from pipeline.run.job import work_items  # noqa: E402
from pipeline.run.progress import ShardTracker  # noqa: E402
from pipeline.run.sink import ShardCommits, Totals, write_batch  # noqa: E402
from pipeline.stages.read import read_shards  # noqa: E402
from pipeline.stages.segment import OBJECT_TYPE  # noqa: E402

MB = 1024 * 1024


class PeakRSS:
    """Samples this process's resident set size in a background thread."""

    def __init__(self, interval: float = 0.02):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def make_images(folder: Path, n: int) -> None:
    """n distinct 8x8 PNGs, 1000 per sub-folder (like a real dataset's layout)."""
    rng = np.random.default_rng(n)
    template = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(template, format="PNG")
    data = template.getvalue()
    for i in range(n):
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:07d}.png").write_bytes(data)


def _TEST_ONLY_no_models(batch: pa.Table) -> pa.Table:
    """Test-only stand-in for the detector and SAM stages: every image gets zero objects."""
    drop = [c for c in ("data", "prompts", "base_uri") if c in batch.column_names]
    empty = pa.array([[] for _ in range(batch.num_rows)], type=pa.list_(OBJECT_TYPE))
    return batch.drop_columns(drop).append_column(pa.field("objects", pa.list_(OBJECT_TYPE)), empty)


def run_once(images: Path, out: Path, shard_size: int) -> dict:
    import ray

    cfg = load_config(None, [f"input.uri={images}", f"output.uri={out}", f"input.shard_size={shard_size}"])
    folder = RunFolder(cfg)
    folder.prepare({"status": "benchmark"})
    result = {"rss_before_mb": round(psutil.Process().memory_info().rss / MB, 1)}
    t0 = time.time()
    with PeakRSS() as listing_peak:
        listing = write_shards(work_items(cfg), cfg.input.shard_size, folder.fs, folder.path, cfg.input.storage_options)
    result["listing_s"] = round(time.time() - t0, 2)
    t0 = time.time()
    with PeakRSS() as stream_peak:
        shard_paths = [folder.shard_uri(s) for s in folder.shard_ids()]
        ds = ray.data.from_items([{"shard_path": p} for p in shard_paths], override_num_blocks=len(shard_paths))
        ds = ds.map_batches(read_shards, batch_format="pyarrow", batch_size=1, num_cpus=0.25,
                            fn_kwargs={"run_uri": folder.run_uri, "max_pixels": cfg.input.max_pixels})
        ds = ds.map_batches(_TEST_ONLY_no_models, batch_format="pyarrow", batch_size=64, num_cpus=0.25)
        ds = ds.map_batches(write_batch, batch_format="pyarrow", batch_size=64, num_cpus=0.25,
                            fn_kwargs={"run_uri": folder.run_uri, "meta_columns": []})
        totals = Totals()  # the driver's side of the job: track staged images, launch complete shards' commits
        tracker = ShardTracker(folder.shard_ids())
        commits = ShardCommits(folder.run_uri, None, [], retries=1)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for shard_id in tracker.add(batch.to_pylist()):
                commits.launch(shard_id)
            for marker in commits.finished(block=False):
                totals.merge(marker)
        for shard_id in tracker.remaining():
            commits.launch(shard_id)
        while commits.pending:
            for marker in commits.finished(block=True):
                totals.merge(marker)
    result.update(
        images=listing.num_images, shards=listing.num_shards, rows=totals.images, ok=totals.ok,
        stream_s=round(time.time() - t0, 2),
        listing_peak_rss_mb=round(listing_peak.peak / MB, 1), stream_peak_rss_mb=round(stream_peak.peak / MB, 1),
    )
    return result


def _s3_listing_once(endpoint: str, n: int, way: str, out: Path, shard_size: int) -> dict:
    """In this (fresh) process: list s3://bench/k{n} the job's way, or the old way (the control)."""
    from fsspec.core import url_to_fs

    from pipeline.io.listing import WorkItem

    options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
    cfg = load_config(None, [f"input.uri=s3://bench/k{n}", f"output.uri={out}", f"input.shard_size={shard_size}",
                             f"input.storage_options={json.dumps(options)}"])
    folder = RunFolder(cfg)
    folder.prepare({"status": "benchmark"})
    fs = url_to_fs("s3://bench", **options)[0]
    fs.call_s3("head_bucket", Bucket="bench")  # connect (client, service model) before measuring

    def walked():  # CONTROL: the listing before it streamed (fs.walk keeps every listing cached)
        for root, dirs, files in fs.walk(f"bench/k{n}"):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.lower().endswith(tuple(cfg.input.extensions)) and not name.startswith("."):
                    yield WorkItem(f"s3://{root}/{name}")

    result = {"way": way, "keys": n, "rss_before_mb": round(psutil.Process().memory_info().rss / MB, 1)}
    t0 = time.time()
    with PeakRSS() as peak:
        items = work_items(cfg) if way == "streamed" else walked()
        listing = write_shards(items, cfg.input.shard_size, folder.fs, folder.path, cfg.input.storage_options)
    result.update(images=listing.num_images, listing_s=round(time.time() - t0, 2), listing_peak_rss_mb=round(peak.peak / MB, 1),
                  s3fs_cached_entries=sum(len(v) for v in fs.dircache.values()))
    return result


def run_s3(sizes: list[int], shard_size: int, work: Path) -> list[dict]:
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from moto_server import start_moto

    preload = {"bench": [[f"k{n}/d{d:03d}/img{{0:06d}}.png", 1000, "x"] for n in sizes for d in range(n // 1000)]}
    server = start_moto(work, preload)
    results = []
    try:
        for way in ("streamed", "walk"):
            for n in sizes:
                proc = subprocess.run([sys.executable, __file__, "--s3-one", server.endpoint, str(n), way, str(work / f"out-{way}-{n}"),
                                       str(shard_size)], capture_output=True, text=True, check=True)
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    finally:
        server.stop()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=500, help="images of an untimed first run (imports, Ray workers)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--s3", action="store_true", help="list a moto S3 bucket of N keys instead (listing phase only)")
    ap.add_argument("--s3-one", nargs=5, help=argparse.SUPPRESS)  # endpoint n way out shard_size: one measurement
    args = ap.parse_args(argv)
    if args.s3_one:
        endpoint, n, way, out, shard_size = args.s3_one
        print(json.dumps(_s3_listing_once(endpoint, int(n), way, Path(out), int(shard_size))))
        return 0
    if args.s3:
        results = run_s3(args.images, args.shard_size, Path(args.workdir or tempfile.mkdtemp(prefix="listing-memory-s3-")))
        if args.json:
            Path(args.json).write_text(json.dumps({"s3": results}, indent=2))
        return 0

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="listing-memory-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {"warmup": None, "runs": []}
    try:
        for label, n in [("warmup", args.warmup), *(("run", n) for n in args.images)]:
            folder = work / f"images-{n}"
            if not folder.exists():
                make_images(folder, n)
            res = run_once(folder, work / f"out-{label}-{n}", args.shard_size)
            if label == "warmup":
                results["warmup"] = res
            else:
                results["runs"].append(res)
            print(json.dumps(res), flush=True)
    finally:
        ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
