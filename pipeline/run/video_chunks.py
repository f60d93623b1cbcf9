"""Videos as chunks of kept frames (issue 19): each video's plan, each chunk's committed files,
and the joined video that a video's commit writes.

- **Plan.** Before tracking, a Ray task probes each video (``plan_video_task``: the container's
  header; a container that does not store its frame count is demuxed once, read but not
  decoded, as the track stage did before) and, for detector-driven tracking with
  ``video.chunk_frames`` set, cuts its kept frames into chunks that start on keyframes
  (multiples of ``video.detect_every``) and share at least ``video.chunk_overlap`` frames with
  the next. The plan (``RUN/_chunks/shard-X.plan.json``) is written before any chunk of the video
  runs, and a resume reads it instead of probing again, so a video is cut the same way on every
  attempt. A video that cannot be probed is one chunk: the track stage reads it as it reads any
  video and writes its error row (or, if the failure was passing, tracks it whole).
- **Chunks.** Each chunk is tracked on its own (stages/track.py) and written by the actor that
  tracked it: ``shard-X-cNNNN.{objects,images,tracks}.parquet`` under ``RUN/_chunks/``, then its
  marker ``shard-X-cNNNN.json`` (the chunk's videos row). A chunk with a marker is done: neither a
  retried task nor a resume tracks it again. One without is redone whole, under the same names.
- **Join.** Once every chunk of a video is done, the video's commit (run/video_flow.py) joins
  them (``join_video``): tracks by mask IoU on the overlap frames (sam/track_join.py); each frame
  once, from the earlier chunk where two overlap (it has tracked longer); track ids, classes
  (majority over the detections of the frames kept) and the videos and tracks rows of the
  joined video. Then it writes the video's shard files and its done marker, and only then
  removes the chunks' files: a commit cut short is redone whole from them.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import pyarrow as pa

from pipeline.run.ownership import CHUNK_FILE, CHUNKS_DIR
from pipeline.run.sink import _parquet_bytes, _read, atomic_write, class_counts, counted
from pipeline.run.tables import OBJECTS_SCHEMA, TRACKS_SCHEMA, images_schema

# A chunk's tracks rows carry the detections matched to each track, so the join can count each
# keyframe's vote once (from the chunk whose frame it is): frame = decoded frame index.
VOTE_TYPE = pa.struct([("frame", pa.int32()), ("class_id", pa.int32()), ("class_name", pa.string()), ("score", pa.float32())])
CHUNK_TRACKS_SCHEMA = pa.schema([*TRACKS_SCHEMA, pa.field("votes", pa.list_(VOTE_TYPE))])


@dataclass
class VideoPlan:
    """How one video is cut: ``chunks`` are [start, stop) in kept frames (stop None: to the end,
    when the frame count is not known). ``info``: what the probe found (the videos row's width,
    height, fps, frames, duration_s), None when it failed (``error`` says why)."""
    shard_id: str
    image_id: str
    uri: str
    stride: int
    chunks: list = field(default_factory=lambda: [[0, None]])
    info: Optional[dict] = None
    kept: Optional[int] = None
    error: Optional[str] = None

    def owned(self, k: int) -> tuple[int, Optional[int]]:
        """The kept frames chunk ``k`` speaks for: from where chunk k-1 stops (the frames two chunks
        share are the earlier one's) to its own stop."""
        start = self.chunks[k - 1][1] if k else 0
        return start, self.chunks[k][1]

    def owned_frames(self, k: int) -> int:
        """How many frames chunk ``k`` adds to the output (0 when its length is not known)."""
        start, stop = self.owned(k)
        return 0 if stop is None else stop - start

    def as_dict(self) -> dict:
        return asdict(self)


def plan_chunks(kept: int, chunk_frames: Optional[int], overlap: int, detect_every: int) -> list[list[int]]:
    """[start, stop) kept-frame ranges of the chunks of a video of ``kept`` kept frames: starts on
    keyframes, ``chunk_frames`` long (the last one shorter), each sharing at least ``overlap``
    frames with the next; the last chunk has more frames than it shares. One chunk when the video
    is no longer than ``chunk_frames`` (or chunks are off)."""
    if not chunk_frames or kept <= chunk_frames:
        return [[0, kept]]
    step = max(detect_every, (chunk_frames - overlap) // detect_every * detect_every)
    starts = [0]
    while starts[-1] + chunk_frames < kept:
        starts.append(starts[-1] + step)
    return [[s, min(s + chunk_frames, kept)] for s in starts]


def plan_video(row: dict, video: dict, storage_options: Optional[dict] = None, max_pixels: Optional[int] = None) -> VideoPlan:
    """The plan of the video of a shard row; never raises (a video that cannot be probed is one chunk)."""
    from pipeline.io.video import kept_count, probe

    plan = VideoPlan(row["shard_id"], row["image_id"], row["uri"], video["stride"])
    try:
        info = probe(row["uri"], storage_options, max_pixels, count=True)
    except Exception as exc:  # noqa: BLE001 - the track stage meets it again and writes the video's error row
        plan.error = f"{type(exc).__name__}: {exc}"[:300]
        return plan
    plan.info = {"width": info.width, "height": info.height, "fps": info.fps, "frames": info.frames, "duration_s": info.duration_s}
    plan.kept = kept_count(info.frames, video["stride"], video["max_frames"])
    prompted = bool(row.get("prompts"))  # prompts are carried forward by sam2's memory: a prompted video stays whole
    plan.chunks = plan_chunks(plan.kept, None if prompted else video.get("chunk_frames"), video["chunk_overlap"], video["detect_every"])
    return plan


def plan_path(root: str, shard_id: str) -> str:
    return f"{root}/{CHUNKS_DIR}/shard-{shard_id}.plan.json"


def write_plan(fs, root: str, plan: VideoPlan) -> None:
    atomic_write(fs, plan_path(root, plan.shard_id), json.dumps(plan.as_dict()).encode())


def plan_video_task(run_uri: str, run_storage_options: Optional[dict], shard_path: str, video: dict,
                    storage_options: Optional[dict] = None, max_pixels: Optional[int] = None) -> dict:
    """``plan_video`` as a Ray task, next to the data: the plan is written, then returned."""
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(run_uri, **(run_storage_options or {}))
    with fs.open(shard_path, "rb") as fh:
        (row,) = pq.read_table(fh).to_pylist()
    plan = plan_video(row, video, storage_options, max_pixels)
    write_plan(fs, root.rstrip("/"), plan)
    return plan.as_dict()


def chunk_name(shard_id: str, k: int) -> str:
    return f"shard-{shard_id}-c{k:04d}"


def chunk_key(image_id: str, k: int) -> str:
    """What the driver counts a chunk by (ShardTracker's image_id of a video's chunk)."""
    return f"{image_id}:c{k:04d}"


def _chunk_path(root: str, shard_id: str, k: int, kind: str) -> str:
    suffix = ".json" if kind == "marker" else f".{kind}.parquet"
    return f"{root}/{CHUNKS_DIR}/{chunk_name(shard_id, k)}{suffix}"


def chunk_done(fs, root: str, shard_id: str, k: int) -> bool:
    path = _chunk_path(root, shard_id, k, "marker")
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return fs.exists(path)


def write_chunk(fs, root: str, shard_id: str, k: int, window: tuple, images: list, objects: list, tracks: list, video: dict,
                meta_columns: list) -> None:
    """A chunk's files, objects first and its marker last: a marker means the chunk is whole."""
    for kind, table in (("objects", pa.Table.from_pylist(objects, schema=OBJECTS_SCHEMA)),
                        ("tracks", pa.Table.from_pylist(tracks, schema=CHUNK_TRACKS_SCHEMA)),
                        ("images", pa.Table.from_pylist(images, schema=images_schema(list(meta_columns))))):
        atomic_write(fs, _chunk_path(root, shard_id, k, kind), _parquet_bytes(table))
    marker = {"shard_id": shard_id, "chunk": k, "window": list(window), "video": video}
    atomic_write(fs, _chunk_path(root, shard_id, k, "marker"), json.dumps(marker).encode())


@dataclass
class Chunk:
    """One committed chunk, read back: its rows and its marker (the videos row it tracked)."""
    k: int
    images: pa.Table
    objects: pa.Table
    tracks: pa.Table
    video: dict


def read_chunk(fs, root: str, shard_id: str, k: int, meta_columns: list) -> Chunk:
    try:
        marker = json.loads(fs.cat_file(_chunk_path(root, shard_id, k, "marker")))
    except FileNotFoundError:
        raise RuntimeError(f"video shard {shard_id}: chunk {k} is not done (no marker), so the video cannot be joined") from None
    read = {kind: _read(fs, _chunk_path(root, shard_id, k, kind)) for kind in ("images", "objects", "tracks")}
    return Chunk(k, read["images"].cast(images_schema(list(meta_columns))), read["objects"].cast(OBJECTS_SCHEMA),
                 read["tracks"].cast(CHUNK_TRACKS_SCHEMA), marker["video"])


def read_plan(fs, root: str, shard_id: str) -> Optional[VideoPlan]:
    try:
        return VideoPlan(**json.loads(fs.cat_file(plan_path(root, shard_id))))
    except FileNotFoundError:
        return None


def video_chunk_files(fs, root: str, shard_id: str) -> list[str]:
    """Every file of the video's plan and chunks (temporary ones too)."""
    folder = f"{root}/{CHUNKS_DIR}"
    fs.invalidate_cache(folder)
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return [n for n in names if (m := CHUNK_FILE.fullmatch(n.rsplit("/", 1)[-1])) and m["shard"] == shard_id]


def unfinished_chunk_files(names: list[str], pending: set) -> list[str]:
    """Of ``_chunks/`` file names, those a resume removes: files of videos already committed (their
    commit was cut short before it removed them), parts of chunks without a marker, and temporary
    files. Plans and whole chunks of videos still to do stay: they are what the resume builds on."""
    matches = {n: CHUNK_FILE.fullmatch(n) for n in names}
    marked = {(m["shard"], m["chunk"]) for m in matches.values() if m and m["kind"] == ".json" and not m.group(0).startswith(".tmp-")}
    stale = []
    for name, m in matches.items():
        if m is None:
            continue
        if m["shard"] not in pending or name.startswith(".tmp-") or (m["chunk"] is not None and (m["shard"], m["chunk"]) not in marked):
            stale.append(name)
    return stale


# ---------------------------------------------------------------------------------------- join


def join_video(plan: VideoPlan, chunks: list[Chunk], match_iou: float, min_track_frames: int) -> tuple[pa.Table, pa.Table, dict, list]:
    """The chunks of one video as one video: (images, objects, videos row, tracks rows)."""
    if len(chunks) == 1:  # the video is its one chunk, exactly as tracked
        (chunk,) = chunks
        return chunk.images, chunk.objects, chunk.video, chunk.tracks.drop_columns(["votes"]).to_pylist()
    from pipeline.sam.track_join import join_chunks

    stride = plan.stride
    frames = [dict(zip(c.images.column("image_id").to_pylist(), c.images.column("frame_index").to_pylist())) for c in chunks]

    def owned_by(k: int, frame: Optional[int]) -> bool:
        start, stop = plan.owned(k)
        return frame is not None and start * stride <= frame and (stop is None or frame < stop * stride)

    objects = [c.objects.to_pylist() for c in chunks]
    shared = [sorted(range(plan.chunks[k + 1][0] * stride, plan.chunks[k][1] * stride, stride)) for k in range(len(chunks) - 1)]
    masks = []  # per chunk: frame -> {track: rle} on the frames it shares with a neighbour
    for k, rows in enumerate(objects):
        near = set(shared[k - 1] if k else ()) | set(shared[k] if k < len(shared) else ())
        chunk_masks: dict = {}
        for row in rows:
            frame = frames[k].get(row["image_id"])
            if frame in near and row["track_id"] is not None and row["status"] == "ok":
                chunk_masks.setdefault(frame, {})[row["track_id"]] = row["mask"]
        masks.append(chunk_masks)
    tracks = [c.tracks.to_pylist() for c in chunks]
    joined = join_chunks([[t["track_id"] for t in rows] for rows in tracks],
                         [(masks[k], masks[k + 1], shared[k]) for k in range(len(shared))], match_iou)

    # what each group keeps: the objects rows and detector votes on frames its chunks speak for
    kept_rows: dict[int, list] = {}
    votes: dict[int, list] = {}
    all_votes: dict[int, list] = {}
    first: dict[int, dict] = {}  # the group's earliest member's tracks row (object_key, source)
    for k, rows in enumerate(tracks):
        for t in rows:
            g = joined.groups[(k, t["track_id"])]
            first.setdefault(g, t)
            all_votes.setdefault(g, []).extend(t["votes"] or [])
            votes.setdefault(g, []).extend(v for v in t["votes"] or [] if owned_by(k, v["frame"]))
    untracked = []  # objects rows of no track (none today): kept as they are
    for k, rows in enumerate(objects):
        for row in rows:
            if not owned_by(k, frames[k].get(row["image_id"])):
                continue
            if row["track_id"] is None:
                untracked.append(row)
            else:
                kept_rows.setdefault(joined.groups[(k, row["track_id"])], []).append((k, row))
    live = sorted(g for g in first if kept_rows.get(g) or votes.get(g))  # a group seen only where another chunk speaks is that chunk's
    number = {g: n for n, g in enumerate(live, start=1)}

    track_rows, per_image = [], {}
    for g in live:
        chosen = votes.get(g) or all_votes.get(g) or []
        tally = Counter((v["class_id"], v["class_name"]) for v in chosen)
        (class_id, class_name) = min(tally, key=lambda c: (-tally[c], c[0])) if tally else (None, None)
        det_score = sum(v["score"] for v in chosen) / len(chosen) if chosen else first[g]["mean_det_score"]
        rows = kept_rows.get(g, [])
        for k, row in rows:
            row.update(track_id=number[g], class_id=class_id, class_name=class_name, det_score=det_score)
            per_image.setdefault(row["image_id"], []).append(row)
        fi = [frames[k][row["image_id"]] for k, row in rows]
        scores = [row["mask_score"] for _, row in rows]
        track_rows.append({
            "video_uri": plan.uri, "track_id": number[g], "object_key": first[g]["object_key"], "class_id": class_id,
            "class_name": class_name, "first_frame": min(fi) if fi else None, "last_frame": max(fi) if fi else None,
            "num_frames": len(fi), "mean_mask_score": sum(scores) / len(scores) if scores else None, "mean_det_score": det_score,
            "source": first[g]["source"], "shard_id": plan.shard_id,
        })
    for row in untracked:
        per_image.setdefault(row["image_id"], []).append(row)

    images, object_rows = [], []
    for k, chunk in enumerate(chunks):
        for image in chunk.images.to_pylist():
            if not owned_by(k, image["frame_index"]):
                continue
            mine = sorted(per_image.get(image["image_id"], []), key=lambda r: (r["track_id"] is None, r["track_id"] or 0, r["object_id"]))
            for object_id, row in enumerate(mine):
                row["object_id"] = object_id
            image.update(num_objects=len(counted(mine)), class_counts=class_counts(mine))
            images.append(image)
            object_rows.extend(mine)
    video = _joined_video_row(plan, chunks, len(images), track_rows, min_track_frames)
    schema = chunks[0].images.schema
    images_table = pa.Table.from_pylist(images, schema=schema).sort_by([("uri", "ascending"), ("image_id", "ascending")])
    objects_table = pa.Table.from_pylist(object_rows, schema=OBJECTS_SCHEMA)
    return images_table, objects_table, video, track_rows


def _joined_video_row(plan: VideoPlan, chunks: list[Chunk], frames_processed: int, tracks: list, min_track_frames: int) -> dict:
    """The videos row of the joined video: the first chunk's facts, the first error of any chunk
    (its frames before it are kept, as for a video cut short), counts over the joined tracks."""
    video = dict(chunks[0].video)
    failed = next((c.video for c in chunks if c.video["status"] != "ok"), None)
    if failed is not None:
        video.update(status="error", error_class=failed["error_class"], error=failed["error"])
    counted_tracks = [{"status": "ok", "candidate": 0, "class_id": t["class_id"], "class_name": t["class_name"]}
                      for t in tracks if t["num_frames"] >= min_track_frames]
    video.update(frames_processed=frames_processed, num_tracks=len(tracks), class_counts=class_counts(counted_tracks))
    return video
