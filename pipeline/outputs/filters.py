"""What ``autolabel report`` and ``autolabel export`` read: a run folder, and which of its objects.

``RunData`` opens ``RUN`` (any fsspec URL), checks it is a run, and lists its Parquet parts, so
both commands read runs the same way and fail the same way on a folder that is not one.
``ObjectFilter`` is one definition of ``--min-mask-score/--min-area/--classes/--flagged/
--unflagged/--include-duplicates`` with three consumers: a SQL predicate for the report's duckdb
queries, a pyarrow expression for the exports' streaming reads, and a line of text saying what was
applied (so a filtered report or export never passes for the whole run).

Both predicates read the objects table *normalised* (``QA_COLUMNS`` and ``review`` present: null
where a run made before the quality metrics has none, so such a run counts as nothing flagged) and,
after ``autolabel review import``, *reviewed* (pipeline/review.py): objects a person reviewed have
``review`` set and ``needs_review`` false, and pass ``--min-mask-score`` (a person checked them).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from pipeline.io.credentials import redact  # noqa: F401 - report, export and the CLI import it from here
from pipeline.run.ownership import normalised_path


class FilterError(ValueError):
    """A filter the user must fix (bad value or unknown class)."""


UNLABELED = "(unlabeled)"  # class name shown for objects without a class (manifest prompts with no label)

# Quality-control columns of the objects table (written by the segment stage; absent in runs made
# before them, where readers see them as nulls: no metrics, nothing flagged).
QA_COLUMNS = {
    "stability": pa.float32(),  # SAM's stability score (IoU of the logits thresholded at +1 and -1)
    "box_iou": pa.float32(),  # IoU of the mask's tight box with the prompt box
    "outside_box": pa.float32(),  # share of the mask's pixels outside the prompt box
    "regions": pa.int32(),  # connected regions of the mask (8-connectivity)
    "largest_region": pa.float32(),  # share of the area in the largest region
    "hole_area": pa.int64(),  # background pixels enclosed by the mask
    "flags": pa.list_(pa.string()),  # reasons the object needs a look
    "needs_review": pa.bool_(),  # flags is not empty
    "duplicate_of": pa.int32(),  # status=duplicate: object_id of the object kept in its place
}
FLAG_REASONS = ("low_score", "unstable", "leaks_box", "fragmented", "tiny", "duplicate")
REVIEW_COLUMN = "review"  # accepted | corrected | added after `autolabel review import`; null = not reviewed
DUPLICATE = "duplicate"  # objects-table status of a mask marked as a duplicate of another


def normalize_objects(table: pa.Table) -> pa.Table:
    """An objects table with every QA column and ``review`` (null where the run has none)."""
    for name, typ in [*QA_COLUMNS.items(), (REVIEW_COLUMN, pa.string())]:
        if name not in table.column_names:
            table = table.append_column(pa.field(name, typ), pa.nulls(table.num_rows, typ))
    return table


def normalized_columns_sql(columns: list[str]) -> str:
    """``SELECT`` list adding the QA columns and ``review`` a table lacks, as typed NULLs (duckdb)."""
    types = {pa.float32(): "FLOAT", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN",
             pa.list_(pa.string()): "VARCHAR[]", pa.string(): "VARCHAR"}
    missing = [(n, t) for n, t in [*QA_COLUMNS.items(), (REVIEW_COLUMN, pa.string())] if n not in columns]
    return "".join(f", NULL::{types[t]} AS {n}" for n, t in missing)


class RunError(ValueError):
    """RUN_DIR is not a readable autolabel run; the message says why."""


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

    def arrow_fs(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem() if self.is_local else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def dataset(self, table: str) -> pads.Dataset:
        if table not in self._datasets:
            self._datasets[table] = self._open_dataset(table)
        return self._datasets[table]

    def _open_dataset(self, table: str) -> pads.Dataset:
        from pipeline.run.sink import IMAGES_SCHEMA, OBJECTS_SCHEMA

        files = self.image_files if table == "images" else self.object_files
        schema = IMAGES_SCHEMA if table == "images" else OBJECTS_SCHEMA
        if files:
            # Unify with the files' own schema so extra metadata columns (e.g. from a prompt manifest) stay visible.
            schema = pads.dataset(files[:1], filesystem=self.arrow_fs(), format="parquet").schema
        return pads.dataset(files, schema=schema, filesystem=self.arrow_fs(), format="parquet")

    def class_names(self) -> dict[int, str]:
        """The run's classes from run.json (all of them, also those never detected)."""
        names = self.manifest.get("class_names") or ((self.manifest.get("models") or {}).get("detector") or {}).get("class_names") or {}
        return {int(k): str(v) for k, v in names.items()}

    @property
    def object_columns(self) -> list[str]:
        return self.dataset("objects").schema.names if self.object_files else []

    def counted_sql(self, include_duplicates: bool = False, alias: str = "") -> str:
        """Rows that are objects: runs with prompt-error rows and extra SAM candidates mark them
        (``status``, ``candidate``); ``num_objects`` counts exactly these. ``include_duplicates``:
        also masks marked ``status=duplicate`` (never counted in ``num_objects``)."""
        cols = self.object_columns
        status = f"{alias}status IN ('ok', 'duplicate')" if include_duplicates else f"{alias}status = 'ok'"
        parts = ([status] if "status" in cols else []) + ([f"{alias}candidate = 0"] if "candidate" in cols else [])
        return "(" + " AND ".join(parts) + ")" if parts else "TRUE"

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
        """The run's review decisions (``review.Review``), read once; empty when none were imported."""
        if not hasattr(self, "_review"):
            from pipeline.outputs.review import Review

            self._review = Review.load(self)
        return self._review

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol("/".join([self.root, *parts]))


