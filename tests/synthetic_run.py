"""Write a synthetic run folder (run.json + Parquet in the sink's exact schemas) without any model.

Used by the report/export/review tests (small runs, real image files) and by
``benchmarks/report_scale.py`` (millions of object rows, tiny masks, no image files). Parts are
written like the sink writes them: ``images/X.parquet`` and ``objects/X.parquet`` with the
same name, one image's objects contiguous and in one part.

``qa=True`` writes a run with the quality-control columns of the segment stage (issue 13's
contract): masks are ellipses in their boxes, some with an island outside the box or a hole, the
metrics (``box_iou``, ``outside_box``, ``regions``, ``largest_region``, ``hole_area``) computed from
the masks with OpenCV, ``stability`` drawn at random, ``flags``/``needs_review`` from the thresholds
in run.json's ``qa``, and some masks repeated as ``status=duplicate`` rows (``duplicate_of`` the
object kept), which ``num_objects`` and ``class_counts`` do not count. Without it the output is
exactly what it always was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from pycocotools import mask as mask_utils

from pipeline.io.listing import image_id_for
from pipeline.run.tables import IMAGES_SCHEMA, OBJECTS_SCHEMA

CLASS_NAMES = {0: "person", 1: "bicycle", 2: "car", 3: "dog", 4: "cup", 5: "chair"}
ERROR_CLASSES = ("decode_error", "not_found", "read_error")
OBJECT_DEFAULTS = {"source": "detector", "prompt": "box", "candidate": 0, "status": "ok"}
IMAGE_DEFAULTS = {"num_prompt_errors": 0}


def _image_file(path: Path, h: int, w: int, rng: np.random.Generator) -> None:
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, rng.integers(0, 256))], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


QA_THRESHOLDS = {"min_mask_score": 0.5, "min_stability": 0.8, "min_box_iou": 0.7, "max_regions": 1, "min_area": 30}
QA_OBJECT_FIELDS = [
    pa.field("stability", pa.float32()), pa.field("box_iou", pa.float32()), pa.field("outside_box", pa.float32()),
    pa.field("regions", pa.int32()), pa.field("largest_region", pa.float32()), pa.field("hole_area", pa.int64()),
    pa.field("flags", pa.list_(pa.string())), pa.field("needs_review", pa.bool_()), pa.field("duplicate_of", pa.int32()),
]
QA_OBJECTS_SCHEMA = pa.schema([*OBJECTS_SCHEMA, *(f for f in QA_OBJECT_FIELDS if f.name not in OBJECTS_SCHEMA.names)])
QA_IMAGES_SCHEMA = IMAGES_SCHEMA if "num_flagged" in IMAGES_SCHEMA.names else pa.schema([*IMAGES_SCHEMA, pa.field("num_flagged", pa.int32())])


def qa_metrics(mask: np.ndarray, box: list[float]) -> dict:
    """The shape and box metrics of one mask, as the contract defines them (OpenCV, 8-connectivity)."""
    import cv2

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    area = int(mask.sum())
    ys, xs = np.nonzero(mask)
    if area:
        tight = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        inter = max(0, min(tight[2], x1) - max(tight[0], x0)) * max(0, min(tight[3], y1) - max(tight[1], y0))
        union = (tight[2] - tight[0]) * (tight[3] - tight[1]) + (x1 - x0) * (y1 - y0) - inter
        inside = int(mask[y0:y1, x0:x1].sum())
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        regions, largest = n - 1, stats[1:, cv2.CC_STAT_AREA].max() / area
    else:
        inter, union, inside, regions, largest = 0, 1, 0, 0, 0.0
    background = (~mask).astype(np.uint8)
    n, labels = cv2.connectedComponents(background, connectivity=8)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    holes = int(sum((labels == k).sum() for k in range(1, n) if k not in border))
    return {"box_iou": inter / union, "outside_box": (area - inside) / area if area else 0.0, "regions": int(regions),
            "largest_region": float(largest), "hole_area": holes}


def qa_flags(row: dict) -> list[str]:
    t = QA_THRESHOLDS
    flags = []
    if row["mask_score"] < t["min_mask_score"]:
        flags.append("low_score")
    if row["stability"] < t["min_stability"]:
        flags.append("unstable")
    if row["box_iou"] < t["min_box_iou"]:
        flags.append("leaks_box")
    if row["regions"] > t["max_regions"]:
        flags.append("fragmented")
    if row["area"] < t["min_area"]:
        flags.append("tiny")
    return flags


def _qa_objects(image_id: str, uri: str, h: int, w: int, n: int, class_ids: np.ndarray, det: np.ndarray,
                rng: np.random.Generator) -> list[dict]:
    """One image's objects with QA columns: ellipse masks (some with an island or a hole), metrics, flags, duplicates."""
    rows = []
    for j in range(n):
        x0, y0 = int(rng.integers(0, max(w - 8, 1))), int(rng.integers(0, max(h - 8, 1)))
        x1, y1 = min(w, x0 + int(rng.integers(6, max(w // 2, 8)))), min(h, y0 + int(rng.integers(6, max(h // 2, 8))))
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        mask = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
        kind = rng.random()
        if kind < 0.15:  # a stray island outside the box
            ix, iy = int(rng.integers(0, w - 3)), int(rng.integers(0, h - 3))
            mask[iy:iy + 3, ix:ix + 3] = True
        elif kind < 0.25 and rx > 3 and ry > 3:  # a hole in the middle
            mask[int(cy) - 1:int(cy) + 1, int(cx) - 1:int(cx) + 1] = False
        if not mask.any():
            mask[y0, x0] = True
        box = [float(x0), float(y0), float(x1), float(y1)]
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        row = {"image_id": image_id, "uri": uri, "object_id": j, "class_id": int(class_ids[j]), "class_name": CLASS_NAMES[int(class_ids[j])],
               "det_score": float(det[j]), "mask_score": float(rng.uniform(0.4, 1.0)), "box": box, "area": int(mask.sum()),
               "mask": {"size": [h, w], "counts": rle["counts"].decode("ascii")}, "stability": float(rng.uniform(0.75, 1.0)),
               **qa_metrics(mask, box), "duplicate_of": None, "status": "ok"}
        row["flags"] = qa_flags(row)
        rows.append(row)
    kept = list(rows)
    for original in kept:  # now and then SAM gives one object twice: the second is marked, not dropped
        if len(kept) >= 2 and rng.random() < 0.2:
            dup = dict(original, object_id=len(rows), status="duplicate", duplicate_of=original["object_id"],
                       mask_score=float(original["mask_score"]) * 0.9, det_score=float(original["det_score"]) * 0.9,
                       flags=["duplicate"])
            rows.append(dup)
    for row in rows:
        row["needs_review"] = bool(row["flags"])
    return rows


def _part_tables(start: int, count: int, n_objects: np.ndarray, sizes: list[tuple[int, int]], uris: list[str],
                 errors: np.ndarray, rng: np.random.Generator, qa_rng: Optional[np.random.Generator] = None) -> tuple[pa.Table, pa.Table]:
    if qa_rng is not None:
        return _qa_part_tables(start, count, n_objects, sizes, uris, errors, rng, qa_rng)
    image_rows, obj_cols = [], {k: [] for k in OBJECTS_SCHEMA.names}
    for k in range(count):
        i = start + k
        uri, (h, w) = uris[i], sizes[i]
        image_id = image_id_for(uri)
        if errors[i]:
            cls = ERROR_CLASSES[i % len(ERROR_CLASSES)]
            image_rows.append(dict(image_id=image_id, uri=uri, width=None, height=None, status="error", error_class=cls,
                                   error=f"{cls}: synthetic failure", num_objects=0, class_counts=[], shard_id=f"s{start:08d}"))
            continue
        n = int(n_objects[i])
        # Boxes of random size inside the image; the mask is the box, so RLEs stay tiny.
        x0 = rng.integers(0, max(w - 2, 1), n)
        y0 = rng.integers(0, max(h - 2, 1), n)
        bw = np.minimum(rng.integers(1, max(w // 2, 2), n), w - x0)
        bh = np.minimum(rng.integers(1, max(h // 2, 2), n), h - y0)
        rles = mask_utils.frPyObjects(np.stack([x0, y0, bw, bh], 1).astype(np.float64), h, w) if n else []
        areas = mask_utils.area(rles) if n else []
        # Skewed class frequencies, like real data; class ids in score order per image.
        class_ids = rng.choice(len(CLASS_NAMES), n, p=np.array([0.4, 0.1, 0.25, 0.1, 0.1, 0.05]))
        det = np.sort(rng.uniform(0.05, 1.0, n).astype(np.float32))[::-1]
        counts: dict[int, int] = {}
        for j in range(n):
            counts[int(class_ids[j])] = counts.get(int(class_ids[j]), 0) + 1
            obj_cols["image_id"].append(image_id)
            obj_cols["uri"].append(uri)
            obj_cols["object_id"].append(j)
            obj_cols["class_id"].append(int(class_ids[j]))
            obj_cols["class_name"].append(CLASS_NAMES[int(class_ids[j])])
            obj_cols["det_score"].append(float(det[j]))
            obj_cols["mask_score"].append(float(rng.uniform(0.3, 1.0)))
            obj_cols["box"].append([float(x0[j]), float(y0[j]), float(x0[j] + bw[j]), float(y0[j] + bh[j])])
            obj_cols["area"].append(int(areas[j]))
            obj_cols["mask"].append({"size": [h, w], "counts": rles[j]["counts"].decode("ascii")})
        image_rows.append(dict(
            image_id=image_id, uri=uri, width=w, height=h, status="ok", error_class=None, error=None, num_objects=n,
            class_counts=[{"class_id": c, "class_name": CLASS_NAMES[c], "count": counts[c]} for c in sorted(counts)],
            shard_id=f"s{start:08d}",
        ))
    n_rows = len(obj_cols["image_id"])
    for name in OBJECTS_SCHEMA.names:  # columns this writer does not model get the sink's values for detector objects
        if not obj_cols[name] and n_rows:
            obj_cols[name] = [OBJECT_DEFAULTS.get(name)] * n_rows
    for row in image_rows:
        for name in IMAGES_SCHEMA.names:
            row.setdefault(name, IMAGE_DEFAULTS.get(name))
    return pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA), pa.Table.from_pydict(obj_cols, schema=OBJECTS_SCHEMA)


def _qa_part_tables(start, count, n_objects, sizes, uris, errors, rng, qa_rng) -> tuple[pa.Table, pa.Table]:
    image_rows, object_rows = [], []
    for k in range(count):
        i = start + k
        uri, (h, w) = uris[i], sizes[i]
        image_id = image_id_for(uri)
        if errors[i]:
            cls = ERROR_CLASSES[i % len(ERROR_CLASSES)]
            image_rows.append(dict(image_id=image_id, uri=uri, width=None, height=None, status="error", error_class=cls,
                                   error=f"{cls}: synthetic failure", num_objects=0, class_counts=[], shard_id=f"s{start:08d}",
                                   num_flagged=None))
            continue
        n = int(n_objects[i])
        class_ids = rng.choice(len(CLASS_NAMES), n, p=np.array([0.4, 0.1, 0.25, 0.1, 0.1, 0.05]))
        det = np.sort(rng.uniform(0.05, 1.0, n).astype(np.float32))[::-1]
        rows = _qa_objects(image_id, uri, h, w, n, class_ids, det, qa_rng)
        counts: dict[int, int] = {}
        for row in rows:
            if row["status"] == "ok":
                counts[row["class_id"]] = counts.get(row["class_id"], 0) + 1
        object_rows += rows
        image_rows.append(dict(
            image_id=image_id, uri=uri, width=w, height=h, status="ok", error_class=None, error=None, num_objects=n,
            class_counts=[{"class_id": c, "class_name": CLASS_NAMES[c], "count": counts[c]} for c in sorted(counts)],
            shard_id=f"s{start:08d}", num_flagged=sum(r["needs_review"] for r in rows),
        ))
    for row in object_rows:
        for name in QA_OBJECTS_SCHEMA.names:
            row.setdefault(name, OBJECT_DEFAULTS.get(name))
    for row in image_rows:
        for name in QA_IMAGES_SCHEMA.names:
            row.setdefault(name, IMAGE_DEFAULTS.get(name))
    return pa.Table.from_pylist(image_rows, schema=QA_IMAGES_SCHEMA), pa.Table.from_pylist(object_rows, schema=QA_OBJECTS_SCHEMA)


def write_synthetic_run(
    run_uri: str,
    num_images: int,
    mean_objects: float = 5.0,
    images_per_part: int = 64,
    image_size: tuple[int, int] = (48, 64),
    error_every: int = 17,
    image_folder: Optional[Path] = None,
    seed: int = 0,
    storage_options: Optional[dict] = None,
    image_uri_base: Optional[str] = None,
    qa: bool = False,
    legacy: bool = False,
    summaries: bool = False,
) -> dict:
    """Write a run; returns its totals. ``image_folder`` set: real PNG files are written and used as URIs;
    with ``image_uri_base`` too, the URIs are ``image_uri_base/<path under image_folder>`` instead (for
    images the caller uploads there, e.g. to an object store).

    Image sizes vary a little around ``image_size`` (h, w); every ``error_every``-th image is an
    error row; object counts per image are Poisson around ``mean_objects`` (some images have none).
    ``qa``: with the quality-control columns filled in (see the module's doc); otherwise they are null.
    ``legacy``: without the quality-control columns at all, as runs made before them were written.
    ``summaries``: with a shard summary beside each part, as the sink's commit writes it (without, the
    run is like one made before summaries).
    """
    rng = np.random.default_rng(seed)
    fs, root = url_to_fs(run_uri, **(storage_options or {}))
    root = root.rstrip("/")
    for sub in ("images", "objects"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    h0, w0 = image_size
    sizes = [(int(h0 + rng.integers(0, 9)), int(w0 + rng.integers(0, 9))) for _ in range(num_images)]
    errors = np.array([error_every and (i % error_every == error_every - 1) for i in range(num_images)], bool)
    n_objects = rng.poisson(mean_objects, num_images)
    uris = []
    for i in range(num_images):
        folder = ("site-a", "site-b", "site-c")[i % 3]
        if image_folder is not None:
            path = Path(image_folder) / folder / f"img_{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not errors[i]:
                _image_file(path, *sizes[i], rng)
            else:
                path.write_bytes(b"not an image")
            uris.append(f"{image_uri_base.rstrip('/')}/{folder}/{path.name}" if image_uri_base else f"file://{path}")
        else:
            uris.append(f"file:///synthetic/{folder}/img_{i:07d}.png")
    totals = {"images": 0, "ok": 0, "error": 0, "errors_by_class": {}, "objects": 0, "objects_by_class": {}}
    if qa:
        totals.update(flagged=0, flagged_by_reason={})
    qa_rng = np.random.default_rng(seed + 7919) if qa else None  # apart from rng: without qa the run is as it always was
    for start in range(0, num_images, images_per_part):
        count = min(images_per_part, num_images - start)
        images, objects = _part_tables(start, count, n_objects, sizes, uris, errors, rng, qa_rng)
        name = f"shard-{start // images_per_part:06d}.parquet"  # the sink's names (run --overwrite recognises them)
        if legacy:
            objects = objects.drop_columns([f.name for f in QA_OBJECT_FIELDS if f.name in objects.column_names])
            images = images.drop_columns([c for c in ("num_flagged",) if c in images.column_names])
        tables = [("images", images), ("objects", objects)]
        if summaries:
            from pipeline.outputs.report.summaries import shard_summary

            tables.append(("summaries", shard_summary(images, objects, [], name.removesuffix(".parquet"))))
        for sub, table in tables:
            fs.makedirs(f"{root}/{sub}", exist_ok=True)
            with fs.open(f"{root}/{sub}/{name}", "wb") as f:
                pq.write_table(table, f, compression="zstd")
        totals["images"] += images.num_rows
        if qa:
            for row in objects.select(["status", "flags"]).to_pylist():
                totals["flagged"] += bool(row["flags"])
                for reason in row["flags"]:
                    totals["flagged_by_reason"][reason] = totals["flagged_by_reason"].get(reason, 0) + 1
            objects = objects.filter(pa.compute.field("status") == "ok")  # for the totals below: duplicates are no objects
        totals["objects"] += objects.num_rows
        for name_, n in zip(*np.unique(objects.column("class_name").to_numpy(zero_copy_only=False), return_counts=True)):
            totals["objects_by_class"][str(name_)] = totals["objects_by_class"].get(str(name_), 0) + int(n)
    totals["error"] = int(errors.sum())
    totals["errors_by_class"] = {}
    for i in np.flatnonzero(errors):
        cls = ERROR_CLASSES[i % len(ERROR_CLASSES)]
        totals["errors_by_class"][cls] = totals["errors_by_class"].get(cls, 0) + 1
    totals["ok"] = totals["images"] - totals["error"]
    manifest = {
        "status": "finished",
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T01:00:00+00:00",
        "duration_s": 3600.0,
        "images_per_second": round(num_images / 3600.0, 4),
        "config": {"input": {"uri": "synthetic"}, "output": {"uri": run_uri}},
        "random_weights": False,
        "versions": {"autolabel": "synthetic"},
        "models": {"sam": {"size": "tiny", "checkpoint": "synthetic"},
                   "detector": {"weights": "synthetic", "class_names": {str(k): v for k, v in CLASS_NAMES.items()}}},
        "input": {"uri": "synthetic", "num_images": num_images, "num_shards": -(-num_images // images_per_part)},
        "totals": totals,
    }
    if qa:
        manifest["qa"] = {"enabled": True, **QA_THRESHOLDS}
    fs.pipe_file(f"{root}/run.json", json.dumps(manifest, indent=2).encode())
    return totals
