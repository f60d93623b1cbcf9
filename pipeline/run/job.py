"""The Ray job: list -> read (tasks) -> detect (actor pool) -> segment (actor pool) -> stage -> commit.

Everything that can be checked without a cluster (config, weights, output folder, input
listing) is checked before Ray starts, so a mistake costs seconds, not a cluster allocation.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import platform
import time
import warnings
from importlib import metadata
from typing import Iterator, Optional

from fsspec.core import url_to_fs

from pipeline.config import ConfigError, RunConfig, redact, redact_text, redact_uri, redacted_config, uses_random_weights
from pipeline.models.weights import SamWeights, WeightsError, resolve_detector_weights, resolve_sam_checkpoint, weights_identity
from pipeline.models.detector import DetectorClasses
from pipeline.models.yoloe import ClassEmbeddings
from pipeline.run.cluster import (GpusLost, GpuWatch, actor_plan, actors_timed_out, check_device, connect_ray, describe,
                                  run_data_context, sam_device_type)
from pipeline.run.folder import RunFolder, fingerprint
from pipeline.run.ownership import CLASS_EMBEDDINGS
from pipeline.run.progress import Progress, ShardTracker
from pipeline.sam.model import resolve_dtype
from pipeline.run.sink import OutputWriteError, Totals
from pipeline.io.listing import SourceError, WorkItem, input_format, iter_image_uris, iter_tar_uris, no_images, root_of
from pipeline.io.manifest import iter_manifest, merge_repeated_uris
from pipeline.io.shards import ShardListing, write_shards
from pipeline.run.timings import Timings
from pipeline.run.video_flow import VideoCommits, VideoWork, build_video_dataset, listed_extensions, video_frames

log = logging.getLogger("autolabel")

# Driver environment variables that actors need too (Ray does not forward the driver's env)...
FORWARDED_ENV = ("YOLO_OFFLINE", "MPLCONFIGDIR", "HF_HUB_OFFLINE", "AUTOLABEL_TEST_FAULTS")
# ... and those that name places on the driver's machine: forwarded only to a Ray it started
# itself (same machine); on a cluster each node keeps its own (e.g. the image's /app/checkpoints,
# and its YOLO_CONFIG_DIR, which the CLI otherwise sets to the driver's cache: console.py).
LOCAL_ONLY_ENV = ("HF_HOME", "AUTOLABEL_CHECKPOINTS", "AUTOLABEL_CACHE", "YOLO_CONFIG_DIR")
ACTOR_START_TIMEOUT_S = 600  # CPU pools whose actors cannot start fail after this
SEGMENT_CALLS = 2  # Ray batches a SAM actor holds at once: one on the device, one decoding or finishing (segment.py)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("autolabel", "torch", "torchvision", "sam2", "ultralytics", "ray", "pyarrow", "pycocotools"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def manifest_roots(cfg: RunConfig) -> Optional[list[str]]:
    """Where a manifest's lines may point besides the manifest's own folder: ``input.uri``'s folder
    (None: anywhere, with ``prompts.allow_any_uri``)."""
    if cfg.prompts.allow_any_uri:
        return None
    roots = [root_of(cfg.input.uri, cfg.input.storage_options)]
    if cfg.prompts.manifest:
        roots.append(root_of(cfg.prompts.manifest, cfg.input.storage_options))
    return roots


def work_items(cfg: RunConfig, merged: bool = True) -> Iterator[WorkItem]:
    """The work to do: a prompt manifest's lines, or what ``input.uri`` lists (images, an input
    manifest's lines, or tar shards, each of which the decode stage opens and expands).

    Manifest lines that name the same image are merged into one item (``merged=False`` gives
    the lines as they come, which is all a first look at the input needs)."""
    if cfg.prompts.source != "detector":
        lines = iter_manifest(cfg.prompts.manifest, cfg.input.storage_options, roots=manifest_roots(cfg))
        return merge_repeated_uris(lines) if merged else lines
    fmt = input_format(cfg.input.uri, cfg.input.format)
    if fmt == "tar":
        return (WorkItem(uri) for uri in iter_tar_uris(cfg.input.uri, cfg.input.storage_options))
    if fmt == "manifest":  # an input manifest lists images (+ metadata); prompts come only from prompts.manifest
        lines = (WorkItem(i.uri, None, i.meta, i.base_uri, i.lines)
                 for i in iter_manifest(cfg.input.uri, cfg.input.storage_options, "input.uri", manifest_roots(cfg)))
        return merge_repeated_uris(lines, "input.uri") if merged else lines
    return (WorkItem(uri) for uri in iter_image_uris(cfg.input.uri, listed_extensions(cfg), cfg.input.storage_options))


def reads_tars(cfg: RunConfig) -> bool:
    return cfg.prompts.source == "detector" and input_format(cfg.input.uri, cfg.input.format) == "tar"


def preflight(cfg: RunConfig) -> tuple[SamWeights, Optional[str], Optional[DetectorClasses]]:
    """Check the input has images, resolve weights (fetching official ones once), read the detector's
    classes: an open-vocabulary model's class embeddings are made here, once, before any work."""
    check_device(cfg)
    try:
        first = next(work_items(cfg, merged=False), None)
        if first is None:
            raise no_images(cfg.prompts.manifest or cfg.input.uri, cfg.input.extensions)
        if reads_tars(cfg):  # brace patterns are expanded, not listed: catch a mistyped pattern here
            fs, path = url_to_fs(first.uri, **cfg.input.storage_options)
            if not fs.exists(path):
                raise SourceError(f"input.uri: the first tar shard {first.uri} does not exist")
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - OSError, and what storage back-ends raise besides (botocore's ParamValidationError)
        where = cfg.prompts.manifest if cfg.prompts.source != "detector" else cfg.input.uri
        raise ConfigError(redact(redact_text(f"input: cannot list {where} ({type(exc).__name__}: {exc})"),
                                 cfg.input.storage_options)) from None
    try:
        sam = resolve_sam_checkpoint(cfg.sam.size, cfg.sam.checkpoint, storage_options=cfg.sam.storage_options)
        det_path = resolve_detector_weights(cfg.detector.weights, storage_options=cfg.detector.storage_options) if cfg.uses_detector else None
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None
    if det_path is None:
        return sam, None, None
    from pipeline.models.detector import resolve_classes

    try:
        _, classes = resolve_classes(cfg.detector, det_path)
    except WeightsError as exc:  # yoloe.TextEncoderError among them: no text encoder here, and how to do without
        raise ConfigError(str(exc)) from None
    return sam, det_path, classes


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


def runtime_env(local: bool) -> Optional[dict]:
    """What every task and actor needs from the driver's environment (Ray does not carry it)."""
    names = FORWARDED_ENV + (LOCAL_ONLY_ENV if local else ())
    env = {k: os.environ[k] for k in names if k in os.environ}
    return {"env_vars": env} if env else None


def build_dataset(cfg: RunConfig, shard_paths: list[str], meta_columns: list[str], class_names: dict[int, str],
                  plan: dict, run_uri: str, ledger, models: dict, class_embeddings: Optional[ClassEmbeddings] = None):
    """shard files (paths on the output filesystem) -> read bytes and headers (tasks) -> detect
    (actors) -> segment (actors) -> stage (tasks); pixels are decoded inside the two actors.
    ``models``: run.json's models section (each actor checks its weights against the sha256 there).
    ``class_embeddings``: an open-vocabulary detector's classes, made on the driver.

    Retries: a dead task is re-run and a dead actor restarted with its task retried (Ray Data
    restarts actors without limit); an image on which workers keep dying is cut out by the crash
    ledger after ``ray.max_image_crashes`` deaths, so retries cannot loop on it forever.

    Sets Ray Data's current ``DataContext``: call it inside ``cluster.run_data_context()``.
    """
    import functools

    import ray

    from pipeline.stages.read import READ_ROWS, read_shards
    from pipeline.stages.detect import Detector
    from pipeline.stages.segment import Segmenter
    from pipeline.run.sink import write_batch

    env = runtime_env(plan["local"])
    # A stage's own exception (a write failing with "No space left on device") must reach the
    # driver as itself, not as Ray Data's generic UserCodeException that drops it.
    context = ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    if plan["mode"] == "gpu":  # a cluster that loses every GPU mid-run: wait ray.gpu_wait_s, then fail resumably
        context.custom_execution_callback_classes = [*context.custom_execution_callback_classes,
                                                     functools.partial(GpuWatch, cfg.ray.gpu_wait_s)]
    # Start every actor of a pool's minimum before the images stream in, so the first actor up does
    # not take the whole (small) input while the others load their model; on a GPU cluster this is
    # also the wait for GPU nodes (ray.gpu_wait_s), which then fails clearly instead of hanging.
    context.wait_for_min_actors_s = cfg.ray.gpu_wait_s if plan["mode"] == "gpu" else ACTOR_START_TIMEOUT_S
    # Ray Data's own bars count blocks per operator; the run shows its own progress in images
    # (runstate.Progress), so a person sees one bar that moves as images are done.
    context.enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # no "Progress bars disabled" notice
    crashes = cfg.ray.max_image_crashes
    guarded = {"ledger": ledger, "max_image_crashes": crashes}
    # Retry settings have no named map_batches parameter in Ray 2.60; they go through
    # ray_remote_args, which warns that it is deprecated (silenced where _process calls this).
    task_retries = {"max_retries": crashes + cfg.ray.task_retries}  # room for the ledger's deaths, then real retries
    # Ray Data's own default, spelled out. Ray's core worker logs an ERROR for every such pool (once
    # per process) because the actors' constructor arguments are in the object store (Ray issue
    # #53727): Ray Data ray.put()s each operator's map transformer (the class and our
    # fn_constructor_kwargs, all small) and its DataContext, and passes the two refs to every
    # actor, whatever their size. The operator keeps both refs for as long as the dataset runs, so a
    # restarted actor finds them (tests/test_faults.py kills an actor of each pool during a run);
    # the line is not actionable, and the CLI sends it to the log file (console.py).
    actor_retries = {"max_restarts": -1, "max_task_retries": -1}
    # One block per shard file: read_parquet would make one block of many small files, and then
    # one actor of each pool would do all the work while the others wait.
    ds = ray.data.from_items([{"shard_path": p} for p in shard_paths], override_num_blocks=len(shard_paths))
    # Reading asks for fewer CPUs than the actors on purpose: Ray only fuses stages with equal
    # resources, and reading fused into the (few) detector actors could not use idle CPUs.
    ds = ds.map_batches(
        read_shards, batch_format="pyarrow", batch_size=1, num_cpus=0.25,
        fn_kwargs={"run_uri": run_uri, "run_storage_options": cfg.output.storage_options,
                   "storage_options": cfg.input.storage_options, "max_pixels": cfg.input.max_pixels, "tars": reads_tars(cfg),
                   "extensions": cfg.input.extensions, **guarded},
        runtime_env=env, **task_retries,
    )
    if cfg.uses_detector:
        ds = ds.map_batches(
            Detector, batch_format="pyarrow", batch_size=cfg.detector.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=plan["detector"]["min_size"], max_size=plan["detector"]["max_size"]),
            num_cpus=plan["detector"]["num_cpus"], num_gpus=plan["detector"]["num_gpus"],
            fn_constructor_kwargs={"cfg": cfg.detector, "max_pixels": cfg.input.max_pixels,
                                   "decode_threads": plan["decode_threads"], **guarded,
                                   "expected_sha256": models["detector"]["sha256"], "class_embeddings": class_embeddings},
            runtime_env=env, **actor_retries,
        )
    ds = ds.map_batches(
        # Two encoder batches per call, and two calls at once per actor (threads): the host finishes
        # one call's images and the next call's decode while the device works (stages/segment.py).
        Segmenter, batch_format="pyarrow", batch_size=2 * cfg.sam.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=plan["sam"]["min_size"], max_size=plan["sam"]["max_size"],
                                           max_concurrent_calls_per_actor=SEGMENT_CALLS, enable_true_multi_threading=True),
        num_cpus=plan["sam"]["num_cpus"], num_gpus=plan["sam"]["num_gpus"],
        fn_constructor_kwargs={
            "cfg": cfg.sam, "class_names": class_names, "cpu_threads": plan["sam"].get("cpu_threads"),
            "storage_options": cfg.input.storage_options, "manifest_roots": manifest_roots(cfg),
            "max_pixels": cfg.input.max_pixels, "decode_threads": plan["decode_threads"],
            "qa": cfg.qa if cfg.qa.enabled else None, **guarded,
            "automatic": cfg.automatic.model_dump(exclude={"enabled"}) if cfg.automatic.enabled else None,  # no detector pool then
            "expected_sha256": models["sam"]["sha256"],  # every node runs the driver's weights
        },
        runtime_env=env, **actor_retries,
    )
    # Shards are committed once all their images are staged (small shards: small staging batches,
    # so a shard is not held back waiting for rows of others); progress moves as batches are staged.
    stage_rows = READ_ROWS if reads_tars(cfg) else min(READ_ROWS, cfg.input.shard_size)
    return ds.map_batches(
        write_batch, batch_format="pyarrow", batch_size=stage_rows, num_cpus=0.25,
        fn_kwargs={"run_uri": run_uri, "storage_options": cfg.output.storage_options, "meta_columns": meta_columns},
        runtime_env=env, **task_retries,
    )


