"""The report's numbers: duckdb views over the run's Parquet parts (every row, normalised, reviewed,
filtered) and the queries behind every figure of the page, summary.json and counts.csv. duckdb
scans the pyarrow datasets column by column and spills past ``DUCKDB_MEMORY_LIMIT`` to a
private temp folder, so a run with tens of millions of objects reports in bounded memory.
"""
from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from pipeline.outputs.columns import FLAG_REASONS, QA_COLUMNS, UNLABELED, normalize_objects, normalized_columns_sql
from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.rundata import RunData

FOLDER = "folder"  # --group-by pseudo-column: the parent folder of each image's URI
SCORE_BINS = 50
AREA_BINS_PER_DECADE = 10
MAX_GROUPS = 1000  # groups kept in summary.json (the page shows TOP_GROUPS_SHOWN; counts.csv has all)
DUCKDB_MEMORY_LIMIT = "1GB"


class ReportError(ValueError):
    """A report option the user must fix (e.g. an unknown --group-by column)."""


@dataclass
class ReportOptions:
    group_by: str = FOLDER
    gallery: int = 12
    filter: ObjectFilter = ObjectFilter()
    seed: int = 0
    flagged_gallery: int = 12  # flagged objects drawn in the quality section


class RunStats:
    """The report's queries. Views: ``images`` (all rows), ``objects_norm`` (every objects row, QA columns
    present), ``objects_reviewed`` (the objects as reviewed, duplicates included), ``objects`` (what the
    report counts: reviewed, filtered), ``per_image``."""

    def __init__(self, run: RunData, options: ReportOptions):
        import duckdb

        self.run, self.options = run, options
        # Bounded memory: duckdb spills joins/aggregates past the limit to a private temp folder.
        self.tmp = tempfile.mkdtemp(prefix="autolabel-report-")
        self.con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY_LIMIT, "temp_directory": self.tmp})
        self.con.execute("SET preserve_insertion_order = false")
        if sys.stderr.isatty():  # duckdb's own progress bar for the long scans of a big run
            self.con.execute("SET enable_progress_bar = true")
        self.con.register("images_ds", run.dataset("images"))
        self.image_columns = run.dataset("images").schema.names
        if run.object_files:
            self.con.register("objects_ds", run.dataset("objects"))
            schema = run.dataset("objects").schema
        else:  # a run where nothing was detected may have no objects parts at all
            from pipeline.run.tables import OBJECTS_SCHEMA

            self.con.register("objects_ds", OBJECTS_SCHEMA.empty_table())
            schema = OBJECTS_SCHEMA
        self.con.execute("CREATE VIEW images AS SELECT * FROM images_ds")
        # QA columns as nulls where the run has none (made before them): no metrics, nothing flagged.
        self.con.execute(f"CREATE VIEW objects_norm AS SELECT *{normalized_columns_sql(schema.names)} FROM objects_ds")
        self.review = run.review
        self.review.sql_view(self.con, run, "objects_norm", normalize_objects(schema.empty_table()).schema, True, "objects_reviewed")
        # Only rows that are objects (not invalid-prompt rows, extra SAM candidates or duplicates), then the user's filters.
        shown = "TRUE" if options.filter.include_duplicates or "status" not in schema.names else "status <> 'duplicate'"
        self.con.execute(
            f"CREATE VIEW objects AS SELECT * REPLACE (coalesce(class_name, '{UNLABELED}') AS class_name) FROM objects_reviewed "
            f"WHERE {shown} AND {options.filter.sql()}"
        )
        self.prompt_errors = (
            self.rows("SELECT count(*) FROM objects_ds WHERE status = 'error'")[0][0] if "status" in run.object_columns else 0
        )
        group = options.group_by
        if group != FOLDER and group not in self.image_columns:
            usable = [c for c in self.image_columns if c not in ("class_counts", "mask")]
            raise ReportError(f"--group-by {group}: no such images column; use one of {', '.join([FOLDER, *usable])} ('{FOLDER}' = parent folder of the URI)")
        self.group_sql = self.group_expr("")
        if options.filter.active or self.review:
            self.con.execute(
                "CREATE VIEW per_image AS SELECT i.image_id, i.uri, i.width, i.height, coalesce(c.n, 0) AS n "
                "FROM images i LEFT JOIN (SELECT image_id, count(*) AS n FROM objects GROUP BY image_id) c USING (image_id) "
                "WHERE i.status = 'ok'"
            )
        else:  # no filter: the images table's own counts, no join needed
            self.con.execute("CREATE VIEW per_image AS SELECT image_id, uri, width, height, num_objects AS n FROM images WHERE status = 'ok'")

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def group_expr(self, alias: str) -> str:
        """SQL for the group of a row of images (``alias`` = table alias with its dot, or "")."""
        if self.options.group_by == FOLDER:
            return f"regexp_replace({alias}uri, '/[^/]*$', '')"
        quoted = '"' + self.options.group_by.replace('"', '""') + '"'
        return f"CAST({alias}{quoted} AS VARCHAR)"

    def rows(self, sql: str, params=None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def totals(self) -> dict:
        by_status = self.rows("SELECT status, error_class, count(*) FROM images GROUP BY ALL ORDER BY 3 DESC, 2")
        classes = self.rows("SELECT class_id, class_name, count(*) FROM objects GROUP BY ALL ORDER BY 3 DESC, 1")
        ok = sum(n for s, _, n in by_status if s == "ok")
        errors = {(c or "unknown"): n for s, c, n in by_status if s != "ok"}
        return {
            "images": sum(n for _, _, n in by_status),
            "ok": ok,
            "error": sum(errors.values()),
            "errors_by_class": errors,
            "objects": sum(n for *_, n in classes),
            "objects_by_class": [{"class_id": None if i is None else int(i), "class_name": c, "count": int(n)} for i, c, n in classes],
            "prompt_errors": self.prompt_errors,
            "images_with_objects": self.rows("SELECT count(*) FROM per_image WHERE n > 0")[0][0],
        }

    def histograms(self) -> dict:
        per_image = self.rows("SELECT n, count(*) FROM per_image GROUP BY n ORDER BY n")
        out = {"objects_per_image": {"values": [int(v) for v, _ in per_image], "images": [int(c) for _, c in per_image]}}
        for col in ("det_score", "mask_score"):
            out[col] = self._unit_histogram(col)
        rows = self.rows(f"SELECT floor(log10(greatest(area, 1)) * {AREA_BINS_PER_DECADE})::INT AS b, count(*) FROM objects GROUP BY b ORDER BY b")
        out["area"] = _log_histogram(rows)
        quantiles = self.rows("SELECT quantile_cont(area, [0.05, 0.25, 0.5, 0.75, 0.95]) FROM objects")[0][0]
        out["area"]["quantiles"] = dict(zip(("p05", "p25", "p50", "p75", "p95"), quantiles)) if quantiles else None
        return out

    def _unit_histogram(self, col: str) -> dict:
        """50 bins over [0, 1] of a score-like column (nulls left out)."""
        rows = self.rows(f"SELECT least(greatest(floor({col} * {SCORE_BINS}), 0), {SCORE_BINS - 1})::INT AS b, count(*) FROM objects "
                         f"WHERE {col} IS NOT NULL GROUP BY b")
        counts = np.zeros(SCORE_BINS, np.int64)
        for b, c in rows:
            counts[b] = c
        return {"edges": [round(i / SCORE_BINS, 4) for i in range(SCORE_BINS + 1)], "counts": counts.tolist()}

    def quality(self) -> dict:
        """The QA numbers over the counted objects: flagged (``needs_review``; reviewed objects no longer
        are), by reason and by class, duplicates still marked, and a histogram of each metric."""
        if not self.qa_recorded:
            return {"recorded": False}
        flagged = self.rows("SELECT count(*) FILTER (WHERE needs_review), count(*) FROM objects")[0]
        by_reason = dict(self.rows("SELECT r, count(*) FROM (SELECT unnest(flags) AS r FROM objects WHERE needs_review) GROUP BY r"))
        reasons = [r for r in FLAG_REASONS if r in by_reason] + sorted(r for r in by_reason if r not in FLAG_REASONS)
        classes = self.rows("SELECT class_id, class_name, count(*) AS n, count(*) FILTER (WHERE needs_review) AS f FROM objects "
                            "GROUP BY ALL ORDER BY f DESC, n DESC, class_id")
        cells = self.rows("SELECT class_name, r, count(*) FROM (SELECT class_name, unnest(flags) AS r FROM objects WHERE needs_review) "
                          "GROUP BY ALL")
        by_class = {name: {"class_id": None if cid is None else int(cid), "class_name": name, "objects": int(n), "flagged": int(f),
                           "by_reason": {}} for cid, name, n, f in classes}
        for name, reason, n in cells:
            by_class[name]["by_reason"][reason] = int(n)
        # Masks still marked as duplicates (a person's accept makes one an object again); counted as objects only with --include-duplicates.
        duplicates = self.rows(f"SELECT count(*) FROM objects_reviewed WHERE status = 'duplicate' AND {self.options.filter.sql()}")[0][0]
        hist = {col: self._unit_histogram(col) for col in ("stability", "box_iou", "outside_box", "largest_region")}
        regions = self.rows("SELECT least(regions, 10) AS v, count(*) FROM objects WHERE regions IS NOT NULL GROUP BY v ORDER BY v")
        hist["regions"] = {"values": [int(v) for v, _ in regions], "objects": [int(n) for _, n in regions], "last_is_at_least": 10}
        holes = self.rows(f"SELECT CASE WHEN hole_area > 0 THEN floor(log10(hole_area) * {AREA_BINS_PER_DECADE})::INT END AS b, "
                          "count(*) FROM objects WHERE hole_area IS NOT NULL GROUP BY b ORDER BY b NULLS FIRST")
        none = sum(n for b, n in holes if b is None)
        hist["hole_area"] = {"without_holes": int(none), **_log_histogram([(b, n) for b, n in holes if b is not None])}
        run_totals = self.run.manifest.get("totals") or {}
        return {
            "recorded": True,
            "thresholds": self.run.manifest.get("qa"),
            "objects": int(flagged[1]),
            "flagged": int(flagged[0]),
            "flagged_share": round(flagged[0] / flagged[1], 6) if flagged[1] else 0.0,
            "flagged_by_reason": {r: int(by_reason[r]) for r in reasons},
            "flagged_by_class": list(by_class.values()),
            "duplicates": duplicates,
            "run_json": {k: run_totals.get(k) for k in ("flagged", "flagged_by_reason")},
            "histograms": hist,
        }

    @property
    def qa_recorded(self) -> bool:
        """Did the run record quality metrics? Runs made before them have no QA columns; with the columns
        all null (written by a version that had them but computed none) there is nothing to show either."""
        if not self.run.has_qa:
            return False
        if not hasattr(self, "_qa_recorded"):
            self._qa_recorded = "qa" in self.run.manifest or self.rows("SELECT count(needs_review) FROM objects_ds")[0][0] > 0
        return self._qa_recorded

    def flagged_picks(self, k: int) -> list[tuple[str, int]]:
        """Up to ``k`` flagged objects (image_id, object_id) for the quality gallery: taken in turn from each
        reason, pseudo-randomly (repeatable with --seed), so every reason is shown."""
        if k <= 0 or not self.qa_recorded:
            return []
        rows = self.rows(
            "SELECT image_id, object_id, r, row_number() OVER (PARTITION BY r ORDER BY md5(image_id || ':' || object_id || ?)) AS rn "
            "FROM (SELECT image_id, object_id, unnest(flags) AS r FROM objects WHERE needs_review) ORDER BY rn, r LIMIT ?",
            [str(self.options.seed), k * len(FLAG_REASONS)],
        )
        picks: list[tuple[str, int]] = []
        for image_id, object_id, _, _ in rows:
            if (image_id, object_id) not in picks:
                picks.append((image_id, int(object_id)))
            if len(picks) == k:
                break
        return picks

    def _objects_with_group(self) -> str:
        """FROM clause giving objects a ``g`` column (no join when grouping by folder: the URI is there)."""
        if self.options.group_by == FOLDER:
            return f"(SELECT *, {self.group_sql} AS g FROM objects)"
        return f"(SELECT o.*, {self.group_expr('i.')} AS g FROM objects o JOIN images i USING (image_id))"

    def groups(self) -> tuple[list[dict], int]:
        """The largest MAX_GROUPS groups (by objects, then images) with per-class counts, and how many
        groups there are; counts.csv has them all. Bounded however many distinct values the column has."""
        total = self.rows(f"SELECT count(DISTINCT {self.group_sql}) FROM images")[0][0]
        top = self.rows(
            f"WITH img AS (SELECT {self.group_sql} AS g, count(*) AS images, count(*) FILTER (WHERE status = 'ok') AS ok, "
            "count(*) FILTER (WHERE status <> 'ok') AS error FROM images GROUP BY g), "
            f"obj AS (SELECT g, count(*) AS objects FROM {self._objects_with_group()} GROUP BY g) "
            "SELECT img.g, images, ok, error, coalesce(objects, 0) AS objects FROM img LEFT JOIN obj USING (g) "
            "ORDER BY objects DESC, images DESC, img.g LIMIT ?", [MAX_GROUPS]
        )
        groups = {g: {"group": g, "images": n, "ok": ok, "error": err, "objects": objs, "by_class": {}} for g, n, ok, err, objs in top}
        class_rows = self.rows(
            f"SELECT g, class_id, class_name, count(*) FROM {self._objects_with_group()} WHERE list_contains(?, g) GROUP BY ALL ORDER BY 4 DESC",
            [list(groups)],
        )
        for g, cid, cname, n in class_rows:
            groups[g]["by_class"][cname] = {"class_id": None if cid is None else int(cid), "count": int(n)}
        return list(groups.values()), total

    def gallery_picks(self) -> list[dict]:
        """The most crowded images, then a repeatable pseudo-random sample of the other ok images."""
        k = self.options.gallery
        if k <= 0:
            return []
        crowded_k = (k + 1) // 2
        crowded = self.rows("SELECT image_id, uri, width, height, n FROM per_image WHERE n > 0 ORDER BY n DESC, image_id LIMIT ?", [crowded_k])
        taken = [r[0] for r in crowded]
        rest = self.rows(
            "SELECT image_id, uri, width, height, n FROM per_image WHERE NOT list_contains(?, image_id) "
            "ORDER BY md5(image_id || ?) LIMIT ?", [taken, str(self.options.seed), k - len(crowded)]
        )
        keys = ("image_id", "uri", "width", "height", "n")
        return [dict(zip(keys, r), why="most objects") for r in crowded] + [dict(zip(keys, r), why="random") for r in rest]

    def objects_of(self, image_ids: list[str]) -> dict[str, list[dict]]:
        """The gallery images' objects. Reads only the objects parts named like the images parts that
        hold these images (the sink writes both under one name), not the whole objects table."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        out: dict[str, list[dict]] = {i: [] for i in image_ids}
        if not image_ids or not self.run.object_files:
            return out
        wanted = pc.field("image_id").isin(image_ids)
        scan = self.run.dataset("images").scanner(columns=["image_id"], filter=wanted)
        parts = {b.fragment.path.rsplit("/", 1)[-1] for b in scan.scan_batches() if b.record_batch.num_rows}
        by_name = {p.rsplit("/", 1)[-1]: p for p in self.run.object_files}
        paths = [by_name[n] for n in sorted(parts) if n in by_name]
        if len(paths) < len(parts):  # not the sink's layout: filter the whole table instead
            paths = self.run.object_files
        # The same rows the exports give: normalised, reviewed (outputs/decisions.py), then the user's filters.
        table = normalize_objects(pads.dataset(paths, schema=self.run.dataset("objects").schema, filesystem=self.run.arrow_fs(),
                                               format="parquet").to_table(filter=wanted))
        filt = self.options.filter
        shown = self.run.counted_expression(filt.include_duplicates)
        table = self.review.apply(table, shown, filt.include_duplicates) if self.review else (table if shown is None else table.filter(shown))
        if filt.expression() is not None:
            table = table.filter(filt.expression())
        columns = ["image_id", "object_id", "class_id", "class_name", "det_score", "mask_score", "box", "area", "mask",
                   *QA_COLUMNS, "review", "source"]
        table = table.select([c for c in columns if c in table.column_names])
        for row in table.sort_by([("image_id", "ascending"), ("object_id", "ascending")]).to_pylist():
            row["class_name"] = row["class_name"] if row["class_name"] is not None else UNLABELED
            out[row["image_id"]].append(row)
        return out

    def errors_sample(self, limit: int = 20) -> list[tuple]:
        return self.rows("SELECT uri, error_class, error FROM images WHERE status <> 'ok' ORDER BY error_class, uri LIMIT ?", [limit])

    def class_group_csv(self, fileobj) -> int:
        """counts.csv: one row per (group, class) with objects and images holding that class; streamed."""
        reader = self.con.sql(
            "SELECT g, class_id, class_name, count(*) AS objects, count(DISTINCT image_id) AS images "
            f"FROM {self._objects_with_group()} GROUP BY ALL ORDER BY g, objects DESC, class_id"
        ).to_arrow_reader(65536)
        writer = csv.writer(fileobj)
        writer.writerow([self.options.group_by, "class_id", "class_name", "objects", "images"])
        n = 0
        for batch in reader:
            cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            writer.writerows(zip(*cols))
            n += batch.num_rows
        return n


def _log_histogram(rows: list[tuple]) -> dict:
    """(bin, count) rows in bin order, bins of 1/AREA_BINS_PER_DECADE decade -> edges and counts
    from the first bin to the last (empty bins between them as 0)."""
    if not rows:
        return {"edges": [], "counts": []}
    lo, hi = rows[0][0], rows[-1][0]
    counts = np.zeros(hi - lo + 1, np.int64)
    for b, c in rows:
        counts[b - lo] = c
    return {"edges": [round(10 ** (b / AREA_BINS_PER_DECADE), 2) for b in range(lo, hi + 2)], "counts": counts.tolist()}