def read_image(uri: str, storage_options: Optional[dict] = None) -> bytes:
    """The bytes behind an images-table ``uri`` (tar members included), read with the storage
    options of the images (the run's ``input.storage_options``; ``--image-storage-option``).

    Every failure is a ``decode.ImageError`` with its error class, also those fsspec back-ends raise
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
    ``decode.ImageError`` with its error class."""
    from pipeline.io.decode import decode_rgb

    return decode_rgb(read_image(uri, storage_options))


CREDENTIAL_KEY = re.compile(r"key|secret|token|pass|cred|auth|sas|sig|session", re.IGNORECASE)


class OptionError(ValueError):
    """A malformed ``--storage-option``/``--image-storage-option`` (the message never shows its value)."""


def parse_storage_options(items: Optional[list[str]], flag: str = "--storage-option") -> dict:
    """``["key=ID", "secret=S", "endpoint_url=http://h:9000", "anon=true"]`` -> fsspec storage options.

    Values are read like ``autolabel run``'s key=value overrides: YAML booleans, numbers, lists and
    mappings (``client_kwargs={region_name: eu-west-1}``), other text exactly as typed; values of
    credential-like keys (``key``, ``secret``, ``token``, ...) stay text even when they look like
    numbers or booleans.
    A repeated key is refused. Error messages name the key only, never a value."""
    import yaml

    options: dict = {}
    for n, item in enumerate(items or [], 1):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            # The item is not shown: without its '=' it may well be a bare secret.
            raise OptionError(f"{flag} number {n} is not key=value (e.g. {flag} endpoint_url=http://127.0.0.1:9000)")
        if key in options:
            raise OptionError(f"{flag} {key} is given twice")
        value = raw
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed = raw
        if isinstance(parsed, (dict, list)):
            value = parsed
        elif CREDENTIAL_KEY.search(key):
            value = raw  # a password "yes" or "0123" stays the text it is
        elif isinstance(parsed, (bool, int, float)) or (parsed is None and raw.strip() in ("null", "~")):
            value = parsed
        options[key] = value
    return options


