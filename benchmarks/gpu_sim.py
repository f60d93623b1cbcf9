"""Does the host keep a GPU busy? The segment stage's real code on a simulated GPU of known speed.

No GPU can be used here, so the device is a stand-in (benchmarks/gpu_standin.py: ``SimulatedSam``,
a named fake) that replaces only SAM's image encoder, mask decoder and the masks' reduction on the
device, with a device of ``--device-images-per-s`` (per image, minus ``--prompt-ms`` per prompt)
that, like a CUDA stream, queues work and lets the host go on until the batch's one copy to the
host, where it sleeps (releasing the GIL). Everything else is the segment actor's real code path
(``stages/segment.Segmenter.__call__``): decode threads, prompt grouping, quality control, RLE,
Arrow rows, fed Arrow batches of ``2 * sam.batch_size`` images as Ray Data feeds them, and each
output batch staged by the sink's ``write_batch`` in a separate process (a Ray task's process).

Four numbers per run, images per second of wall time over ``--passes`` passes of the workload:
``device_only`` (the device loop alone on decoded images: host work skipped), ``host_only``
(an instant device), ``pipeline`` (both), and ``host_core_ms_per_image`` (CPU time of everything
but the device, this process and the staging process, per image, in the pipeline run). Goal:
``pipeline >= 0.9 * min(device_only, host_only)``: the device never waits for host work that could
overlap. The same with quality control off under ``qa_off``.

    .venv/bin/python benchmarks/gpu_sim.py --json gpu-sim.json     # 32 full-HD photos, 10 boxes each, 170 images/s
    .venv/bin/python benchmarks/gpu_sim.py --device-images-per-s 40 --passes 2

The masks are not SAM's (its weights cannot be downloaded here): each box's low-res logits are
made from the photo (gpu_standin.object_logits) and reduced by the real code before the run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
for extra in (str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")):
    if extra not in sys.path:
        sys.path.insert(0, extra)
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-"))
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))


def workload(folder: Path, images: int, boxes: int, width: int, height: int, cache: Optional[Path] = None):
    """The photos as the segment stage receives them (Arrow rows: bytes, header facts, detector
    boxes) and the stand-in's answers for every box (from ``cache`` when it holds this workload's)."""
    import pickle

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from gpu_standin import Answers
    from gpu_throughput import make_images
    from pipeline.io.listing import image_id_for

    paths, all_boxes, _ = make_images(folder, images, width, height, boxes)
    key = (images, boxes, width, height)  # make_images is deterministic: the same photos and boxes
    cached = pickle.loads(cache.read_bytes()) if cache and cache.exists() else (None, None)
    hit = cached[0] == key
    answers = cached[1] if hit else Answers()
    rows = []
    for n, (path, b) in enumerate(zip(paths, all_boxes)):
        uri = f"file:///gpu-sim/{path.name}"  # the stage reads the row's bytes, never the URI
        if not hit:
            answers.add_image(uri, np.asarray(Image.open(path).convert("RGB")), b, seed=n)
        rows.append({"image_id": image_id_for(uri), "uri": uri, "shard_id": f"{n // 16:05d}", "shard_rows": 16,
                     "width": width, "height": height, "status": "ok", "error_class": None, "error": None, "note": None,
                     "data": path.read_bytes(), "det_boxes": b.tolist(), "det_class_ids": [k % 3 for k in range(len(b))],
                     "det_scores": [0.9] * len(b)})
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("shard_id", pa.string()), ("shard_rows", pa.int32()),
                        ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()), ("error_class", pa.string()),
                        ("error", pa.string()), ("note", pa.string()), ("data", pa.large_binary()),
                        ("det_boxes", pa.list_(pa.list_(pa.float32(), 4))), ("det_class_ids", pa.list_(pa.int32())),
                        ("det_scores", pa.list_(pa.float32()))])
    if cache and not hit:
        cache.write_bytes(pickle.dumps((key, answers)))
    return pa.Table.from_pylist(rows, schema=schema), answers


def _stage(batch, run_uri: str) -> float:
    """The sink's staging of one output batch (in the staging process); its CPU seconds."""
    from pipeline.run.sink import write_batch

    started = time.process_time()
    write_batch(batch, run_uri)
    return time.process_time() - started


