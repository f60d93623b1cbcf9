"""SAM 2.1 throughput, three ways, in ONE process on the same images, boxes and model:

  (a) encoder only: the image encoder at ``--batch-size`` images per pass, on images already in
      memory (preprocessing on the device included): the bound no pipeline can beat;
  (b) the SAM 2 tutorial's loop: per image, decode the file, ``set_image`` + ``predict(box=...)``,
      threshold, ``pycocotools.mask.encode`` every mask;
  (c) this pipeline end to end through Ray (``autolabel run`` in-process: read, decode, SAM,
      RLE, Parquet), prompted by a manifest with the same boxes, so (b) and (c) do the same work.

It prints images/s of each and the ratios (c)/(a) and (c)/(b), and writes JSON. (c) is measured
in steady state, from the first images the sink staged to the last (the run.json fields
``progress.steady_images_per_second``), and also whole (Ray start and model loading included).

    make bench-gpu                                  # CUDA: hiera-tiny and hiera-large at 1024; CPU: tiny at 256
    .venv/bin/python benchmarks/gpu_throughput.py --sizes tiny --image-size 256 --images 16 --json out.json

Weights are random unless ``--checkpoint-dir`` holds the official files: speed does not depend
on their values, and the manifest fixes the number of boxes per image.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-"))
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_images(folder: Path, n: int, width: int, height: int, boxes_per_image: int, seed: int = 0):
    """n JPEGs of width x height made from real photos (shipped in packages), and a prompt
    manifest with ``boxes_per_image`` boxes for each."""
    import numpy as np
    from PIL import Image

    from conftest import real_photos

    rng = np.random.default_rng(seed)
    photos = list(real_photos().values())
    folder.mkdir(parents=True, exist_ok=True)
    lines, boxes = [], []
    for i in range(n):
        image = Image.fromarray(photos[i % len(photos)]).resize((width, height))
        if (i // len(photos)) % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        name = f"img_{i:05d}.jpg"
        image.save(folder / name, quality=90)
        corner = rng.uniform(0, 0.7, (boxes_per_image, 2)) * [width, height]
        size = rng.uniform(0.05, 0.3, (boxes_per_image, 2)) * [width, height]
        b = np.hstack([corner, np.minimum(corner + size, [width, height])]).round(1).astype(np.float32)
        boxes.append(b)
        lines.append({"uri": name, "objects": [{"object_key": str(k), "box": [float(v) for v in box]} for k, box in enumerate(b)]})
    manifest = folder / "prompts.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return sorted(folder.glob("*.jpg")), boxes, manifest


def checkpoint_for(size: str, folder: Path, checkpoint_dir):
    from model_factory import make_sam_checkpoint

    from pipeline.models.weights import SAM_MODELS

    name = SAM_MODELS[size][1]
    if checkpoint_dir and (Path(checkpoint_dir) / name).is_file():
        return Path(checkpoint_dir) / name, False
    path = folder / name
    if not path.exists():
        make_sam_checkpoint(path, size=size)
    return path, True


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def encoder_only(cfg, images, repeats: int) -> dict:
    """(a) ``SamModel._encode`` on decoded images, ``sam.batch_size`` per pass."""
    import torch

    from pipeline.sam.model import SamModel, autocast

    sam = SamModel(cfg)
    batch = cfg.batch_size
    groups = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images]
    with torch.inference_mode(), autocast(sam.dtype, sam.device):
        sam._encode(groups[0])  # warm-up (cuDNN autotuning, compile)
        _sync()
        started = time.perf_counter()
        done = 0
        for _ in range(repeats):
            for group in groups:
                sam._encode(group)
                done += len(group)
        _sync()
    seconds = time.perf_counter() - started
    del sam
    return {"images": done, "seconds": round(seconds, 3), "images_per_second": round(done / seconds, 3)}


def tutorial_loop(cfg, paths, boxes) -> dict:
    """(b) The SAM 2 tutorial, image by image, with the masks encoded as the objects table needs."""
    import numpy as np
    import torch
    from PIL import Image
    from pycocotools import mask as mask_utils
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from pipeline.models.weights import SAM_MODELS
    from pipeline.sam.model import autocast, resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = cfg.image_size
    model = build_sam2(SAM_MODELS[cfg.size][0], str(cfg.checkpoint), device=str(device),
                       hydra_overrides_extra=[] if s == 1024 else [f"++model.image_size={s}"])
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    data = [p.read_bytes() for p in paths]

    def one(raw, b):
        image = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        predictor.set_image(image)
        masks, _, _ = predictor.predict(box=b, multimask_output=False)
        masks = masks.reshape(len(b), *image.shape[:2]) > 0
        return mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))

    with torch.inference_mode(), autocast(resolve_dtype(cfg.dtype, device), device):
        one(data[0], boxes[0])  # warm-up
        _sync()
        started = time.perf_counter()
        objects = sum(len(one(raw, b)) for raw, b in zip(data, boxes))
        _sync()
    seconds = time.perf_counter() - started
    return {"images": len(data), "objects": objects, "seconds": round(seconds, 3), "images_per_second": round(len(data) / seconds, 3)}


def pipeline_run(cfg, manifest: Path, out: Path, num_cpus, shard_size: int, qa: bool) -> dict:
    """(c) ``autolabel run`` in this process (a local Ray), prompted by the manifest; ``qa``:
    quality control on (the tutorial loop computes none, so off compares the same work)."""
    from pipeline.config import load_config
    from pipeline.run.job import run

    overrides = [f"output.uri={out}", "prompts.source=manifest", f"prompts.manifest={manifest}", "report.enabled=false",
                 f"sam.size={cfg.size}", f"sam.checkpoint={cfg.checkpoint}", f"sam.image_size={cfg.image_size}",
                 f"sam.batch_size={cfg.batch_size}", f"sam.compile={str(cfg.compile).lower()}", f"sam.dtype={cfg.dtype}",
                 f"qa.enabled={str(qa).lower()}",
                 f"input.shard_size={shard_size}"]
    if num_cpus:
        overrides.append(f"ray.num_cpus={num_cpus}")
    started = time.perf_counter()
    manifest_out = run(load_config(None, overrides))
    seconds = time.perf_counter() - started
    assert manifest_out["status"] == "finished", manifest_out.get("error")
    progress = manifest_out["progress"]
    return {
        "images": manifest_out["totals"]["images"], "objects": manifest_out["totals"]["objects"],
        "seconds_whole": round(seconds, 3), "images_per_second_whole": round(manifest_out["totals"]["images"] / seconds, 3),
        "images_per_second": progress.get("steady_images_per_second"),
        "timings": manifest_out.get("timings"),
    }


def machine() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count()}
    try:
        out["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return out


def main(argv=None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "large"] if cuda else ["tiny"], choices=["tiny", "small", "base_plus", "large"])
    ap.add_argument("--image-size", type=int, default=1024 if cuda else 256, help="SAM input resolution (1024 is SAM's own)")
    ap.add_argument("--images", type=int, default=256 if cuda else 32)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--boxes", type=int, default=10, help="boxes per image")
    ap.add_argument("--batch-size", type=int, default=8 if cuda else 4, help="sam.batch_size")
    ap.add_argument("--encoder-repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="sam.compile=true for (a) and (c)")
    ap.add_argument("--qa", action="store_true", help="quality control on in (c) (off by default: (b) computes none)")
    ap.add_argument("--checkpoint-dir", default=None, help="folder with official sam2.1_hiera_*.pt (default: random weights)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    from pipeline.config import SamConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-throughput-"))
    paths, boxes, manifest = make_images(work / "images", args.images, args.width, args.height, args.boxes)
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in paths[: max(args.batch_size * 4, args.batch_size)]]
    report = {"machine": machine(), "args": vars(args), "results": []}
    print(json.dumps(report["machine"]), flush=True)
    for size in args.sizes:
        checkpoint, random_weights = checkpoint_for(size, work, args.checkpoint_dir)
        cfg = SamConfig(size=size, checkpoint=str(checkpoint), image_size=args.image_size, batch_size=args.batch_size,
                        compile=args.compile)
        row = {"size": size, "image_size": args.image_size, "dtype": "bfloat16" if cuda else "float32", "qa": args.qa,
               "random_weights": random_weights, "images": args.images, "boxes_per_image": args.boxes}
        row["encoder_only"] = encoder_only(cfg, decoded, args.encoder_repeats)
        row["tutorial_loop"] = tutorial_loop(cfg, paths, boxes)
        # shards (and so staged batches) of a few encoder batches: the steady rate is measured
        # from the first staged batch to the last
        row["pipeline"] = pipeline_run(cfg, manifest, work / f"run-{size}", args.num_cpus, 2 * args.batch_size, args.qa)
        a, b, c = (row[k]["images_per_second"] for k in ("encoder_only", "tutorial_loop", "pipeline"))
        row["pipeline_vs_encoder"] = round(c / a, 3) if a and c else None
        row["pipeline_vs_tutorial"] = round(c / b, 3) if b and c else None
        report["results"].append(row)
        print(f"sam {size} @{args.image_size} {row['dtype']}, {args.images} images {args.width}x{args.height}, {args.boxes} boxes each:\n"
              f"  (a) encoder only, batch {args.batch_size}: {a:.2f} images/s\n"
              f"  (b) SAM 2 tutorial loop:          {b:.2f} images/s\n"
              f"  (c) pipeline through Ray:         {c or 0:.2f} images/s steady "
              f"({row['pipeline']['images_per_second_whole']:.2f} whole, Ray start and model loading included)\n"
              f"  (c)/(a) = {row['pipeline_vs_encoder']}   (c)/(b) = {row['pipeline_vs_tutorial']}", flush=True)
        stages = (row["pipeline"]["timings"] or {}).get("stages", {})
        if stages:
            print("  pipeline stage time, ms per image: " + ", ".join(f"{k} {v['ms_per_image']}" for k, v in stages.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