def find_cause(exc: BaseException, kind: type) -> Optional[BaseException]:
    """The original ``kind`` exception in a chain. Ray wraps a worker's exception (sometimes
    twice) in classes that are also instances of it but print a whole traceback; its ``cause``
    is the exception as raised."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            found = exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return found


class JobFailed(RuntimeError):
    """The job stopped while running (after its checks passed); the message says why."""


def _listing(cfg: RunConfig, folder: RunFolder, manifest: dict) -> ShardListing:
    """List the input into shard files; once complete, run.json says so and a resume reuses it."""
    tars = reads_tars(cfg)  # one tar = one work unit; its members are listed by the decode stage
    try:
        listing = write_shards(work_items(cfg), 1 if tars else cfg.input.shard_size, folder.fs, folder.path,
                               cfg.input.storage_options, tars=tars)
        if listing.num_images + listing.num_videos == 0:  # a folder of videos alone is work too
            raise no_images(cfg.prompts.manifest or cfg.input.uri, cfg.input.extensions)
    except (SourceError, FileNotFoundError, PermissionError) as exc:
        folder.clear()  # nothing was labeled: leave no half-made run behind to block the next try
        raise ConfigError(str(exc)) from None
    except OSError as exc:  # writing the shard files (run.json still says "listing": a rerun lists again)
        raise JobFailed(f"cannot write the listing under {folder.path_to('_shards')}: {exc.strerror or exc}") from exc
    manifest["class_names"] = with_manifest_labels(manifest["class_names"], listing.labels)
    manifest["input"] = {
        "uri": cfg.prompts.manifest if cfg.prompts.source != "detector" else cfg.input.uri,
        "format": "tar" if tars else input_format(cfg.input.uri, cfg.input.format) if cfg.prompts.source == "detector" else "manifest",
        "num_images": None if tars else listing.num_images, "num_shards": listing.num_shards,
        "metadata_columns": listing.meta_columns, "video_shards": listing.video_shards, "num_videos": listing.num_videos,
    }
    manifest["listing"] = "complete"
    folder.write_manifest(manifest)
    if tars:
        log.info("listed %d tar shards from %s (their members are listed as they are read)", listing.num_shards, cfg.input.uri)
    else:
        log.info("listed %d images in %d shards from %s", listing.num_images, listing.num_shards, cfg.input.uri)
    return listing


def run(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Run the whole job, or resume it; returns the run manifest (also written to RUN/run.json).

    Same command, same ``output.uri``: finished shards are kept and the rest is (re)done.
    """
    folder = RunFolder(cfg)
    previous = folder.previous_run(overwrite or cfg.output.overwrite)
    sam, det_path, det_classes = preflight(cfg)
    class_names = det_classes.names if det_classes is not None else {}
    embeddings = det_classes.embeddings if det_classes is not None else None
    models = {"sam": {"size": sam.size, "config": sam.config, "checkpoint": redact_uri(sam.source), **weights_identity(sam.path)}}
    if det_path is not None:  # classes: how they were defined (text, file, examples, closed-set), the embeddings' digest
        models["detector"] = {"weights": redact_uri(cfg.detector.weights), **weights_identity(det_path), "class_names": class_names,
                              "classes": det_classes.record(CLASS_EMBEDDINGS if embeddings is not None else None)}
    identity = fingerprint(cfg, models)
    if previous is not None:
        folder.check_resumable(previous, identity)
        if previous.get("status") == "finished":
            log.info("%s already holds this run, finished at %s: nothing to do (--overwrite redoes it)", folder.run_uri, previous.get("finished_at"))
            return {**previous, "output_uri": folder.run_uri, "note": "already finished; nothing was redone"}
        if previous.get("listing") != "complete":
            log.info("the previous attempt stopped while listing the input; listing again")
            previous = None
    random_weights = uses_random_weights(cfg)
    if random_weights:
        log.warning(
            "RANDOM WEIGHTS (sam.checkpoint=%s, detector.weights=%s): masks and boxes are meaningless; "
            "use this only as a smoke test", cfg.sam.checkpoint, cfg.detector.weights,
        )
    started = time.time()
    attempt = {"started_at": _now(), "shards_done_before": 0}
    if previous is None:
        manifest = {
            "status": "listing", **folder.new_identity(), "started_at": attempt["started_at"], "finished_at": None,
            "config": redacted_config(cfg), "fingerprint": identity, "random_weights": random_weights, "qa": cfg.qa.model_dump(),
            "versions": _versions(), "models": models, "class_names": class_names, "attempts": [attempt],
        }
        folder.prepare(manifest)  # clears what was there (only with --overwrite) and proves the folder writable
        folder.write_class_embeddings(embeddings)
        listing = _listing(cfg, folder, manifest)
        done: dict[str, dict] = {}
    else:
        manifest = {**previous, "status": "running", "finished_at": None, "config": redacted_config(cfg),
                    "versions": _versions(), "models": models, "qa": cfg.qa.model_dump()}
        manifest.pop("error", None)
        manifest["class_names"] = {int(k): v for k, v in previous["class_names"].items()}  # JSON made the ids strings
        done = folder.done_shards()
        attempt["shards_done_before"] = len(done)
        manifest["attempts"] = [*previous.get("attempts", []), attempt]
        inp = previous["input"]
        folder.write_class_embeddings(embeddings)  # the same file (the fingerprint holds its digest), in case it went
        listing = ShardListing(folder.path_to("_shards"), inp["num_shards"], inp["num_images"] or 0, inp["metadata_columns"], [],
                               inp.get("video_shards", []), inp.get("num_videos", 0))
    shard_ids = folder.shard_ids()
    pending = [s for s in shard_ids if s not in done]
    if previous is not None:
        removed = folder.clean_unfinished(manifest, set(pending))
        log.info("resuming %s: %d of %d shards already done (%d images); %d to do%s", folder.run_uri, len(done), len(shard_ids),
                 sum(d["images"] for d in done.values()), len(pending), f" (removed {removed} unfinished files)" if removed else "")
    totals = Totals()
    for marker in done.values():
        totals.merge(marker)
    video_shards = set(listing.video_shards)
    progress = Progress(len(shard_ids), len(done), totals, total_images=None if reads_tars(cfg) else listing.num_images,
                        videos=listing.num_videos, done_frames=sum(m["images"] for s, m in done.items() if s in video_shards))
    manifest["progress"] = progress.as_dict()
    manifest["status"] = "running"
    try:
        plan = _plan(cfg, folder, previous, manifest, models) if pending else None  # a ConfigError here has written nothing
        folder.write_manifest(manifest)
        if pending:
            _process(cfg, folder, manifest, pending, listing.meta_columns, totals, progress, plan, embeddings, set(listing.video_shards))
    except ConfigError:
        raise
    except BaseException as exc:
        write_error = find_cause(exc, OutputWriteError)
        reason = str(write_error).splitlines()[0] if write_error else f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        if find_cause(exc, GpusLost):
            reason = str(find_cause(exc, GpusLost))
        elif actors_timed_out(exc):
            reason = (f"the actors could not start within ray.gpu_wait_s={cfg.ray.gpu_wait_s} s: the cluster cannot give "
                      "them what they ask for (no GPU node came up, or no GPU has 0.75 of it free: see `ray status`); "
                      "add GPU nodes, lower ray.gpus / ray.sam_actors, raise ray.gpu_wait_s, or set sam.device=cpu")
        reason = redact_text(reason)
        manifest.update(status="failed", finished_at=_now(), error=reason, totals=totals.as_dict(), progress=progress.as_dict())
        try:
            folder.write_manifest(manifest)
        except OutputWriteError as again:
            log.error("run.json could not record the failure either: %s", again)
        if write_error or isinstance(exc, Exception):
            log.error("the job failed: %s; the %d shards done are kept: rerun the same command to resume", reason, progress.done)
            raise JobFailed(reason) from exc
        raise
    elapsed = time.time() - started
    attempt["finished_at"] = _now()
    manifest.update(
        status="finished",
        finished_at=attempt["finished_at"],
        duration_s=round(elapsed, 3),
        images_per_second=round(progress.as_dict()["images_this_attempt"] / elapsed, 4) if elapsed else None,
        totals=totals.as_dict(),
        progress=progress.as_dict(),
    )
    if manifest["input"]["format"] == "tar":  # members are listed inside the decode stage
        manifest["input"]["num_images"] = totals.images
    elif totals.images - video_frames(folder, listing.video_shards) != listing.num_images:  # one row per image (videos: per frame), checked
        manifest.update(status="failed", error=f"{listing.num_images} images listed but {totals.images} rows written")
    folder.write_manifest(manifest)
    if manifest["status"] == "finished" and cfg.report.enabled:
        from pipeline.outputs.report import report_after_run

        manifest["report_uri"] = report_after_run(cfg, folder.run_uri)
    manifest["output_uri"] = folder.run_uri
    return manifest