def segmenter(answers, image_s: float, prompt_s: float, qa: bool, batch_size: int, host_threads: int, decode_threads: int):
    """The real ``Segmenter`` whose ``SamModel`` is the stand-in."""
    from gpu_standin import SimulatedSam
    from pipeline.config import QaConfig, SamConfig
    from pipeline.stages import segment

    segment.worker_logging = lambda: None  # this is not a Ray worker
    segment.SamModel = lambda cfg, cpu_threads=None, qa=None, expected_sha256=None: SimulatedSam(cfg, answers, image_s, prompt_s, qa)
    return segment.Segmenter(SamConfig(batch_size=batch_size, checkpoint="random"), {0: "person", 1: "car", 2: "dog"},
                             qa=QaConfig() if qa else None, host_threads=host_threads, decode_threads=decode_threads)


def run_stage(table, answers, args, image_s: float, prompt_s: float, qa: bool, staging, out: Path) -> dict:
    """``passes`` passes of the workload through the segment stage, in Ray Data's batches;
    wall time from the first batch to the last batch staged; CPU time of both processes."""
    stage = segmenter(answers, image_s, prompt_s, qa, args.batch_size, args.host_threads, args.decode_threads)
    size = 2 * args.batch_size  # what the job's map_batches gives a SAM actor
    batches = [table.slice(i, size) for i in range(0, table.num_rows, size)]
    staging.submit(_stage, stage(batches[0]), str(out / "warm-up")).result()  # warm-up: threads, imports, first calls
    stage.sam.stream.busy_s = stage.sam.busy_s = 0.0
    cpu, started = time.process_time(), time.perf_counter()
    # Ray Data's calls of the actor: ``--calls-per-actor`` at once (the job's max_concurrent_calls_per_actor)
    with ThreadPoolExecutor(args.calls_per_actor) as calls:
        outputs = [(n, calls.submit(stage, batch)) for n in range(args.passes) for batch in batches]
        staged = [staging.submit(_stage, output.result(), str(out / f"pass-{n}")) for n, output in outputs]
        stage_cpu = sum(f.result() for f in staged)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu + stage_cpu
    images = args.passes * table.num_rows
    objects = sum(len(b) for b in table.column("det_boxes").to_pylist()) * args.passes
    return {"images": images, "objects": objects, "seconds": round(wall, 3), "images_per_s": round(images / wall, 2),
            "host_core_ms_per_image": round(1000 * cpu / images, 2), "device_busy_fraction": round(stage.sam.stream.busy_s / wall, 3),
            "host_waits": stage.host.waits}


def device_only(table, answers, args, image_s: float, prompt_s: float, qa: bool) -> dict:
    """The device loop alone (``SamModel.segment_batch`` in the stage's encoder groups) on images
    decoded beforehand: no decoding, quality control, RLE or rows."""
    import numpy as np

    from pipeline.io.decode import decode_image

    stage = segmenter(answers, image_s, prompt_s, qa, args.batch_size, 0, 1)
    rows = table.select(["uri", "data", "det_boxes", "det_class_ids", "det_scores"]).to_pylist()
    images = [decode_image(r["data"])[0] for r in rows]
    prompts = [stage.prompts_for(r) for r in rows]
    groups = [list(range(i, min(i + args.batch_size, len(rows)))) for i in range(0, len(rows), args.batch_size)]
    stage.sam.segment_batch([images[i] for i in groups[0]], [prompts[i] for i in groups[0]], uris=[rows[i]["uri"] for i in groups[0]],
                            pending=True)  # warm-up
    started = time.perf_counter()
    for _ in range(args.passes):
        for group in groups:
            stage.sam.segment_batch([images[i] for i in group], [prompts[i] for i in group], uris=[rows[i]["uri"] for i in group],
                                    pending=True)
    wall = time.perf_counter() - started
    done = args.passes * len(rows)
    del images
    return {"images": done, "seconds": round(wall, 3), "images_per_s": round(done / wall, 2),
            "device_ms_per_image": round(1000 * (image_s + prompt_s * float(np.mean([len(p) for p in prompts]))), 3)}


