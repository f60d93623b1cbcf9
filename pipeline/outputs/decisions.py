"""Review decisions, and the run as reviewed that every export and the report read.

``autolabel review import`` (outputs/review.py) records its decisions in
``RUN/review/import-<UTC time>.parquet`` (``DECISION_SCHEMA``; a JSON log in ``RUN/review/_logs/``),
each with the ``run_id`` of the run it was made on: decisions of another run are ignored (with a
warning) rather than applied to objects that merely share an ``object_id``. Imports supersede each
other per object, in the order they were made (their file names sort by time): the newest
decision about an object wins.

``Review`` is the run as reviewed: rejected objects left out, corrected ones with the person's
mask and label (``source = "review"``), added ones included (``source = "review"``), every
reviewed object with ``review`` set and ``needs_review`` false. A mask marked
``status=duplicate`` that a person accepted or corrected becomes an object again.
"""
from __future__ import annotations

import json
import logging
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.outputs.columns import DUPLICATE, REVIEW_COLUMN

log = logging.getLogger("autolabel.review")

DECISIONS = ("accepted", "corrected", "rejected", "added")
LOG_FOLDER = "_logs"  # RUN/review/_logs/import-X.json; the "_" keeps it out of pyarrow's and Spark's view of RUN/review
MASK_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
DECISION_SCHEMA = pa.schema([
    ("import_id", pa.string()),  # the import that made the decision (its file stem)
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("object_id", pa.int32()),  # the run's object, or a new id for an added one
    ("decision", pa.string()),  # accepted | corrected | rejected | added
    ("class_id", pa.int32()),  # corrected/added: the person's label (null = unlabeled); else the run's
    ("class_name", pa.string()),
    ("box", pa.list_(pa.float32(), 4)),  # corrected/added: the new mask's bounds (xyxy); else null
    ("area", pa.int64()),  # corrected/added: pixels of the new mask
    ("mask", MASK_TYPE),  # corrected/added: COCO RLE in original image pixels; else null
    ("ls_task_id", pa.int64()),
    ("ls_annotation_id", pa.int64()),
    ("ls_result_id", pa.string()),  # the region's id in Label Studio (null for rejected)
    ("export_id", pa.string()),  # the labelstudio export the task came from
    ("annotator", pa.string()),
    ("reviewed_at", pa.string()),  # the annotation's updated_at (or created_at)
    ("run_id", pa.string()),  # the run the decision was made on (run.json's run_id; null: a run made before runs had ids)
])


