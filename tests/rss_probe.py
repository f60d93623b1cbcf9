"""Peak memory of one decode-ahead run, in a process of its own (tests/test_batching.py).

    python rss_probe.py decoder|segmenter BUDGET_MP JPEG [JPEG ...] [--sam CHECKPOINT --warm IMAGE]

Prints one JSON line: ``peak_mb`` (the process's peak resident memory during the run, above what
it held just before), and per image what came out (a digest of its pixels; or its object's COCO
RLE mask, with the mask's score apart), so runs with different budgets can be compared. The peak is the kernel's high-water mark (VmHWM), reset
just before the run through /proc/self/clear_refs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _reset_peak() -> int:
    """Reset the high-water mark to what the process holds now; return that."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _batch(paths: list[str]):
    import pyarrow as pa

    from pipeline.stages.read import read_batch

    return read_batch(pa.table({"uri": [f"file://{p}" for p in paths]}))


def run_decoder(budget_mp: float, paths: list[str], limit: int = 8) -> tuple[int, list[str]]:
    """The stages' decode loop with a consumer that is as slow as can be: before it takes each
    group, every image submitted so far has finished decoding, so all the budget allows is held."""
    from pipeline.io.decode import ImageDecoder, decode_budget, fit_groups

    batch = _batch(paths)
    rows = list(range(batch.num_rows))
    sizes = {i: w * h for i, (w, h) in enumerate(zip(batch.column("width").to_pylist(), batch.column("height").to_pylist()))}
    decoder = ImageDecoder(4)
    decoder.submit(batch.column("data")[0].as_py()).result()  # warm: libjpeg's buffers, the threads
    budget = decode_budget(budget_mp, 0)
    digests = []
    before = _reset_peak()
    ahead = decoder.ahead(batch, fit_groups(rows, sizes, limit, budget), sizes, budget)
    for group in ahead.groups:
        for future in list(ahead.futures.values()):
            future.result()
        images = [ahead.pop(i).result() for i in group]
        digests += [hashlib.sha256(memoryview(im)).hexdigest()[:16] for im in images]
        del images
        ahead.release(group)
    return _status("VmHWM") - before, digests


def run_segmenter(budget_mp: float, paths: list[str], checkpoint: str, warm: str) -> tuple[int, list[str], list]:
    """The SAM stage itself over the images, one box prompt each (the middle half of the image)."""
    from pipeline.config import SamConfig
    from pipeline.stages import segment
    from pipeline.stages.segment import Segmenter

    segment._actor_identity = lambda: (None, None)  # outside Ray: asking Ray who we are would start it
    cfg = SamConfig(checkpoint=checkpoint, image_size=256, batch_size=8, decode_ahead_mp=budget_mp)
    segmenter = Segmenter(cfg, {0: "thing"}, cpu_threads=2)
    segmenter(_prompted(_batch([warm])))  # warm: the model's first pass allocates its working memory
    batch = _prompted(_batch(paths))
    before = _reset_peak()
    out = segmenter(batch)
    peak = _status("VmHWM") - before
    assert out.column("status").to_pylist() == ["ok"] * batch.num_rows
    objects = [obj[0] for obj in out.column("objects").to_pylist()]  # one box each
    return peak, [o["mask"] for o in objects], [o["mask_score"] for o in objects]


def _prompted(batch):
    """Detector columns for a batch: one box, the middle half of each image."""
    import pyarrow as pa

    sizes = zip(batch.column("width").to_pylist(), batch.column("height").to_pylist())
    boxes = [[[w / 4, h / 4, 3 * w / 4, 3 * h / 4]] for w, h in sizes]
    batch = batch.append_column("det_boxes", pa.array(boxes, pa.list_(pa.list_(pa.float32(), 4))))
    batch = batch.append_column("det_class_ids", pa.array([[0]] * batch.num_rows, pa.list_(pa.int32())))
    return batch.append_column("det_scores", pa.array([[0.9]] * batch.num_rows, pa.list_(pa.float32())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("decoder", "segmenter"))
    parser.add_argument("budget_mp", type=float)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--sam", help="SAM checkpoint (segmenter)")
    parser.add_argument("--warm", help="a small image to warm the model up with (segmenter)")
    args = parser.parse_args()
    scores = None
    if args.mode == "decoder":
        peak, digests = run_decoder(args.budget_mp, args.paths)
    else:
        peak, digests, scores = run_segmenter(args.budget_mp, args.paths, args.sam, args.warm)
    print(json.dumps({"peak_mb": peak / 2**20, "outputs": digests, "scores": scores}))


if __name__ == "__main__":
    main()
