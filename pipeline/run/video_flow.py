"""The video branch of a run (issue 19): video shard files -> the track actors (stages/track.py)
-> staged parts -> one commit per video shard that writes ``RUN/videos/`` and ``RUN/tracks/``
beside ``images/`` and ``objects/``.

The listing puts each video in a shard of its own (io/shards.py), so a video is one unit of work:
retried, resumed and committed exactly once like an image shard, through the same staging,
atomic writes and done markers (run/sink.py). The image shards go through job.py's dataset; the
video shards through this one, after it.
"""
from __future__ import annotations

import json
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from pipeline.config import RunConfig
from pipeline.io.video import VIDEO_SUFFIXES
from pipeline.run.line_counts import count_line_crossings
from pipeline.run.sink import DONE_DIR, ShardCommits, _parquet_bytes, _read, atomic_write, commit_shard, staging_path
from pipeline.run.tables import TRACKS_SCHEMA, VIDEOS_SCHEMA


def listed_extensions(cfg: RunConfig) -> list[str]:
    """What a folder or glob lists: the image suffixes and the video ones."""
    return [*cfg.input.extensions, *(s for s in VIDEO_SUFFIXES if s not in cfg.input.extensions)]


def build_video_dataset(cfg: RunConfig, shard_paths: list[str], meta_columns: list[str], class_names: dict[int, str], plan: dict,
                        run_uri: str, models: dict, env: Optional[dict], class_embeddings=None, manifest_roots=None):
    """One block per video shard (None: no videos) -> the track actor pool (the SAM pool's resources: fractional
    CPUs on a machine without a GPU, as the other pools)."""
    if not shard_paths:
        return None
    import ray

    from pipeline.stages.track import Tracker

    ds = ray.data.from_items([{"shard_path": p} for p in shard_paths], override_num_blocks=len(shard_paths))
    sam = plan["sam"]
    expected = {"sam": models["sam"]["sha256"], "detector": (models.get("detector") or {}).get("sha256")}
    return ds.map_batches(
        Tracker, batch_format="pyarrow", batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=sam["max_size"]),
        num_cpus=sam["num_cpus"], num_gpus=sam["num_gpus"],
        fn_constructor_kwargs={
            "sam_cfg": cfg.sam, "video": cfg.video.model_dump(exclude={"count_line"}), "class_names": class_names, "run_uri": run_uri,
            "run_storage_options": cfg.output.storage_options, "storage_options": cfg.input.storage_options,
            "max_pixels": cfg.input.max_pixels, "detector_cfg": cfg.detector if cfg.uses_detector else None,
            "expected_sha256": expected, "class_embeddings": class_embeddings, "manifest_roots": manifest_roots,
            "cpu_threads": sam.get("cpu_threads"), "meta_columns": meta_columns,
        },
        runtime_env=env, max_restarts=-1, max_task_retries=-1,
    )


def _merge(fs, names: list[str], kind: str, schema: pa.Schema, key: str, sort: list) -> pa.Table:
    """The staged ``kind`` parts of a shard as one table (one video's rows once, however often a
    retried task staged them)."""
    parts, seen = [], set()
    for part in (n for n in names if n.rsplit("/", 1)[-1].startswith(f"{kind}-")):
        table = _read(fs, part).cast(schema)
        if table.num_rows:
            table = table.filter(pc.invert(pc.is_in(table.column(key), value_set=pa.array(sorted(seen), pa.string()))))
            seen.update(table.column(key).to_pylist())
        parts.append(table)
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table.sort_by(sort)


def commit_video_shard(fs, root: str, shard_id: str, meta_columns: list[str] = ()) -> dict:
    """A video shard's commit: ``videos/`` and ``tracks/`` first, then sink's ``commit_shard``
    (images, objects, the staged parts removed, and the done marker, whose totals count the frames
    as images). The marker is written last, so a commit cut short is redone whole."""
    marker_path = f"{root}/{DONE_DIR}/shard-{shard_id}.json"
    if fs.exists(marker_path):
        return json.loads(fs.cat_file(marker_path))
    folder = staging_path(root, shard_id)
    fs.invalidate_cache(folder)
    try:
        names = sorted(fs.ls(folder, detail=False))
    except FileNotFoundError:
        names = []
    videos = _merge(fs, names, "videos", VIDEOS_SCHEMA, "uri", [("uri", "ascending")])
    tracks = _merge(fs, names, "tracks", TRACKS_SCHEMA, "video_uri", [("video_uri", "ascending"), ("track_id", "ascending")])
    videos = count_line_crossings(fs, root, names, videos, tracks)  # video.count_line -> videos.line_in/line_out (run/line_counts.py)
    name = f"shard-{shard_id}.parquet"
    atomic_write(fs, f"{root}/tracks/{name}", _parquet_bytes(tracks))
    atomic_write(fs, f"{root}/videos/{name}", _parquet_bytes(videos))
    return commit_shard(fs, root, shard_id, meta_columns)  # its STAGED_PART removes the videos and tracks parts too


def commit_video_shard_task(run_uri: str, storage_options: Optional[dict], shard_id: str, meta_columns: list[str] = ()) -> dict:
    fs, root = url_to_fs(run_uri, **(storage_options or {}))
    return commit_video_shard(fs, root.rstrip("/"), shard_id, meta_columns)


class VideoCommits(ShardCommits):
    """``ShardCommits`` that commits the video shards among them with ``commit_video_shard``."""

    def __init__(self, run_uri: str, storage_options: Optional[dict], meta_columns: list[str], retries: int,
                 runtime_env: Optional[dict] = None, videos: frozenset = frozenset()):
        import ray

        super().__init__(run_uri, storage_options, meta_columns, retries, runtime_env)
        self.videos = videos
        self.video_task = ray.remote(commit_video_shard_task).options(num_cpus=0.25, max_retries=retries, runtime_env=runtime_env)

    def launch(self, shard_id: str) -> None:
        if shard_id not in self.videos:
            return super().launch(shard_id)
        run_uri, options, meta = self.args
        self.pending[self.video_task.remote(run_uri, options, shard_id, meta)] = shard_id


def video_frames(folder, video_shards: list[str]) -> int:
    """Images rows that are video frames: those of the video shards' done markers (run/folder.py)."""
    videos = set(video_shards)
    return sum(m["images"] for s, m in folder.done_shards().items() if s in videos) if videos else 0
