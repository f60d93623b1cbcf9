"""The video branch of a run (issue 19): video shard files -> a plan per video -> its chunks
through the track actors (stages/track.py) -> one commit per video that joins its chunks and
writes ``RUN/videos/`` and ``RUN/tracks/`` beside ``images/`` and ``objects/``.

The listing puts each video in a shard of its own (io/shards.py). The driver has each video
planned by a Ray task (run/video_chunks.py: probed, and cut into chunks of ``video.chunk_frames``
kept frames when it is longer; one chunk otherwise), then tracks the chunks as units of work
of their own, spread over the track actors: each is retried, resumed and committed exactly once
(its files and its marker under ``RUN/_chunks/``). Once every chunk of a video is done, the
video's commit joins them into one video and writes its shard files and done marker, as an image
shard's commit does (run/sink.py); a commit cut short is redone whole from the chunks. The image
shards go through job.py's dataset; the video chunks through this one, after it.
"""
from __future__ import annotations

import json
import logging
import warnings
from typing import Iterator, Optional

from fsspec.core import url_to_fs

from pipeline.config import RunConfig
from pipeline.io.video import VIDEO_SUFFIXES
from pipeline.run.line_counts import add_line_counts
from pipeline.run.sink import DONE_DIR, ShardCommits, _parquet_bytes, atomic_write, write_shard
from pipeline.run.tables import TRACKS_SCHEMA, VIDEOS_SCHEMA
from pipeline.run.video_chunks import (CHUNK_FILE, CHUNKS_DIR, VideoPlan, chunk_key, join_video, plan_path, plan_video_task,
                                       read_chunk, read_plan, video_chunk_files, write_plan)

log = logging.getLogger("autolabel")


def listed_extensions(cfg: RunConfig) -> list[str]:
    """What a folder or glob lists: the image suffixes and the video ones."""
    return [*cfg.input.extensions, *(s for s in VIDEO_SUFFIXES if s not in cfg.input.extensions)]


