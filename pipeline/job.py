"""The Ray job: list -> read+decode -> detect (actor pool) -> segment (actor pool) -> sink.

Everything that can be checked without a cluster (config, weights, output folder, input
listing) is checked before Ray starts, so a mistake costs seconds, not a cluster allocation.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterator, Optional

from fsspec.core import url_to_fs

from .config import ConfigError, RunConfig, uses_random_weights
from .models import SamWeights, WeightsError, resolve_detector_weights, resolve_sam_checkpoint, weights_identity
from .segment import resolve_dtype
from .sources import (
    SHARDS_DIR, ShardListing, SourceError, WorkItem, input_format, iter_image_uris, iter_manifest, iter_tar_uris, no_images,
    write_shards,
)

log = logging.getLogger("autolabel")

# Driver environment variables that actors need too (Ray does not forward the driver's env).
FORWARDED_ENV = (
    "YOLO_OFFLINE", "YOLO_CONFIG_DIR", "MPLCONFIGDIR", "HF_HOME", "HF_HUB_OFFLINE",
    "AUTOLABEL_CHECKPOINTS", "AUTOLABEL_CACHE",
)
RUN_FOLDERS = ("images", "objects", SHARDS_DIR, "report", "exports")


@dataclass
class Totals:
    images: int = 0
    ok: int = 0
    errors_by_class: Counter = field(default_factory=Counter)
    objects: int = 0
    objects_by_class: Counter = field(default_factory=Counter)
    prompt_errors: int = 0

    def add(self, summary_rows: list[dict]) -> None:
        for row in summary_rows:
            self.images += 1
            if row["status"] == "ok":
                self.ok += 1
            else:
                self.errors_by_class[row["error_class"]] += 1
            self.objects += row["num_objects"]
            self.prompt_errors += row["num_prompt_errors"]
            for entry in row["class_counts"]:
                self.objects_by_class[entry["class_name"] or "(unlabeled)"] += entry["count"]

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "ok": self.ok,
            "error": sum(self.errors_by_class.values()),
            "errors_by_class": dict(self.errors_by_class.most_common()),
            "objects": self.objects,
            "objects_by_class": dict(self.objects_by_class.most_common()),
            "prompt_errors": self.prompt_errors,
        }


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("autolabel", "torch", "torchvision", "sam2", "ultralytics", "ray", "pyarrow", "pycocotools"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def redacted_config(cfg: RunConfig) -> dict:
    """The config as run, with storage credentials replaced (they must never reach disk or logs)."""
    data = cfg.model_dump(mode="json")
    for section in ("input", "output"):
        data[section]["storage_options"] = {k: "***" for k in data[section]["storage_options"]}
    return data


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """``output.uri``: refuses to mix two runs, and writes run.json."""

    def __init__(self, cfg: RunConfig):
        self.uri = cfg.output.uri
        self.fs, self.path = url_to_fs(cfg.output.uri, **cfg.output.storage_options)
        self.path = self.path.rstrip("/")
        self.run_uri = self.fs.unstrip_protocol(self.path)

    def existing(self) -> list[str]:
        return [f for f in (*RUN_FOLDERS, "run.json") if self.fs.exists(f"{self.path}/{f}")]

    def check_free(self, overwrite: bool) -> None:
        """Refuse (before any work) to write into a folder that holds another run."""
        found = self.existing()
        if found and not overwrite:
            raise ConfigError(
                f"output.uri {self.uri} already holds a run ({', '.join(found)}); "
                "choose another output.uri, or pass --overwrite (output.overwrite=true) to replace it"
            )

    def clear(self) -> None:
        for name in self.existing():
            self.fs.rm(f"{self.path}/{name}", recursive=True)

    def prepare(self) -> None:
        """Clear a previous run (only called once every check has passed) and create the folder."""
        self.clear()
        try:
            self.fs.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output.uri {self.uri}: cannot create the run folder ({exc})") from None

    def write_manifest(self, manifest: dict) -> None:
        self.fs.pipe_file(f"{self.path}/run.json", json.dumps(manifest, indent=2).encode())


def work_items(cfg: RunConfig) -> Iterator[WorkItem]:
    """The work to do: a prompt manifest's lines, or what ``input.uri`` lists (images, an input
    manifest's lines, or tar shards, each of which the decode stage opens and expands)."""
    if cfg.prompts.source != "detector":
        return iter_manifest(cfg.prompts.manifest, cfg.input.storage_options)
    fmt = input_format(cfg.input.uri, cfg.input.format)
    if fmt == "tar":
        return (WorkItem(uri) for uri in iter_tar_uris(cfg.input.uri, cfg.input.storage_options))
    if fmt == "manifest":  # an input manifest lists images (+ metadata); prompts come only from prompts.manifest
        return (WorkItem(i.uri, None, i.meta, i.base_uri) for i in iter_manifest(cfg.input.uri, cfg.input.storage_options, "input.uri"))
    return (WorkItem(uri) for uri in iter_image_uris(cfg.input.uri, cfg.input.extensions, cfg.input.storage_options))