class Review:
    """A run's review decisions, newest per object, and how they change its objects table."""

    def __init__(self, decisions: pa.Table, logs: list[dict]):
        self.decisions = decisions  # every import's rows, oldest import first
        self.logs = logs
        self.final: dict[tuple[str, int], dict] = {}
        for row in decisions.to_pylist():
            self.final[(row["image_id"], row["object_id"])] = row
        self.images = {image_id for image_id, _ in self.final}

    @classmethod
    def load(cls, run) -> "Review":
        """The decisions made on ``run`` (a ``rundata.RunData``) (their ``run_id`` is run.json's); those of another run (an
        earlier run in the same folder, or files copied here) are ignored, with a warning."""
        run_id = run.manifest.get("run_id")
        tables, logs, ignored, ignored_files = [], [], 0, 0
        for path in run.review_files():
            table = pq.read_table(path, filesystem=run.arrow_fs(), schema=DECISION_SCHEMA)
            try:
                folder, name = path.rsplit("/", 1)
                entry = json.loads(run.fs.cat_file(f"{folder}/{LOG_FOLDER}/{name[: -len('.parquet')]}.json"))
            except (OSError, ValueError):
                entry = {"import_id": path.rsplit("/", 1)[-1][: -len(".parquet")]}
            ids = table.column("run_id")
            mine = table.filter(pc.is_null(ids) if run_id is None else pc.fill_null(pc.equal(ids, run_id), False))
            if mine.num_rows < table.num_rows or (not table.num_rows and entry.get("run_id") != run_id):
                ignored += table.num_rows - mine.num_rows
                ignored_files += 1
            if mine.num_rows or (not table.num_rows and entry.get("run_id") == run_id):
                tables.append(mine)
                logs.append(entry)
        if ignored_files:
            log.warning("review: ignoring %d decisions (%d import files in %s) made on another run than this one (run_id %s): "
                        "an earlier run in this folder, or files copied here; they do not apply to this run's objects",
                        ignored, ignored_files, run.url("review"), run_id)
        table = pa.concat_tables(tables) if tables else DECISION_SCHEMA.empty_table()
        return cls(table, logs)

    def __bool__(self) -> bool:
        return bool(self.final)

    def counts(self) -> dict:
        """Objects by their final decision; ``reviewed`` = the run's own objects a person decided on."""
        out = {d: 0 for d in DECISIONS}
        for row in self.final.values():
            out[row["decision"]] += 1
        out["reviewed"] = out["accepted"] + out["corrected"] + out["rejected"]
        return out

    def touches(self, image_ids: Iterable[str]) -> bool:
        return any(i in self.images for i in image_ids)

    def apply(self, table: pa.Table, counted: Optional[pc.Expression], include_duplicates: bool = False) -> pa.Table:
        """One objects part (normalised, every row) -> its counted objects as reviewed. ``counted`` is
        ``RunData.counted_expression(include_duplicates)``: which rows are objects when nothing was reviewed."""
        image_ids = set(pc.unique(table.column("image_id")).to_pylist())
        if not self.touches(image_ids):
            return table if counted is None else table.filter(counted)
        counted_status = ("ok", DUPLICATE) if include_duplicates else ("ok",)
        rows = []
        for row in table.to_pylist():
            status, candidate = row.get("status", "ok"), row.get("candidate", 0)
            eligible = candidate == 0 and status in ("ok", DUPLICATE)
            decision = self.final.get((row["image_id"], row["object_id"])) if eligible else None
            if decision is None or decision["decision"] == "added":  # ("added" ids never collide with the run's)
                if status in counted_status and candidate == 0:
                    rows.append(row)
                continue
            if decision["decision"] == "rejected":
                continue
            row.update(needs_review=False, **{REVIEW_COLUMN: decision["decision"]})
            if "status" in row:
                row["status"] = "ok"
            if decision["decision"] == "corrected":
                row.update(source="review", **{k: decision[k] for k in ("class_id", "class_name", "mask", "area")})
            rows.append(row)
        rows += self.added_rows(image_ids, table.schema.names)
        return pa.Table.from_pylist(rows, schema=table.schema)

    def added_rows(self, image_ids: Optional[set] = None, columns: Optional[list[str]] = None) -> list[dict]:
        """Objects a person drew, as objects-table rows (sorted by image, object_id)."""
        out = []
        for (image_id, object_id), d in sorted(self.final.items()):
            if d["decision"] != "added" or (image_ids is not None and image_id not in image_ids):
                continue
            row = {
                "image_id": image_id, "uri": d["uri"], "object_id": object_id, "object_key": None, "source": "review",
                "prompt": None, "candidate": 0, "status": "ok", "error": None, "class_id": d["class_id"],
                "class_name": d["class_name"], "det_score": None, "mask_score": None, "box": d["box"], "area": d["area"],
                "mask": d["mask"], "flags": [], "needs_review": False, REVIEW_COLUMN: "added",
            }
            if columns is not None:
                row = {c: row.get(c) for c in columns}
            out.append(row)
        return out

    def sql_view(self, con, run, base: str, schema: pa.Schema, include_duplicates: bool, name: str) -> None:
        """CREATE VIEW ``name`` (duckdb): the counted rows of ``base`` (a view of the normalised objects
        table with ``schema``) of ``run`` (a ``rundata.RunData``), as reviewed. The SQL twin of ``apply``."""
        if not self:
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM {base} WHERE {run.counted_sql(include_duplicates)}")
            return
        keys = ("image_id", "object_id", "decision", "class_id", "class_name", "mask", "area")
        final = pa.Table.from_pylist([{k: d[k] for k in keys} for d in self.final.values() if d["decision"] != "added"],
                                     schema=pa.schema([DECISION_SCHEMA.field(k) for k in keys]))
        added = pa.Table.from_pylist(self.added_rows(None, schema.names), schema=schema)
        con.register(f"{name}_decisions", final)
        con.register(f"{name}_added", added)

        def corrected(column: str) -> str:
            return f"CASE WHEN d.decision = 'corrected' THEN d.{column} ELSE o.{column} END AS {column}"

        replaced = [corrected(c) for c in ("class_id", "class_name", "mask", "area")] + [
            "CASE WHEN d.decision = 'corrected' THEN 'review' ELSE o.source END AS source",
            "CASE WHEN d.decision IS NULL THEN o.status ELSE 'ok' END AS status",
            "CASE WHEN d.decision IS NULL THEN o.needs_review ELSE false END AS needs_review",
            f"d.decision AS {REVIEW_COLUMN}",
        ]
        con.execute(
            f"CREATE VIEW {name} AS "
            f"SELECT o.* REPLACE ({', '.join(replaced)}) FROM {base} o "
            f"LEFT JOIN {name}_decisions d ON o.image_id = d.image_id AND o.object_id = d.object_id "
            f"WHERE (d.decision IS NULL OR d.decision = 'added') AND {run.counted_sql(include_duplicates, alias='o.')} "
            "OR d.decision IN ('accepted', 'corrected') AND o.candidate = 0 AND o.status IN ('ok', 'duplicate') "
            f"UNION ALL BY NAME SELECT * FROM {name}_added"
        )