class VideoWork:
    """The driver's side of the video shards still to do: their plans (made by Ray tasks, which
    ``start`` launches so they run while the images are labeled; read back from ``RUN/_chunks/``
    on a resume), the chunks committed before this attempt, and the chunks left to track."""

    def __init__(self, cfg: RunConfig, folder, shard_ids: list[str], env: Optional[dict] = None):
        self.cfg, self.folder, self.env = cfg, folder, env
        self.fs, self.root = folder.fs, folder.path
        self.shard_ids = list(shard_ids)
        self.plans: dict[str, VideoPlan] = {}
        self.done: set[tuple[str, int]] = set()  # (shard, chunk) committed before this attempt
        self.launched: dict = {}

    def start(self) -> None:
        """Read what earlier attempts planned and committed; plan the other videos in Ray tasks."""
        import ray

        folder = f"{self.root}/{CHUNKS_DIR}"
        self.fs.invalidate_cache(folder)
        try:
            names = [n.rsplit("/", 1)[-1] for n in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            names = []
        wanted = set(self.shard_ids)
        planned = []
        for m in filter(None, (CHUNK_FILE.fullmatch(n) for n in names)):
            if m["shard"] in wanted and not m.group(0).startswith(".tmp-"):
                if m["chunk"] is None:
                    planned.append(m["shard"])
                elif m["kind"] == ".json":
                    self.done.add((m["shard"], int(m["chunk"])))
        if planned:
            paths = [plan_path(self.root, s) for s in planned]
            for data in self.fs.cat(paths).values():
                plan = VideoPlan(**json.loads(data))
                self.plans[plan.shard_id] = plan
        task = ray.remote(plan_video_task).options(num_cpus=0.25, max_retries=self.cfg.ray.task_retries, runtime_env=self.env)
        for shard_id in self.shard_ids:
            if shard_id not in self.plans:
                ref = task.remote(self.folder.run_uri, self.cfg.output.storage_options, self.folder.shard_uri(shard_id),
                                  self.cfg.video.model_dump(), self.cfg.input.storage_options, self.cfg.input.max_pixels)
                self.launched[ref] = shard_id

    def collect(self) -> None:
        """Wait for the plans. A planning task that failed (its worker kept dying on the file)
        leaves the video whole: that plan is written here, so every attempt cuts it the same."""
        import ray

        for ref, shard_id in self.launched.items():
            try:
                plan = VideoPlan(**ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - the track stage meets the video's problem again and records it
                import pyarrow.parquet as pq

                with self.fs.open(self.folder.shard_uri(shard_id), "rb") as fh:
                    (row,) = pq.read_table(fh).to_pylist()
                plan = VideoPlan(shard_id, row["image_id"], row["uri"], self.cfg.video.stride,
                                 error=f"planning failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300])
                write_plan(self.fs, self.root, plan)
            self.plans[shard_id] = plan
        self.launched.clear()

    def batches(self, progress, tracker, commits, build) -> Iterator:
        """The track actors' summary batches, started once the images are through (a generator):
        the plans collected, the chunks committed before this attempt counted (a video whose
        chunks are all done is committed at once), then ``build(items)``'s dataset iterated."""
        self.collect()
        done = self.done_rows()
        progress.videos_planned(self.total_frames(), sum(r["video_frames"] for r in done))
        for shard_id in tracker.add(done):
            commits.launch(shard_id)
        dataset = build(self.items())
        if dataset is not None:
            yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)

    def total_frames(self) -> int:
        """Kept frames of the videos still to do, as far as their plans know them."""
        return sum(p.kept or 0 for p in self.plans.values())

    def done_rows(self) -> list[dict]:
        """The driver's summary rows of the chunks committed before this attempt."""
        return [{"shard_id": s, "image_id": chunk_key(self.plans[s].image_id, k), "shard_rows": len(self.plans[s].chunks),
                 "video_frames": self.plans[s].owned_frames(k)} for s, k in sorted(self.done) if s in self.plans]

    def items(self) -> list[dict]:
        """The chunks to track, one work item each, video after video."""
        out = []
        for shard_id in self.shard_ids:
            plan = self.plans[shard_id]
            info = json.dumps(plan.info) if plan.info else None
            for k, (start, stop) in enumerate(plan.chunks):
                if (shard_id, k) not in self.done:
                    out.append({"shard_path": self.folder.shard_uri(shard_id), "chunk": k, "chunks": len(plan.chunks),
                                "start": start, "stop": stop, "info": info, "frames": plan.owned_frames(k)})
        return out


def build_video_dataset(cfg: RunConfig, items: list[dict], meta_columns: list[str], class_names: dict[int, str], plan: dict,
                        run_uri: str, models: dict, env: Optional[dict], class_embeddings=None, manifest_roots=None, ledger=None):
    """One block per chunk (None: nothing to track) -> the track actor pool (the SAM pool's
    resources: fractional CPUs on a machine without a GPU, as the other pools)."""
    if not items:
        return None
    import ray

    from pipeline.stages.track import Tracker

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    sam = plan["sam"]
    expected = {"sam": models["sam"]["sha256"], "detector": (models.get("detector") or {}).get("sha256")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            Tracker, batch_format="pyarrow", batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=sam["max_size"]),
            num_cpus=sam["num_cpus"], num_gpus=sam["num_gpus"],
            fn_constructor_kwargs={
                "sam_cfg": cfg.sam, "video": cfg.video.model_dump(), "class_names": class_names, "run_uri": run_uri,
                "run_storage_options": cfg.output.storage_options, "storage_options": cfg.input.storage_options,
                "max_pixels": cfg.input.max_pixels, "detector_cfg": cfg.detector if cfg.uses_detector else None,
                "expected_sha256": expected, "class_embeddings": class_embeddings, "manifest_roots": manifest_roots,
                "cpu_threads": sam.get("cpu_threads"), "meta_columns": meta_columns, "ledger": ledger,
                "max_image_crashes": cfg.ray.max_image_crashes,
            },
            runtime_env=env, max_restarts=-1, max_task_retries=-1,
        )


def commit_video_shard(fs, root: str, shard_id: str, meta_columns: list[str] = (), video: Optional[dict] = None) -> dict:
    """A video's commit, once every chunk of it is done: its chunks joined (run/video_chunks.py),
    ``tracks/`` and ``videos/`` written, then the images, objects, summary and done marker as any
    shard's (sink.write_shard), and only then the chunks' files removed. The marker is written
    last, so a commit cut short is redone whole; one re-run after it finished changes nothing.
    ``video``: the run's ``video`` config section."""
    marker_path = f"{root}/{DONE_DIR}/shard-{shard_id}.json"
    try:
        return json.loads(fs.cat_file(marker_path))
    except FileNotFoundError:
        pass
    video = video or {}
    plan = read_plan(fs, root, shard_id)
    if plan is None:
        raise RuntimeError(f"video shard {shard_id} has no plan under {root}/{CHUNKS_DIR}, so its chunks cannot be joined")
    chunks = [read_chunk(fs, root, shard_id, k, list(meta_columns)) for k in range(len(plan.chunks))]
    images, objects, video_row, tracks = join_video(plan, chunks, video.get("match_iou", 0.5), video.get("min_track_frames", 3))
    name = f"shard-{shard_id}.parquet"
    tracks = _table(tracks, TRACKS_SCHEMA, [("video_uri", "ascending"), ("track_id", "ascending")])
    videos = _table([video_row], VIDEOS_SCHEMA, [("uri", "ascending")])
    # video.count_line -> videos.line_in / line_out, on the joined video's tracks (run/line_counts.py)
    videos = add_line_counts(videos, tracks, objects, video.get("count_line"), int(video.get("min_track_frames", 3)))
    atomic_write(fs, f"{root}/tracks/{name}", _parquet_bytes(tracks))
    atomic_write(fs, f"{root}/videos/{name}", _parquet_bytes(videos))
    marker = write_shard(fs, root, shard_id, images, objects, meta_columns)
    try:
        fs.rm(video_chunk_files(fs, root, shard_id))
    except OSError:
        pass  # the video is committed; the end of the run (or a resume) removes what is left in _chunks
    return marker


def _table(rows: list[dict], schema, sort: list):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema).sort_by(sort)


