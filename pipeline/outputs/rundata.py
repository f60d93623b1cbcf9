"""The one layer through which report, export and review read a run: ``RunData`` opens ``RUN``
(any fsspec URL), checks it is a run, lists its Parquet parts and loads its review decisions, so
every command reads runs the same way and fails the same way on a folder that is not one; and
the run's images re-read as the pipeline saw them (``read_image``, ``read_rgb``).

Readers see the objects table normalised (outputs/columns.py) and, after ``autolabel review
import``, reviewed (outputs/decisions.py): objects a person reviewed have ``review`` set and
``needs_review`` false.
"""
from __future__ import annotations

import json
from typing import Optional

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from pipeline.io.credentials import redact
from pipeline.outputs.columns import DUPLICATE, UNLABELED
from pipeline.run.ownership import SUMMARIES_DIR, normalised_path


# run.json's classes.defined_by -> what the report says about it
CLASS_DEFINITIONS = {
    "text": "named in text (an open-vocabulary detector's text encoder)",
    "examples": "shown by example (YOLOE visual prompts: reference images with boxes)",
    "file": "class embeddings from a file (detector.class_embeddings)",
    "closed-set": "the detector's own classes (a closed-set YOLO)",
    "manifest": "the prompt manifest's labels (no detector)",
    "automatic": "automatic: every mask SAM finds, without classes",
}
COCO_NAMES = [  # ultralytics' cfg/datasets/coco.yaml, the official YOLOv8 / YOLO11 detectors' classes
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant",
    "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]


class RunError(ValueError):
    """RUN_DIR is not a readable autolabel run; the message says why."""


def counted_sql(columns: list[str], include_duplicates: bool = False, alias: str = "") -> str:
    """Rows that are objects: runs with prompt-error rows and extra SAM candidates mark them
    (``status``, ``candidate``); ``num_objects`` counts exactly these. ``include_duplicates``:
    also masks marked ``status=duplicate`` (never counted in ``num_objects``)."""
    status = f"{alias}status IN ('ok', 'duplicate')" if include_duplicates else f"{alias}status = 'ok'"
    parts = ([status] if "status" in columns else []) + ([f"{alias}candidate = 0"] if "candidate" in columns else [])
    return "(" + " AND ".join(parts) + ")" if parts else "TRUE"


class RunData:
    """A run folder: ``run.json`` plus ``images/`` and ``objects/`` Parquet parts, local or remote."""

    def __init__(self, uri: str, storage_options: Optional[dict] = None):
        self.uri = str(uri)
        self.storage_options = storage_options or {}
        try:
            self.fs, root = url_to_fs(self.uri, **self.storage_options)
        except Exception as exc:  # noqa: BLE001 - unknown protocol, options the filesystem does not take, ...
            raise RunError(redact(f"{self.uri}: cannot open ({type(exc).__name__}: {exc})", self.storage_options)) from None
        try:
            self.root = normalised_path(self.fs, root)  # `..`, `.`, trailing `/`: one folder, one spelling
        except ValueError as exc:
            raise RunError(f"{self.uri}: {exc}") from None
        try:
            raw = self.fs.cat_file(f"{self.root}/run.json")
        except FileNotFoundError:
            raise RunError(f"{self.uri}: no run.json here; RUN_DIR must be the output.uri of an `autolabel run`") from None
        except Exception as exc:  # noqa: BLE001 - OSError, and back-end errors such as botocore's NoCredentialsError
            hint = "" if self.is_local else "; pass the storage's credentials with --storage-option key=value (repeatable)"
            raise RunError(redact(f"{self.uri}: cannot read run.json ({type(exc).__name__}: {exc}){hint}", self.storage_options)) from None
        try:
            self.manifest = json.loads(raw)
        except ValueError as exc:
            raise RunError(f"{self.uri}/run.json is not valid JSON ({exc})") from None
        self._datasets: dict = {}
        self.image_files = self._parts("images")
        self.object_files = self._parts("objects")
        if not self.image_files:
            raise RunError(f"{self.uri}: run.json is there but images/ holds no Parquet files (status: {self.manifest.get('status')})")

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return protocol in ("file", "local")

    def _parts(self, table: str) -> list[str]:
        """Finished part files, sorted; the sink's temporary ``.tmp-*`` names are skipped."""
        try:
            names = self.fs.ls(f"{self.root}/{table}", detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith("."))

    @property
    def summary_files(self) -> list[str]:
        """``RUN/summaries/shard-X.parquet``: the shard summaries the commits wrote (report/summaries.py)."""
        if not hasattr(self, "_summary_files"):
            self._summary_files = self._parts(SUMMARIES_DIR)
        return self._summary_files

    @property
    def video_files(self) -> list[str]:
        """``RUN/videos/shard-X.parquet``: one row per video (none for a run of still images)."""
        if not hasattr(self, "_video_files"):
            self._video_files = self._parts("videos")
        return self._video_files

    def table_of(self, table: str, columns: Optional[list[str]] = None, filter=None):
        """A small table of the run read whole (``videos``, ``tracks``): None when the run has none."""
        files = self.video_files if table == "videos" else self._parts(table)
        if not files:
            return None
        return pads.dataset(files, filesystem=self.arrow_fs(), format="parquet").to_table(columns=columns, filter=filter)

    def video_rows(self) -> dict[str, dict]:
        """The ``videos`` rows by ``uri`` ({} for a run without videos)."""
        table = self.table_of("videos")
        return {} if table is None else {r["uri"]: r for r in table.to_pylist()}

    def arrow_fs(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem() if self.is_local else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def dataset(self, table: str) -> pads.Dataset:
        if table not in self._datasets:
            self._datasets[table] = self._open_dataset(table)
        return self._datasets[table]

    def _open_dataset(self, table: str) -> pads.Dataset:
        return self.dataset_of(table, self.image_files if table == "images" else self.object_files)

    def schema(self, table: str):
        """The table's schema: its first part's (extra metadata columns, e.g. from a prompt manifest, stay
        visible), read from that part alone, so asking costs one file however many parts there are."""
        if not hasattr(self, "_schemas"):
            self._schemas = {}
        if table not in self._schemas:
            from pipeline.run.tables import IMAGES_SCHEMA, OBJECTS_SCHEMA

            files = self.image_files if table == "images" else self.object_files
            schema = IMAGES_SCHEMA if table == "images" else OBJECTS_SCHEMA
            if files:
                schema = pads.dataset(files[:1], filesystem=self.arrow_fs(), format="parquet").schema
            self._schemas[table] = schema
        return self._schemas[table]

    def dataset_of(self, table: str, files: list[str]) -> pads.Dataset:
        """Some parts of a table (all of them: ``dataset``), read with the table's schema."""
        return pads.dataset(files, schema=self.schema(table), filesystem=self.arrow_fs(), format="parquet")

    def class_names(self) -> dict[int, str]:
        """The run's classes from run.json (all of them, also those never detected)."""
        names = self.manifest.get("class_names") or ((self.manifest.get("models") or {}).get("detector") or {}).get("class_names") or {}
        return {int(k): str(v) for k, v in names.items()}

    def class_definition(self) -> dict:
        """How the run's classes were defined, from run.json's record (``models.detector.classes``):
        ``defined_by`` (text | examples | file | closed-set | manifest | automatic), a sentence for
        people, and the embeddings' model and file for an open-vocabulary detector."""
        m = self.manifest
        det = (m.get("models") or {}).get("detector") or {}
        record = det.get("classes") or {}
        names = [name for _, name in sorted(self.class_names().items())]
        if ((m.get("config") or {}).get("automatic") or {}).get("enabled"):
            defined_by = "automatic"
        elif det:
            defined_by = record.get("defined_by", "closed-set")  # runs made before the record: closed-set detectors only
        else:
            defined_by = "manifest"
        out = {"defined_by": defined_by, "description": CLASS_DEFINITIONS.get(defined_by, defined_by), "names": names}
        if defined_by == "closed-set" and names[:80] == COCO_NAMES:
            out["description"] += ": the 80 COCO classes"
        if record.get("embeddings"):
            out.update(model_kind=record.get("model_kind"), embeddings=record["embeddings"])
        return out

    @property
    def object_columns(self) -> list[str]:
        return self.schema("objects").names if self.object_files else []

    def counted_sql(self, include_duplicates: bool = False, alias: str = "") -> str:
        return counted_sql(self.object_columns, include_duplicates, alias)

    def counted_expression(self, include_duplicates: bool = False) -> Optional[pc.Expression]:
        cols, expr = self.object_columns, None
        if "status" in cols:
            expr = pc.field("status").isin(["ok", DUPLICATE]) if include_duplicates else pc.field("status") == "ok"
        if "candidate" in cols:
            cand = pc.field("candidate") == 0
            expr = cand if expr is None else expr & cand
        return expr

    @property
    def has_qa(self) -> bool:
        """Did the run record quality metrics and flags (runs made before them did not)?"""
        return "needs_review" in self.object_columns

    def review_files(self) -> list[str]:
        """``RUN/review/import-*.parquet``: decisions recorded by ``autolabel review import``, oldest first."""
        self.fs.invalidate_cache(f"{self.root}/review")
        return [p for p in self._parts("review") if p.rsplit("/", 1)[-1].startswith("import-")]

    @property
    def review(self):
        """The run's review decisions (``decisions.Review``), read once; empty when none were imported."""
        if not hasattr(self, "_review"):
            from pipeline.outputs.decisions import Review

            self._review = Review.load(self)
        return self._review

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol("/".join([self.root, *parts]))


def read_image(uri: str, storage_options: Optional[dict] = None) -> bytes:
    """The bytes behind an images-table ``uri`` (tar members included), read with the storage
    options of the images (the run's ``input.storage_options``; ``--image-storage-option``).

    Every failure is a ``errors.ImageError`` with its error class, also those fsspec back-ends raise
    outside ``OSError`` (botocore's ``NoCredentialsError``, ...); messages never hold the options' values."""
    from pipeline.errors import ImageError
    from pipeline.io.decode import read_image_bytes

    try:
        return read_image_bytes(uri, storage_options)
    except ImageError as exc:
        if storage_options:
            clean = redact(str(exc), storage_options)
            if clean != str(exc):
                raise ImageError(exc.error_class, clean) from None
        raise
    except Exception as exc:  # noqa: BLE001 - any back-end failure is this image's read error
        raise ImageError("read_error", redact(f"{type(exc).__name__}: {exc}", storage_options)) from None


def read_rgb(uri: str, storage_options: Optional[dict] = None):
    """An image as the pipeline saw it (EXIF orientation applied, RGB), so masks line up with it.

    Same reader and decoder as the decode stage (tar members included); failures raise
    ``errors.ImageError`` with its error class."""
    from pipeline.io.decode import decode_rgb
    from pipeline.io.shards import is_video

    video, mark, frame = uri.rpartition("#frame=")
    if mark and frame.isdigit() and is_video(video):  # a video frame's row (stages/track.py): that decoded frame
        from pipeline.errors import ImageError
        from pipeline.io.video import iter_frames

        for decoded in iter_frames(video, max_frames=1, start=int(frame), storage_options=storage_options):
            return decoded.rgb  # HxWx3 uint8, as decode_rgb gives a still image
        raise ImageError("not_found", f"{video} has no frame {frame}")
    return decode_rgb(read_image(uri, storage_options))


def known_classes(run: RunData) -> dict[int, str]:
    """Detector classes from run.json, plus any class found in the objects table (column scan only)."""
    names = run.class_names()
    unlabeled = False
    if run.object_files:
        seen = run.dataset("objects").to_table(columns=["class_id", "class_name"]).group_by(["class_id", "class_name"]).aggregate([])
        for cid, cname in zip(seen.column("class_id").to_pylist(), seen.column("class_name").to_pylist()):
            if cid is None:
                unlabeled = True
            else:
                names.setdefault(int(cid), cname)
    if unlabeled:
        names[max(names, default=-1) + 1] = UNLABELED
    return names