def reads_tars(cfg: RunConfig) -> bool:
    return cfg.prompts.source == "detector" and input_format(cfg.input.uri, cfg.input.format) == "tar"


def preflight(cfg: RunConfig) -> tuple[SamWeights, Optional[str], dict[int, str]]:
    """Check the input has images, resolve weights (fetching official ones once), read class names."""
    try:
        first = next(work_items(cfg), None)
        if first is None:
            raise no_images(cfg.prompts.manifest or cfg.input.uri, cfg.input.extensions)
        if reads_tars(cfg):  # brace patterns are expanded, not listed: catch a mistyped pattern here
            fs, path = url_to_fs(first.uri, **cfg.input.storage_options)
            if not fs.exists(path):
                raise SourceError(f"input.uri: the first tar shard {first.uri} does not exist")
    except (SourceError, OSError) as exc:
        raise ConfigError(str(exc) if isinstance(exc, SourceError) else f"input: cannot list {cfg.input.uri} ({exc})") from None
    try:
        sam = resolve_sam_checkpoint(cfg.sam.size, cfg.sam.checkpoint)
        det_path = resolve_detector_weights(cfg.detector.weights) if cfg.uses_detector else None
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None
    if det_path is None:
        return sam, None, {}
    from .models import load_yolo

    import torch

    names = load_yolo(det_path, torch.device("cpu")).names
    if cfg.detector.classes:
        unknown = [c for c in cfg.detector.classes if c not in names]
        if unknown:
            raise ConfigError(f"detector.classes: {unknown} not in the model's classes 0..{len(names) - 1}")
    return sam, det_path, {int(k): v for k, v in names.items()}


def with_manifest_labels(class_names: dict[int, str], labels: list[str]) -> dict[int, str]:
    """Manifest labels the detector does not know get ids after the detector's."""
    known = set(class_names.values())
    next_id = max(class_names, default=-1) + 1
    merged = dict(class_names)
    for label in labels:
        if label not in known:
            merged[next_id] = label
            next_id += 1
    return merged


def connect_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)


