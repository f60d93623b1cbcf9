"""`autolabel report` at scale: time and peak memory (RSS) of the report process.

    .venv/bin/python benchmarks/report_scale.py --images 200000 --mean-objects 6            # scan: ~1.1 M object rows, no summaries
    .venv/bin/python benchmarks/report_scale.py --images 200000 --mean-objects 6 --summaries  # the same run with shard summaries
    .venv/bin/python benchmarks/report_scale.py --simulate --shards 10000 --objects-per-shard 10000  # 100 M object rows

Scan and summaries: the run is written straight as Parquet in the sink's schemas
(tests/synthetic_run.py: tiny masks, no image files behind the URIs, so the gallery draws masks on
blank canvases); with ``--summaries`` each part also gets the summary its commit would write. A run
without summaries (made before them) is reported by scanning every row: that is the comparison.

Simulate: the summaries of ``--shards`` shards of ``--objects-per-shard`` objects each. A few real
shards of that size are written and summarised by the commit's own code (report/summaries.py),
with the quality-control columns; every simulated shard is a copy of one of them with its own
image ids, URIs and folders. Beside each summary, stand-in images/objects parts hold that shard's
most crowded images (the rows the gallery may read): the report merges the summaries and reads
only a bounded number of rows, so the rows it never reads need not exist.

The report runs in a fresh Python process, which prints its own peak RSS, so the number is the
report's alone and not the generator's. It counts first (``numbers_s``: every number of the page,
summary.json and counts.csv, nothing drawn), then writes the whole report (``report_s``: charts
and galleries too, a cost that does not grow with the run); CPU seconds beside each, as wall
clock times on a shared machine vary with its load. tests/test_report.py runs the same code small.
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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
for extra in (str(REPO), str(REPO / "tests")):
    if extra not in sys.path:
        sys.path.append(extra)
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))

CHILD = """
import io, json, resource, sys, time
from pipeline.outputs.report import ReportOptions, write_report
from pipeline.outputs.report.stats import RunStats
from pipeline.outputs.rundata import RunData

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

options = ReportOptions(gallery=12, summaries=sys.argv[2] == "1")
t, c = time.perf_counter(), cpu()
stats = RunStats(RunData(sys.argv[1]), options)  # every number of the page, summary.json and counts.csv; no drawing
numbers = [stats.totals(), stats.histograms(), stats.groups(), stats.quality(), stats.class_group_csv(io.StringIO())]
stats.close()
numbers_s, numbers_cpu = time.perf_counter() - t, cpu() - c
t, c = time.perf_counter(), cpu()
result = write_report(sys.argv[1], None, options)  # the whole report: charts and galleries too
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_s": cpu() - c, "numbers_s": numbers_s, "numbers_cpu_s": numbers_cpu,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "objects": result["summary"]["totals"]["objects"], "shards": result["summary"]["shards"]}))
"""


def report(run: Path, summaries: bool = True) -> dict:
    """``autolabel report``'s code on ``run`` in a fresh process: seconds, peak RSS, what it counted."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), "1" if summaries else "0"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"report failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(folder: Path, num_images: int, mean_objects: float, images_per_part: int = 1024, reuse: bool = False,
              summaries: bool = False) -> dict:
    """A synthetic run of real rows, reported: by scanning (no summaries), or from its summaries."""
    from synthetic_run import write_synthetic_run

    run = Path(folder) / "run"
    t = time.perf_counter()
    if not (reuse and (run / "run.json").exists()):
        write_synthetic_run(str(run), num_images=num_images, mean_objects=mean_objects, images_per_part=images_per_part, seed=0,
                            summaries=summaries)
    write_s = time.perf_counter() - t
    num_images = sum(pq.read_metadata(p).num_rows for p in (run / "images").glob("*.parquet"))
    objects = sum(pq.read_metadata(p).num_rows for p in (run / "objects").glob("*.parquet"))
    size = sum(p.stat().st_size for p in run.rglob("*.parquet"))
    child = report(run, summaries)
    return {
        "images": num_images,
        "objects": objects,
        "summary_objects": child["objects"],
        "shards": child["shards"],
        "parquet_mib": round(size / 2**20, 1),
        "write_s": round(write_s, 1),
        **_times(child),
    }


def _times(child: dict) -> dict:
    return {
        "numbers_s": round(child["numbers_s"], 1),  # the counting alone, wall clock
        "numbers_cpu_s": round(child["numbers_cpu_s"], 1),
        "report_s": round(child["seconds"], 1),  # the whole report (charts, galleries), wall clock
        "report_cpu_s": round(child["cpu_s"], 1),
        "peak_rss_mib": round(child["peak_rss_kib"] / 1024, 1),
    }


# ------------------------------------------------------------------------------ simulated shards


