"""Video tracking throughput and memory: this pipeline's track stage against SAM 2's tutorial loop.

Both track the same objects (box prompts on frame 0) through the same clip with the same model:

  (a) the tutorial: decode the video into a folder of JPEG frames (as the SAM 2 notebook does with
      ``ffmpeg -q:v 2``; here PyAV + Pillow at quality 95), ``init_state`` on the folder (it
      loads every frame up front), ``add_new_points_or_box`` per object, ``propagate_in_video``,
      masks thresholded at 0 and copied to the host;
  (b) this pipeline's track stage on the video file itself (``pipeline.stages.track.track_video``:
      streaming decode, a bounded frame source, pruned tracking memory, COCO RLE and the output
      rows), the same prompts given as a manifest line.

It prints frames/s of each, then the peak resident memory of (a) and (b) against video length,
each length in a fresh process, and writes JSON.

    .venv/bin/python benchmarks/video_throughput.py --json video.json
    .venv/bin/python benchmarks/video_throughput.py --frames 120 --lengths 30,300 --image-size 1024

Weights are random (speed and memory do not depend on their values) unless ``--checkpoint`` is
given. Clips are the tests' lossless synthetic clips (tests/video_clips.py: moving shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-"))
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))


def _status(key: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _prompts(width: int, height: int) -> list[list[float]]:
    from video_clips import shape_boxes

    return [[float(v) for v in b] for b in shape_boxes(0, width, height)]


def tutorial(predictor, clip: str, boxes, folder: Path, quality: int = 95) -> dict:
    """SAM 2's notebook loop on ``clip``: a JPEG folder, init_state, one box per object, propagate."""
    import av
    import torch

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with av.open(clip) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frame.to_image().save(folder / f"{i:05d}.jpg", quality=quality)
    extracted = time.perf_counter()
    masks = 0
    with torch.inference_mode():
        state = predictor.init_state(str(folder))
        for obj_id, box in enumerate(boxes, start=1):
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, box=box)
        frames = 0
        for _, ids, logits in predictor.propagate_in_video(state):
            masks += int((logits[:, 0] > 0.0).cpu().numpy().any(axis=(1, 2)).sum())
            frames += 1
    done = time.perf_counter()
    return {"frames": frames, "seconds": done - start, "jpeg_seconds": extracted - start, "frames_per_s": frames / (done - start),
            "masks": masks}


def pipeline(predictor, clip: str, boxes) -> dict:
    """This pipeline's track stage on the file: decode, track, RLE, rows."""
    import torch

    from pipeline.stages.track import track_video

    objects = [{"object_key": f"shape-{i}", "frame": 0, "box": b} for i, b in enumerate(boxes, start=1)]
    start = time.perf_counter()
    with torch.inference_mode():
        rows = track_video(predictor, clip, "bench", prompts_json=json.dumps(objects))
    seconds = time.perf_counter() - start
    if rows.video["status"] != "ok":
        raise SystemExit(f"track_video failed: {rows.video}")
    frames = len(rows.images)
    return {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds, "masks": len(rows.objects)}


def build(checkpoint: str, image_size: int, device: str):
    from pipeline.models.weights import resolve_sam_checkpoint
    from pipeline.sam.video import build_video_predictor

    return build_video_predictor(resolve_sam_checkpoint("tiny", checkpoint), image_size, device)


def make_clip(folder: Path, frames: int, width: int, height: int) -> str:
    from video_clips import clip_frames, write_clip

    path = folder / f"clip-{frames}-{width}x{height}.mp4"
    if not path.exists():
        write_clip(path, clip_frames(frames, width, height))
    return str(path)


def one_memory_run(args) -> None:
    """In a fresh process: peak RSS above the loaded model while one method tracks one clip."""
    import torch

    torch.set_num_threads(args.threads)
    predictor = build(args.checkpoint, args.image_size, args.device)
    boxes = _prompts(args.width, args.height)
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := now: the peak from here on
    with tempfile.TemporaryDirectory() as tmp:
        result = tutorial(predictor, args.clip, boxes, Path(tmp) / "jpg") if args.method == "tutorial" else pipeline(predictor, args.clip, boxes)
    result["peak_mb"] = (_status("VmHWM") - base) / 2**20
    print(json.dumps(result))


def memory(args, clips: dict) -> list[dict]:
    rows = []
    for length, clip in clips.items():
        for method in ("pipeline", "tutorial"):
            cmd = [sys.executable, __file__, "--_memory-run", method, "--clip", clip, "--checkpoint", args.checkpoint,
                   "--image-size", str(args.image_size), "--device", args.device, "--threads", str(args.threads),
                   "--width", str(args.width), "--height", str(args.height)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"method": method, "frames": length, "peak_mb": round(result["peak_mb"], 1),
                         "frames_per_s": round(result["frames_per_s"], 2)})
            print(f"  {method:9s} {length:5d} frames: peak +{result['peak_mb']:7.1f} MB  {result['frames_per_s']:.2f} frames/s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=48, help="frames of the throughput clip")
    p.add_argument("--lengths", default="30,150", help="clip lengths (frames) for the memory runs; empty: none")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--image-size", type=int, default=256, help="SAM input size (1024 is the model's own)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--checkpoint", default=None, help="a SAM 2.1 tiny checkpoint (default: random weights, saved once)")
    p.add_argument("--json", default=None)
    p.add_argument("--_memory-run", dest="memory_run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--clip", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_run:
        args.method = args.memory_run
        return one_memory_run(args)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="video-bench-"))
    if args.checkpoint is None:
        from model_factory import make_sam_checkpoint

        args.checkpoint = str(make_sam_checkpoint(work / "sam2.1_hiera_tiny.pt"))
    predictor = build(args.checkpoint, args.image_size, args.device)
    boxes = _prompts(args.width, args.height)
    clip = make_clip(work, args.frames, args.width, args.height)
    print(f"{args.frames} frames of {args.width}x{args.height}, {len(boxes)} objects, hiera-tiny at {args.image_size} on {args.device}",
          flush=True)
    pipeline(predictor, make_clip(work, 4, args.width, args.height), boxes)  # warm up
    ours = pipeline(predictor, clip, boxes)
    theirs = tutorial(predictor, clip, boxes, work / "jpg")
    print(f"  tutorial (JPEG folder + init_state + propagate): {theirs['frames_per_s']:.2f} frames/s "
          f"({theirs['jpeg_seconds']:.1f} s of it writing JPEGs)")
    print(f"  pipeline (track_video on the file, rows and RLE):  {ours['frames_per_s']:.2f} frames/s")
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    print("peak resident memory above the loaded model, by video length:", flush=True)
    mem = memory(args, {n: make_clip(work, n, args.width, args.height) for n in lengths})
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "device": args.device,
                    "torch_threads": args.threads, "load_avg_1m": os.getloadavg()[0]},
        "clip": {"frames": args.frames, "width": args.width, "height": args.height, "objects": len(boxes)},
        "image_size": args.image_size, "tutorial": theirs, "pipeline": ours,
        "pipeline_over_tutorial": ours["frames_per_s"] / theirs["frames_per_s"], "memory": mem,
    }
    print(f"pipeline / tutorial: {result['pipeline_over_tutorial']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
