"""`autolabel report` on a large synthetic run: time and peak memory (RSS) of the report process.

    .venv/bin/python benchmarks/report_scale.py --images 200000 --mean-objects 6   # ~1.2 M object rows

The run is written directly as Parquet in the sink's schemas (tests/synthetic_run.py: tiny masks,
no image files behind the URIs, so the gallery draws masks on blank canvases). The report then
runs in a fresh Python process, which prints its own peak RSS, so the number is the report's
alone and not the generator's. tests/test_report.py runs the same code on a small run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
for extra in (str(REPO), str(REPO / "tests")):
    if extra not in sys.path:
        sys.path.append(extra)
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from pipeline.outputs.report import ReportOptions, write_report
result = write_report(sys.argv[1], None, ReportOptions(gallery=12))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "objects": result["summary"]["totals"]["objects"]}))
"""


def benchmark(folder: Path, num_images: int, mean_objects: float, images_per_part: int = 1024, reuse: bool = False) -> dict:
    from synthetic_run import write_synthetic_run

    run = Path(folder) / "run"
    t = time.perf_counter()
    if not (reuse and (run / "run.json").exists()):
        write_synthetic_run(str(run), num_images=num_images, mean_objects=mean_objects, images_per_part=images_per_part, seed=0)
    write_s = time.perf_counter() - t
    num_images = sum(pq.read_metadata(p).num_rows for p in (run / "images").glob("*.parquet"))
    objects = sum(pq.read_metadata(p).num_rows for p in (run / "objects").glob("*.parquet"))
    size = sum(p.stat().st_size for p in run.rglob("*.parquet"))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"report failed:\n{proc.stderr}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "images": num_images,
        "objects": objects,
        "summary_objects": child["objects"],
        "parquet_mib": round(size / 2**20, 1),
        "write_s": round(write_s, 1),
        "report_s": round(child["seconds"], 1),
        "peak_rss_mib": round(child["peak_rss_kib"] / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--mean-objects", type=float, default=6.0)
    parser.add_argument("--folder", help="where to write the run (default: a temporary folder, removed afterwards)")
    parser.add_argument("--reuse", action="store_true", help="report on the run already in --folder instead of writing it again")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-scale-") as tmp:
        result = benchmark(Path(args.folder or tmp), args.images, args.mean_objects, reuse=args.reuse)
    result["machine"] = f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