def _templates(folder: Path, count: int, objects_per_shard: int, mean_objects: float) -> list[dict]:
    """``count`` real shards of about ``objects_per_shard`` objects (QA columns on), with their summaries."""
    from synthetic_run import write_synthetic_run

    per_part = max(1, round(objects_per_shard / mean_objects * 17 / 16))  # every 17th synthetic image is an error row
    write_synthetic_run(str(folder), num_images=count * per_part, mean_objects=mean_objects, images_per_part=per_part, seed=0, qa=True,
                        summaries=True)
    out = []
    for part in sorted((folder / "summaries").glob("*.parquet")):
        summary = pq.read_table(part)
        images, objects = pq.read_table(folder / "images" / part.name), pq.read_table(folder / "objects" / part.name)
        crowded = summary.filter(pc.field("kind") == "crowded").column("image_id")
        keep = pc.is_in(images.column("image_id"), value_set=crowded)
        out.append({
            "summary": summary,
            "images": images.filter(keep),  # the stand-in parts: the rows the gallery may read
            "objects": objects.filter(pc.is_in(objects.column("image_id"), value_set=crowded)),
            "counts": {k: int(pc.sum(summary.filter(pc.field("kind") == kind).column(col)).as_py() or 0)
                       for k, kind, col in (("images", "images", "images"), ("objects", "class", "objects"))},
        })
    return out


def _rename(table: pa.Table, shard: int, folder: str) -> pa.Table:
    """A template's rows as those of simulated shard ``shard``: its own image ids, URIs and folder."""
    prefix = pa.scalar(f"{shard:06x}")
    for name in ("image_id",):
        if name in table.column_names:
            col = table.column(name)
            new = pc.binary_join_element_wise(prefix, pc.utf8_slice_codeunits(col, 6), "")
            table = table.set_column(table.schema.get_field_index(name), name, pc.if_else(pc.is_null(col), col, new))
    for name in ("uri", "key", "value"):
        if name in table.column_names:
            col = table.column(name)
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pc.replace_substring(col, "file:///synthetic/", f"file:///synthetic/{folder}/"))
    if "shard" in table.column_names:
        col = table.column("shard")
        table = table.set_column(table.schema.get_field_index("shard"), "shard",
                                 pc.if_else(pc.is_null(col), col, pa.scalar(f"shard-{shard:06d}")))
    return table


def simulate(folder: Path, shards: int, objects_per_shard: int, templates: int = 2, mean_objects: float = 6.0,
             folders: int = 1000, reuse: bool = False) -> dict:
    """Summaries of ``shards`` simulated shards (copies of ``templates`` real ones), reported."""
    run = Path(folder) / "run"
    t = time.perf_counter()
    if not (reuse and (run / "run.json").exists()):
        made = _templates(Path(folder) / "templates", templates, objects_per_shard, mean_objects)
        for sub in ("images", "objects", "summaries"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        totals = {"images": 0, "objects": 0}
        for i in range(shards):
            template, name = made[i % len(made)], f"shard-{i:06d}.parquet"
            where = f"d{i * folders // shards:05d}"
            for sub in ("images", "objects", "summaries"):
                pq.write_table(_rename(template[sub if sub != "summaries" else "summary"], i, where), run / sub / name, compression="zstd")
            for k in totals:
                totals[k] += template["counts"][k]
        manifest = json.loads((Path(folder) / "templates" / "run.json").read_text())
        manifest.update(totals=totals, input={"uri": "simulated", "num_images": totals["images"], "num_shards": shards},
                        config={"input": {"uri": "simulated"}, "output": {"uri": str(run)}})
        (run / "run.json").write_text(json.dumps(manifest, indent=2))
    write_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in (run / "summaries").glob("*.parquet"))
    child = report(run)
    return {
        "shards": child["shards"],
        "simulated_objects": child["objects"],
        "summaries_mib": round(size / 2**20, 1),
        "write_s": round(write_s, 1),
        **_times(child),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--mean-objects", type=float, default=6.0)
    parser.add_argument("--summaries", action="store_true", help="write each part's summary, as the commit does, and report from them")
    parser.add_argument("--simulate", action="store_true", help="report the summaries of --shards simulated shards")
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--objects-per-shard", type=int, default=10_000)
    parser.add_argument("--folder", help="where to write the run (default: a temporary folder, removed afterwards)")
    parser.add_argument("--reuse", action="store_true", help="report on the run already in --folder instead of writing it again")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-scale-") as tmp:
        where = Path(args.folder or tmp)
        if args.simulate:
            result = simulate(where, args.shards, args.objects_per_shard, mean_objects=args.mean_objects, reuse=args.reuse)
        else:
            result = benchmark(where, args.images, args.mean_objects, reuse=args.reuse, summaries=args.summaries)
    result["machine"] = f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
