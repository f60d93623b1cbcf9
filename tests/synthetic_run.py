"""Write a synthetic run folder (run.json + Parquet in the sink's exact schemas) without any model.

Used by the report/export tests (small runs, real image files) and by
``benchmarks/report_scale.py`` (millions of object rows, tiny masks, no image files). Parts are
written like the sink writes them: ``images/X.parquet`` and ``objects/X.parquet`` with the
same name, one image's objects contiguous and in one part.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from pycocotools import mask as mask_utils

from pipeline.sink import IMAGES_SCHEMA, OBJECTS_SCHEMA
from pipeline.sources import image_id_for

CLASS_NAMES = {0: "person", 1: "bicycle", 2: "car", 3: "dog", 4: "cup", 5: "chair"}
ERROR_CLASSES = ("decode_error", "not_found", "read_error")
OBJECT_DEFAULTS = {"source": "detector", "prompt": "box", "candidate": 0, "status": "ok"}
IMAGE_DEFAULTS = {"num_prompt_errors": 0}


def _image_file(path: Path, h: int, w: int, rng: np.random.Generator) -> None:
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, rng.integers(0, 256))], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def _part_tables(start: int, count: int, n_objects: np.ndarray, sizes: list[tuple[int, int]], uris: list[str],
                 errors: np.ndarray, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
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
) -> dict:
    """Write a run; returns its totals. ``image_folder`` set: real PNG files are written and used as URIs;
    with ``image_uri_base`` too, the URIs are ``image_uri_base/<path under image_folder>`` instead (for
    images the caller uploads there, e.g. to an object store).

    Image sizes vary a little around ``image_size`` (h, w); every ``error_every``-th image is an
    error row; object counts per image are Poisson around ``mean_objects`` (some images have none).
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
    for start in range(0, num_images, images_per_part):
        count = min(images_per_part, num_images - start)
        images, objects = _part_tables(start, count, n_objects, sizes, uris, errors, rng)
        name = f"part-s{start:08d}.parquet"
        for sub, table in (("images", images), ("objects", objects)):
            with fs.open(f"{root}/{sub}/{name}", "wb") as f:
                pq.write_table(table, f, compression="zstd")
        totals["images"] += images.num_rows
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
    fs.pipe_file(f"{root}/run.json", json.dumps(manifest, indent=2).encode())
    return totals