def measure(table, answers, args, qa: bool, staging, out: Path) -> dict:
    """device-only, then ``--rounds`` rounds of host-only and pipeline runs (their order
    alternating, so a machine whose load drifts favours neither); medians of the rounds."""
    import statistics

    image_s, prompt_s = args.image_s, args.prompt_ms / 1000
    dev = device_only(table, answers, args, image_s, prompt_s, qa)
    hosts, boths = [], []
    for n in range(args.rounds):
        for mode in (("host", "both") if n % 2 == 0 else ("both", "host")):
            if mode == "host":
                hosts.append(run_stage(table, answers, args, 0.0, 0.0, qa, staging, out / f"host-{n}"))
            else:
                boths.append(run_stage(table, answers, args, image_s, prompt_s, qa, staging, out / f"both-{n}"))

    def median(runs, key):
        return round(statistics.median(r[key] for r in runs), 2)

    host, both = median(hosts, "images_per_s"), median(boths, "images_per_s")
    bound = min(dev["images_per_s"], host)
    return {
        "device_only_images_per_s": dev["images_per_s"], "host_only_images_per_s": host, "pipeline_images_per_s": both,
        "host_core_ms_per_image": median(boths, "host_core_ms_per_image"),
        "pipeline_over_bound": round(both / bound, 3), "meets_goal": both >= 0.9 * bound,
        "host_only_core_ms_per_image": median(hosts, "host_core_ms_per_image"),
        "device_busy_fraction": median(boths, "device_busy_fraction"),
        "rounds": {"host_only_images_per_s": [r["images_per_s"] for r in hosts],
                   "pipeline_images_per_s": [r["images_per_s"] for r in boths],
                   "device_loop_waited_for_host": [r["host_waits"] for r in boths]},
        "device_only": dev,
    }


def main(argv=None) -> int:
    from gpu_throughput import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--boxes", type=int, default=10, help="detector boxes per image")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--device-images-per-s", type=float, default=170.0,
                    help="the simulated GPU's speed on this workload (170: the README's H100 goal for hiera-large)")
    ap.add_argument("--prompt-ms", type=float, default=0.1, help="device ms per prompt (decoder + the mask's reduction); "
                    "the rest of 1/speed is the encoder's, per image")
    ap.add_argument("--batch-size", type=int, default=8, help="sam.batch_size")
    ap.add_argument("--host-threads", type=int, default=2)
    ap.add_argument("--decode-threads", type=int, default=4)
    ap.add_argument("--calls-per-actor", type=int, default=2, help="Ray Data's concurrent calls of the SAM actor (the job's: 2)")
    ap.add_argument("--passes", type=int, default=2, help="times the workload goes through each run (after a warm-up batch)")
    ap.add_argument("--rounds", type=int, default=7, help="host-only and pipeline runs each (medians reported)")
    ap.add_argument("--cache", type=Path, default=None, help="keep the stand-in's answers in this file (made once, ~1 min)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.image_s = 1.0 / args.device_images_per_s - args.boxes * args.prompt_ms / 1000
    if args.image_s <= 0:
        ap.error("--prompt-ms x --boxes leaves no device time for the encoder at that speed")

    spawn = multiprocessing.get_context("spawn")  # a fresh process, as a Ray task's, not a fork of this threaded one
    with tempfile.TemporaryDirectory(prefix="gpu-sim-") as tmp, ProcessPoolExecutor(1, mp_context=spawn) as staging:
        tmp = Path(tmp)
        started = time.perf_counter()
        table, answers = workload(tmp / "photos", args.images, args.boxes, args.width, args.height, args.cache)
        print(f"workload: {args.images} photos {args.width}x{args.height}, {args.boxes} boxes each, masks ready in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        result = {"machine": machine(), "load_average": list(os.getloadavg()),
                  "workload": {"images": args.images, "boxes_per_image": args.boxes, "width": args.width, "height": args.height,
                               "passes": args.passes, "rounds": args.rounds, "sam_batch_size": args.batch_size, "host_threads": args.host_threads,
                               "decode_threads": args.decode_threads,
                               "calls_per_actor": args.calls_per_actor},
                  "device": {"images_per_s": args.device_images_per_s, "encoder_ms_per_image": round(1000 * args.image_s, 3),
                             "ms_per_prompt": args.prompt_ms}}
        result.update(measure(table, answers, args, True, staging, tmp / "qa"))
        result["qa_off"] = measure(table, answers, args, False, staging, tmp / "qa-off")
        result["cores_per_gpu_at_device_speed"] = round(args.device_images_per_s * result["host_core_ms_per_image"] / 1000, 2)
        result["load_average_after"] = list(os.getloadavg())
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for name, part in (("qa on", result), ("qa off", result["qa_off"])):
        print(f"{name}: device only {part['device_only_images_per_s']:.1f}, host only {part['host_only_images_per_s']:.1f}, "
              f"pipeline {part['pipeline_images_per_s']:.1f} images/s ({part['pipeline_over_bound']:.2f} of the bound); "
              f"host {part['host_core_ms_per_image']:.1f} core-ms per image", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if result["meets_goal"] and result["qa_off"]["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