def _plan(cfg: RunConfig, folder: RunFolder, previous: Optional[dict], manifest: dict, models: dict) -> dict:
    """Connect to Ray, size the actor pools, and fix the dtype SAM runs in; a resume whose done
    shards were made in another dtype (other hardware) is refused here, before any work."""
    local = connect_ray(cfg)
    plan = actor_plan(cfg, local)
    dtype = resolve_dtype(cfg.sam.dtype, sam_device_type(cfg, plan))
    identity = fingerprint(cfg, models, dtype)
    if previous is not None:
        folder.check_same_dtype(previous, identity)
    manifest.update(fingerprint=identity, ray=plan)
    manifest["models"]["sam"]["dtype"] = dtype
    return plan


def _process(cfg: RunConfig, folder: RunFolder, manifest: dict, pending: list[str], meta_columns: list[str],
             totals: Totals, progress: Progress, plan: dict, class_embeddings: Optional[ClassEmbeddings] = None, videos=frozenset()) -> None:
    """Run the Ray pipeline over the pending shards, committing each shard as soon as all its
    images are staged (so a crash later keeps it), and the stragglers once the data is through."""
    import ray

    from pipeline.run.faults import start_ledger

    log.info(describe(plan, cfg.uses_detector))
    if plan["mode"] == "gpu" and plan["gpus"] == 0:
        log.warning("waiting up to %d s (ray.gpu_wait_s) for a GPU: the cluster has none yet; its autoscaler can add GPU "
                    "nodes for the SAM pool's demand. To segment on CPUs instead, set sam.device=cpu", cfg.ray.gpu_wait_s)
    class_names = manifest["class_names"]
    with run_data_context():  # Ray Data's settings for this run only (the process may be an API user's)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ledger = start_ledger()
            images = [folder.shard_uri(s) for s in pending if s not in videos]  # video shards: the track actors (video_flow.py)
            ds = build_dataset(cfg, images, meta_columns, class_names, plan, folder.run_uri, ledger, manifest["models"], class_embeddings) if images else None
        video_work = VideoWork(cfg, folder, [s for s in pending if s in videos], runtime_env(plan["local"]))
        video_work.start()  # each video planned by a Ray task while the images are labeled
        tracker = ShardTracker(pending)
        timings = Timings()
        commits = VideoCommits(folder.run_uri, cfg.output.storage_options, meta_columns, cfg.ray.task_retries, runtime_env(plan["local"]), videos,
                               cfg.video.model_dump())
        video_batches = video_work.batches(progress, tracker, commits, lambda items: build_video_dataset(
            cfg, items, meta_columns, class_names, plan, folder.run_uri, manifest["models"], runtime_env(plan["local"]),
            class_embeddings, manifest_roots(cfg), ledger))

        def record() -> None:
            log.info(progress.line())
            manifest.update(progress=progress.as_dict(), totals=totals.as_dict(), timings=timings.as_dict())
            folder.write_manifest(manifest)

        def harvest(block: bool) -> None:
            for marker in commits.finished(block):
                totals.merge(marker)
                if progress.shard_done():
                    record()

        try:
            image_batches = ds.iter_batches(batch_format="pyarrow", batch_size=None) if ds is not None else ()
            for batch in itertools.chain(image_batches, video_batches):
                rows = batch.to_pylist()
                timings.add(rows)
                _check_actor_dtypes(timings, manifest["models"]["sam"]["dtype"])
                for shard_id in tracker.add(rows):
                    commits.launch(shard_id)
                if progress.rows_staged(rows):
                    log.info(progress.line())
                harvest(block=False)
            for shard_id in tracker.remaining():  # every row is staged now: commit what is left (e.g. empty tars)
                commits.launch(shard_id)
            while commits.pending:
                harvest(block=True)
        finally:
            progress.close()
        manifest["timings"] = timings.as_dict()
        # "stage:uri" -> worker deaths while it was in flight (recovered ones too), for the record.
        manifest["worker_deaths"] = ray.get(ledger.crashed.remote())
        folder.clean_staging(manifest)