def actor_plan(cfg: RunConfig) -> dict:
    """Pool sizes and per-actor resources from what the cluster has.

    GPUs: one SAM actor per GPU (0.75 of it) and one detector actor beside it (0.25).
    CPU only: fractional CPUs, so both actor pools and the decode/sink tasks fit on a 2-core box
    (no deadlock), while SAM, by far the slowest stage there, runs torch on the node's cores.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = resources.get("CPU", 1)
    if gpus:
        return dict(
            gpus=gpus, cpus=cpus,
            sam=dict(size=cfg.ray.sam_actors or gpus, num_gpus=0.75, num_cpus=1),
            detector=dict(size=cfg.ray.detector_actors or gpus, num_gpus=0.25, num_cpus=1),
        )
    per_actor = 0.5 if cpus <= 4 else max(1, int(cpus // 4))
    sam_actors = cfg.ray.sam_actors or 1
    return dict(
        gpus=0, cpus=cpus,
        sam=dict(size=sam_actors, num_gpus=0, num_cpus=per_actor, cpu_threads=max(1, int(cpus // sam_actors))),
        detector=dict(size=cfg.ray.detector_actors or 1, num_gpus=0, num_cpus=per_actor),
    )


def _sam_device(cfg: RunConfig, plan: dict):
    import torch

    if cfg.sam.device != "auto":
        return torch.device(cfg.sam.device)
    return torch.device("cuda" if plan["gpus"] else "cpu")


def build_dataset(cfg: RunConfig, listing: ShardListing, class_names: dict[int, str], plan: dict):
    import pyarrow.fs as pafs
    import ray

    from .decode import decode_batch, decode_tar_batch
    from .detect import Detector
    from .segment import Segmenter
    from .sink import write_batch

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    fs, path = url_to_fs(listing.shards_uri, **cfg.output.storage_options)
    ds = ray.data.read_parquet(path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
    # Decoding asks for fewer CPUs than the actors on purpose: Ray only fuses stages with equal
    # resources, and decoding fused into the (few) detector actors could not use idle CPUs.
    if reads_tars(cfg):  # one shard row per tar; the task streams it and yields decoded members 16 at a time
        ds = ds.map_batches(
            decode_tar_batch, batch_format="pyarrow", batch_size=1, num_cpus=0.25,
            fn_kwargs={"storage_options": cfg.input.storage_options, "extensions": cfg.input.extensions,
                       "max_pixels": cfg.input.max_pixels}, runtime_env=runtime_env,
        )
    else:
        ds = ds.map_batches(
            decode_batch, batch_format="pyarrow", batch_size=16, num_cpus=0.25,
            fn_kwargs={"storage_options": cfg.input.storage_options, "max_pixels": cfg.input.max_pixels},
            runtime_env=runtime_env,
        )
    if cfg.uses_detector:
        ds = ds.map_batches(
            Detector, batch_format="pyarrow", batch_size=cfg.detector.batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan["detector"]["size"]),
            num_cpus=plan["detector"]["num_cpus"], num_gpus=plan["detector"]["num_gpus"],
            fn_constructor_kwargs={"cfg": cfg.detector}, runtime_env=runtime_env,
        )
    ds = ds.map_batches(
        Segmenter, batch_format="pyarrow", batch_size=4,
        compute=ray.data.ActorPoolStrategy(size=plan["sam"]["size"]),
        num_cpus=plan["sam"]["num_cpus"], num_gpus=plan["sam"]["num_gpus"],
        fn_constructor_kwargs={
            "cfg": cfg.sam, "class_names": class_names, "cpu_threads": plan["sam"].get("cpu_threads"),
            "storage_options": cfg.input.storage_options,
        },
        runtime_env=runtime_env,
    )
    run_uri = listing.shards_uri.rsplit("/", 1)[0]
    return ds.map_batches(
        write_batch, batch_format="pyarrow", batch_size=64, num_cpus=0.25,
        fn_kwargs={"run_uri": run_uri, "storage_options": cfg.output.storage_options, "meta_columns": listing.meta_columns},
        runtime_env=runtime_env,
    )


def run(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Run the whole job; returns the run manifest (also written to RUN/run.json)."""
    folder = RunFolder(cfg)
    folder.check_free(overwrite or cfg.output.overwrite)
    sam, det_path, class_names = preflight(cfg)
    folder.prepare()
    random_weights = uses_random_weights(cfg)
    if random_weights:
        log.warning(
            "RANDOM WEIGHTS (sam.checkpoint=%s, detector.weights=%s): masks and boxes are meaningless; "
            "use this only as a smoke test", cfg.sam.checkpoint, cfg.detector.weights,
        )
    started = time.time()
    manifest = {
        "status": "running",
        "started_at": _now(),
        "finished_at": None,
        "config": redacted_config(cfg),
        "random_weights": random_weights,
        "versions": _versions(),
        "models": {
            "sam": {"size": sam.size, "config": sam.config, "checkpoint": sam.source, **weights_identity(sam.path)},
        },
    }
    if det_path is not None:
        manifest["models"]["detector"] = {"weights": cfg.detector.weights, **weights_identity(det_path), "class_names": class_names}
    try:
        tars = reads_tars(cfg)  # one tar = one work unit; its members are listed by the decode stage
        listing = write_shards(work_items(cfg), 1 if tars else cfg.input.shard_size, folder.fs, folder.path, cfg.input.storage_options)
        if listing.num_images == 0:
            raise no_images(cfg.prompts.manifest or cfg.input.uri, cfg.input.extensions)
    except (SourceError, FileNotFoundError, PermissionError) as exc:
        folder.clear()  # nothing was labeled: leave no half-made run behind to block the next try
        raise ConfigError(str(exc)) from None
    class_names = with_manifest_labels(class_names, listing.labels)
    manifest["class_names"] = class_names
    manifest["input"] = {
        "uri": cfg.prompts.manifest if cfg.prompts.source != "detector" else cfg.input.uri,
        "format": "tar" if tars else input_format(cfg.input.uri, cfg.input.format) if cfg.prompts.source == "detector" else "manifest",
        "num_images": None if tars else listing.num_images, "num_shards": listing.num_shards,
        "metadata_columns": listing.meta_columns,
    }
    folder.write_manifest(manifest)
    if tars:
        log.info("listed %d tar shards from %s (their members are listed as they are read)", listing.num_shards, cfg.input.uri)
    else:
        log.info("listed %d images in %d shards from %s", listing.num_images, listing.num_shards, cfg.input.uri)

    totals = Totals()
    try:
        connect_ray(cfg)
        plan = actor_plan(cfg)
        manifest["ray"] = plan
        manifest["models"]["sam"]["dtype"] = resolve_dtype(cfg.sam.dtype, _sam_device(cfg, plan))
        log.info("actors: %d detector, %d SAM (cluster: %s CPUs, %d GPUs)", plan["detector"]["size"] if cfg.uses_detector else 0, plan["sam"]["size"], plan["cpus"], plan["gpus"])
        ds = build_dataset(cfg, listing, class_names, plan)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            totals.add(batch.to_pylist())
    except BaseException as exc:
        manifest.update(status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {exc}", totals=totals.as_dict())
        folder.write_manifest(manifest)
        raise
    elapsed = time.time() - started
    manifest.update(
        status="finished",
        finished_at=_now(),
        duration_s=round(elapsed, 3),
        images_per_second=round(totals.images / elapsed, 4) if elapsed else None,
        totals=totals.as_dict(),
    )
    if tars:  # members are listed inside the decode stage, which emits exactly one row per member it lists
        manifest["input"]["num_images"] = totals.images
    elif totals.images != listing.num_images:  # the one-row-per-image invariant, checked, not assumed
        manifest.update(status="failed", error=f"{listing.num_images} images listed but {totals.images} rows written")
    folder.write_manifest(manifest)
    if manifest["status"] == "finished" and cfg.report.enabled:
        from .report import report_after_run

        manifest["report_uri"] = report_after_run(cfg, folder.run_uri)
    manifest["output_uri"] = folder.run_uri
    return manifest


def format_summary(manifest: dict) -> str:
    t = manifest.get("totals", {})
    lines = [
        "",
        f"autolabel run {manifest['status']}" + ("  [RANDOM WEIGHTS: smoke test only]" if manifest.get("random_weights") else ""),
        f"  images     {t.get('images', 0)}  (ok {t.get('ok', 0)}, error {t.get('error', 0)})",
    ]
    for cls, n in t.get("errors_by_class", {}).items():
        lines.append(f"    {cls:<20} {n}")
    lines.append(f"  objects    {t.get('objects', 0)}" + (f"  (invalid prompts: {t['prompt_errors']})" if t.get("prompt_errors") else ""))
    for name, n in list(t.get("objects_by_class", {}).items())[:20]:
        lines.append(f"    {name:<20} {n}")
    if len(t.get("objects_by_class", {})) > 20:
        lines.append(f"    ... {len(t['objects_by_class']) - 20} more classes in run.json")
    if manifest.get("images_per_second") is not None:
        lines.append(f"  speed      {manifest['images_per_second']:.2f} images/s over {manifest['duration_s']:.1f} s")
    lines.append(f"  output     {manifest.get('output_uri', manifest['config']['output']['uri'])}  (run.json, images/, objects/)")
    if manifest.get("report_uri"):
        lines.append(f"  report     {manifest['report_uri']}")
    if manifest.get("error"):
        lines.append(f"  error      {manifest['error']}")
    return "\n".join(lines)
