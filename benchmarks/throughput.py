"""Images/s of the SAM 2 tutorial's naive loop vs this pipeline, same machine, same models, same images.

    .venv/bin/python benchmarks/throughput.py --images 24            # random weights (offline)
    .venv/bin/python benchmarks/throughput.py --images 200 --sam-checkpoint checkpoints/sam2.1_hiera_tiny.pt \
        --detector-weights checkpoints/yolov8n.pt                    # real weights, e.g. on a GPU box

(a) naive: per image, YOLO.predict, then SAM2ImagePredictor.set_image + predict(box=boxes).
(b) pipeline: `autolabel run` on the same folder (local Ray started in-process, included in the time).
Both timings include loading the models. Prints images/s for both and their ratio.
"""
from __future__ import annotations

import argparse
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
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    from conftest import real_photos

    photos = list(real_photos().values())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(photos[i % len(photos)]).save(path, quality=92)
        paths.append(path)
    return paths


def naive_loop(paths, sam_ckpt, det_weights, args) -> float:
    import numpy as np
    import torch
    from PIL import Image
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from ultralytics import YOLO

    from pipeline.models.weights import SAM_MODELS

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    yolo = YOLO(det_weights)
    s = args.sam_image_size
    model = build_sam2(SAM_MODELS[args.sam_size][0], sam_ckpt, device=device, hydra_overrides_extra=[] if s == 1024 else [f"++model.image_size={s}"])
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    objects = 0
    for path in paths:
        boxes = yolo.predict(str(path), conf=args.conf, max_det=args.max_det, imgsz=args.imgsz, verbose=False)[0].boxes.xyxy.cpu().numpy()
        image = np.array(Image.open(path).convert("RGB"))
        if len(boxes):
            with torch.inference_mode(), autocast:
                predictor.set_image(image)
                masks, _, _ = predictor.predict(box=boxes, multimask_output=False)
            objects += len(boxes)
    elapsed = time.perf_counter() - start
    print(f"naive loop: {len(paths)} images, {objects} objects in {elapsed:.1f} s")
    return elapsed


def pipeline_run(folder, out, sam_ckpt, det_weights, args) -> float:
    from pipeline.config import load_config
    from pipeline.run.job import run

    cfg = load_config(None, [
        f"input.uri={folder}", f"output.uri={out}", f"sam.checkpoint={sam_ckpt}", f"detector.weights={det_weights}",
        f"sam.size={args.sam_size}", f"sam.image_size={args.sam_image_size}", f"detector.conf={args.conf}",
        f"detector.max_det={args.max_det}", f"detector.imgsz={args.imgsz}", "output.overwrite=true",
    ])
    start = time.perf_counter()
    manifest = run(cfg)
    elapsed = time.perf_counter() - start
    print(f"pipeline:   {manifest['totals']['images']} images, {manifest['totals']['objects']} objects in {elapsed:.1f} s")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--sam-size", default="tiny")
    parser.add_argument("--sam-image-size", type=int, default=1024)
    parser.add_argument("--sam-checkpoint", help="default: random weights saved in the official format")
    parser.add_argument("--detector-weights", help="default: random YOLOv8n saved by YOLO.save")
    parser.add_argument("--conf", type=float, default=0.04)
    parser.add_argument("--max-det", type=int, default=4)
    parser.add_argument("--imgsz", type=int, default=640)
    args = parser.parse_args()

    import torch

    from model_factory import make_sam_checkpoint, make_yolo_checkpoint

    work = Path(tempfile.mkdtemp(prefix="autolabel-bench-"))
    paths = make_images(work / "images", args.images)
    sam_ckpt = args.sam_checkpoint or str(make_sam_checkpoint(work / "sam.pt", args.sam_size))
    det_weights = args.detector_weights or str(make_yolo_checkpoint(work / "yolo.pt"))
    naive = naive_loop(paths, sam_ckpt, det_weights, args)
    piped = pipeline_run(work / "images", work / "run", sam_ckpt, det_weights, args)
    machine = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    result = {
        "images": args.images, "sam": f"{args.sam_size}@{args.sam_image_size}", "machine": machine,
        "naive_images_per_s": round(args.images / naive, 3), "pipeline_images_per_s": round(args.images / piped, 3),
        "pipeline_over_naive": round(naive / piped, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