def _check_actor_dtypes(timings: Timings, planned: str) -> None:
    """Every SAM actor must run in the run's dtype: a GPU node where torch sees no CUDA device
    would otherwise quietly add float32 masks to a bfloat16 run."""
    for actor, entry in timings.actors.items():
        if entry.get("dtype") and entry["dtype"] != planned:
            raise JobFailed(f"SAM actor {actor} on node {entry['node']} runs in {entry['dtype']}, but this run is {planned} "
                            "(a GPU node where torch sees no CUDA device?); fix the node or set sam.dtype explicitly")


def format_summary(manifest: dict) -> str:
    t = manifest.get("totals", {})
    lines = [
        "",
        f"autolabel run {manifest['status']}" + ("  [RANDOM WEIGHTS: smoke test only]" if manifest.get("random_weights") else ""),
        f"  images     {t.get('images', 0)}  (ok {t.get('ok', 0)}, error {t.get('error', 0)})",
    ]
    if manifest.get("note"):
        lines[1] += f"  ({manifest['note']})"
    p = manifest.get("progress") or {}
    if p.get("shards_done_before_this_attempt"):
        lines.append(f"  shards     {p['shards_done']}/{p['shards_total']}  ({p['shards_done_before_this_attempt']} done before this attempt, "
                     f"{p['images_this_attempt']} images labeled in it)")
    for cls, n in t.get("errors_by_class", {}).items():
        lines.append(f"    {cls:<20} {n}")
    lines.append(f"  objects    {t.get('objects', 0)}" + (f"  (invalid prompts: {t['prompt_errors']})" if t.get("prompt_errors") else ""))
    for name, n in list(t.get("objects_by_class", {}).items())[:20]:
        lines.append(f"    {name:<20} {n}")
    if len(t.get("objects_by_class", {})) > 20:
        lines.append(f"    ... {len(t['objects_by_class']) - 20} more classes in run.json")
    if manifest.get("images_per_second") is not None:
        lines.append(f"  speed      {manifest['images_per_second']:.2f} images/s over {manifest['duration_s']:.1f} s")
    if p.get("frames_total") is not None:  # a run with videos: their frames and the rate they were tracked at
        rate = p.get("frames_per_second")
        lines.append(f"  videos     {p['frames_done']}/{p['frames_total']} frames, {p['frames_this_attempt']} tracked in this attempt"
                     + (f", {rate:.2f} frames/s" if rate else ""))
    lines.append(f"  output     {manifest.get('output_uri', manifest['config']['output']['uri'])}  (run.json, images/, objects/)")
    if manifest.get("report_uri"):
        lines.append(f"  report     {manifest['report_uri']}")
    if manifest.get("error"):
        lines.append(f"  error      {manifest['error']}")
    return "\n".join(lines)