def commit_video_shard_task(run_uri: str, storage_options: Optional[dict], shard_id: str, meta_columns: list[str] = (),
                            video: Optional[dict] = None) -> dict:
    fs, root = url_to_fs(run_uri, **(storage_options or {}))
    return commit_video_shard(fs, root.rstrip("/"), shard_id, meta_columns, video)


class VideoCommits(ShardCommits):
    """``ShardCommits`` that commits the video shards among them with ``commit_video_shard``."""

    def __init__(self, run_uri: str, storage_options: Optional[dict], meta_columns: list[str], retries: int,
                 runtime_env: Optional[dict] = None, videos: frozenset = frozenset(), video: Optional[dict] = None):
        import ray

        super().__init__(run_uri, storage_options, meta_columns, retries, runtime_env)
        self.videos, self.video = videos, video
        self.video_task = ray.remote(commit_video_shard_task).options(num_cpus=0.25, max_retries=retries, runtime_env=runtime_env)

    def launch(self, shard_id: str) -> None:
        if shard_id not in self.videos:
            return super().launch(shard_id)
        run_uri, options, meta = self.args
        self.pending[self.video_task.remote(run_uri, options, shard_id, meta, self.video)] = shard_id


def video_frames(folder, video_shards: list[str]) -> int:
    """Images rows that are video frames: those of the video shards' done markers (run/folder.py)."""
    videos = set(video_shards)
    return sum(m["images"] for s, m in folder.done_shards().items() if s in videos) if videos else 0