@dataclass(frozen=True)
class ObjectFilter:
    min_mask_score: Optional[float] = None
    min_area: Optional[int] = None
    class_ids: tuple[int, ...] = ()
    class_names: tuple[str, ...] = field(default_factory=tuple)
    flagged: Optional[bool] = None  # True: --flagged (needs_review), False: --unflagged, None: both
    include_duplicates: bool = False  # --include-duplicates: also masks marked status=duplicate

    @classmethod
    def parse(cls, min_mask_score: Optional[float] = None, min_area: Optional[int] = None, classes: Optional[str] = None,
              flagged: bool = False, unflagged: bool = False, include_duplicates: bool = False) -> "ObjectFilter":
        """``--classes person,car`` or ``--classes 0,2`` (names and ids may be mixed)."""
        if flagged and unflagged:
            raise FilterError("--flagged and --unflagged exclude each other: give one (or neither, for all objects)")
        if min_mask_score is not None and not 0.0 <= min_mask_score <= 1.0:
            raise FilterError(f"--min-mask-score must be between 0 and 1 (got {min_mask_score})")
        if min_area is not None and min_area < 0:
            raise FilterError(f"--min-area must be >= 0 pixels (got {min_area})")
        ids, names = [], []
        for item in (classes or "").split(","):
            item = item.strip()
            if not item:
                continue
            (ids.append(int(item)) if item.isdigit() else names.append(item))
        if classes is not None and not ids and not names:
            raise FilterError("--classes needs at least one class name or id, e.g. --classes person,car or --classes 0,2")
        return cls(min_mask_score, min_area, tuple(ids), tuple(names), True if flagged else False if unflagged else None,
                   bool(include_duplicates))

    @property
    def active(self) -> bool:
        return (self.min_mask_score is not None or self.min_area is not None or bool(self.class_ids or self.class_names)
                or self.flagged is not None or self.include_duplicates)

    def check_classes(self, known: dict[int, str]) -> None:
        """Refuse class names/ids the run does not have (a typo would silently select nothing)."""
        bad = [str(i) for i in self.class_ids if i not in known] + [n for n in self.class_names if n not in known.values()]
        if bad:
            shown = ", ".join(f"{i}={n}" for i, n in sorted(known.items())[:40])
            raise FilterError(f"--classes: {', '.join(bad)} not in this run's classes ({shown}{' ...' if len(known) > 40 else ''})")

    def sql(self) -> str:
        """Predicate over the normalised objects table's columns, for duckdb (``TRUE`` when nothing is filtered);
        ``status``/``candidate`` (which rows are objects) are ``RunData.counted_sql``'s."""
        parts = []
        if self.min_mask_score is not None:
            parts.append(f"(mask_score >= {float(self.min_mask_score)!r} OR {REVIEW_COLUMN} IS NOT NULL)")
        if self.min_area is not None:
            parts.append(f"area >= {int(self.min_area)}")
        if self.class_ids or self.class_names:
            alternatives = []
            if self.class_ids:
                alternatives.append(f"class_id IN ({', '.join(str(int(i)) for i in self.class_ids)})")
            if self.class_names:
                quoted = ", ".join("'" + n.replace("'", "''") + "'" for n in self.class_names)
                alternatives.append(f"class_name IN ({quoted})")
            parts.append("(" + " OR ".join(alternatives) + ")")
        if self.flagged is not None:
            parts.append("needs_review IS TRUE" if self.flagged else "needs_review IS NOT TRUE")
        return " AND ".join(parts) if parts else "TRUE"

    def expression(self) -> Optional[pc.Expression]:
        """The same predicate as a pyarrow expression (None when nothing is filtered)."""
        expr = None

        def both(a, b):
            return b if a is None else a & b

        if self.min_mask_score is not None:  # null >= x is null, and null | true is true (Kleene logic, as in SQL)
            expr = both(expr, (pc.field("mask_score") >= self.min_mask_score) | pc.field(REVIEW_COLUMN).is_valid())
        if self.min_area is not None:
            expr = both(expr, pc.field("area") >= self.min_area)
        if self.class_ids or self.class_names:
            cls_expr = None
            if self.class_ids:
                cls_expr = pc.field("class_id").isin(list(self.class_ids))
            if self.class_names:
                by_name = pc.field("class_name").isin(list(self.class_names))
                cls_expr = by_name if cls_expr is None else cls_expr | by_name
            expr = both(expr, cls_expr)
        if self.flagged is not None:
            flagged = pc.field("needs_review").is_valid() & pc.field("needs_review")  # null (no QA) counts as not flagged
            expr = both(expr, flagged if self.flagged else ~flagged)
        return expr

    def keeps_class(self, class_id: int, class_name: str) -> bool:
        if not (self.class_ids or self.class_names):
            return True
        return class_id in self.class_ids or class_name in self.class_names

    def describe(self) -> str:
        parts = []
        if self.min_mask_score is not None:
            parts.append(f"mask_score >= {self.min_mask_score}")
        if self.min_area is not None:
            parts.append(f"area >= {self.min_area} px")
        if self.class_ids or self.class_names:
            parts.append("classes " + ", ".join([*map(str, self.class_ids), *self.class_names]))
        if self.flagged is not None:
            parts.append("flagged for review" if self.flagged else "not flagged for review")
        if self.include_duplicates:
            parts.append("duplicates included")
        return "; ".join(parts) if parts else "none"

    def as_dict(self) -> dict:
        return {
            "min_mask_score": self.min_mask_score,
            "min_area": self.min_area,
            "classes": [*self.class_ids, *self.class_names] or None,
            "flagged": self.flagged,
            "include_duplicates": self.include_duplicates,
        }
