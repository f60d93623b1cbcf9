"""The report's numbers, merged from the shard summaries (summaries.py) so that their cost grows
with shards, not object rows.

Which shards are counted from their summaries and which from their rows:

- a shard whose commit wrote a summary (of this version, covering ``--group-by``) is merged as it is;
- a shard without one (a run made before summaries, or a shard committed by such a version before a
  resume) is scanned;
- review decisions change counts: a shard holding an image a decision is about (the review table is
  small: its URIs are looked up in the URI range each summary records, then its image ids in those
  shards' images parts) is scanned with the decisions applied;
- a filtered report (``--classes``, ``--flagged``, ...) or one grouped by a column that is not the
  folder or a manifest metadata key scans every shard.

The scanned shards go through the very queries the commits ran (summaries.py), with duckdb over
their Parquet parts, column by column, spilling past ``DUCKDB_MEMORY_LIMIT`` to a private temp
folder; the result is merged with the other summaries. The summaries are read SUMMARY_BATCH files
per query, keeping a few facts per shard; the galleries read a bounded number of rows (samples.py).
"""
from __future__ import annotations

import csv
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.outputs.columns import FLAG_REASONS
from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.report.samples import GalleryRows, stem
from pipeline.outputs.report.summaries import (AREA_BINS_PER_DECADE, COUNTS, ERROR_SAMPLE, FOLDER, KEYS, MAX_REGIONS, SAMPLES, SCHEMA,
                                               SCORE_BINS, TOP_IMAGES, UNCOUNTED, VERSION, area_quantiles, create_views, summarize)
from pipeline.outputs.rundata import RunData
from pipeline.run.ownership import SUMMARIES_DIR

log = logging.getLogger("autolabel.report")

MAX_GROUPS = 1000  # groups kept in summary.json (the page shows TOP_GROUPS_SHOWN; counts.csv has all)
DUCKDB_MEMORY_LIMIT = "1GB"
SUMMARY_BATCH = 1000  # summaries read by one duckdb query


class ReportError(ValueError):
    """A report option the user must fix (e.g. an unknown --group-by column)."""


@dataclass
class ReportOptions:
    group_by: str = FOLDER
    gallery: int = 12
    filter: ObjectFilter = ObjectFilter()
    seed: int = 0
    flagged_gallery: int = 12  # flagged objects drawn in the quality section
    summaries: bool = True  # False: ignore the shard summaries and scan every row (a check; the numbers are the same)


@dataclass
class Shard:
    """What a summary says about its own shard."""

    uris: tuple = (None, None)
    ok: int = 0
    flagged: int = 0
    reasons: dict = field(default_factory=dict)
    keys: set = field(default_factory=set)
    most: Optional[tuple] = None  # (-objects, image_id) of its most crowded ok image
    first_error: Optional[tuple] = None  # (error_class, uri) of its first error row


class RunStats(GalleryRows):
    """The report's queries over ``m``: the merged summary rows (stored summaries of the shards taken as
    they are, plus the summary of the scanned shards, computed over the views of ``summaries.create_views``)."""

    def __init__(self, run: RunData, options: ReportOptions):
        import duckdb

        self.run, self.options = run, options
        self.tmp = tempfile.mkdtemp(prefix="autolabel-report-")
        self.con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY_LIMIT, "temp_directory": self.tmp})
        self.con.execute("SET preserve_insertion_order = false")
        if sys.stderr.isatty():  # duckdb's own progress bar for the long scans of a big run
            self.con.execute("SET enable_progress_bar = true")
        self.image_columns = run.schema("images").names
        group = options.group_by
        if group != FOLDER and group not in self.image_columns:
            usable = [c for c in self.image_columns if c not in ("class_counts", "mask")]
            raise ReportError(f"--group-by {group}: no such images column; use one of {', '.join([FOLDER, *usable])} ('{FOLDER}' = parent folder of the URI)")
        self.review = run.review
        self.image_parts = {stem(p): p for p in run.image_files}
        self.object_parts = {stem(p): p for p in run.object_files}
        self.sink_layout = set(self.object_parts) <= set(self.image_parts)  # objects parts named like their images parts
        self.part_of: dict[str, str] = {}  # image_id -> its shard, for the images the galleries picked
        self.shards: dict[str, Shard] = {}
        loaded, scanned = self._plan()
        self.summarized = [s for s in self.image_parts if s not in scanned]
        self.scanned = sorted(scanned)
        self._scan(loaded)
        log.info("report: %d shards counted from their summaries, %d scanned", len(self.summarized), len(self.scanned))

    # ------------------------------------------------------------------ building the merged table

    def _read_summaries(self, stems: list[str]) -> str:
        """SQL naming the summaries of these shards as a table (duckdb reads local files itself; remote
        ones through pyarrow)."""
        files = [f"{self.run.root}/{SUMMARIES_DIR}/{s}.parquet" for s in stems]
        if self.run.is_local:
            return "read_parquet([" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "])"
        import pyarrow.dataset as pads

        self._sources = getattr(self, "_sources", 0) + 1
        self.con.register(f"summaries_{self._sources}", pads.dataset(files, schema=SCHEMA, filesystem=self.run.arrow_fs(), format="parquet"))
        return f"summaries_{self._sources}"

    def _load(self, stems: list[str], table: str, where: str, sign: str = "") -> None:
        """CREATE TABLE ``table``: the summaries' rows that ``where`` selects, counts summed (negated with
        ``sign="-"``), read SUMMARY_BATCH files at a time, so reading more files takes no more memory."""
        sums = ", ".join(f"{sign}sum({c}) AS {c}" for c in COUNTS)
        self.con.execute(f"CREATE TABLE {table}_parts AS SELECT {', '.join(KEYS)}, {', '.join(COUNTS)} FROM empty_summary")
        for start in range(0, len(stems), SUMMARY_BATCH):
            source = self._read_summaries(stems[start:start + SUMMARY_BATCH])
            self.con.execute(f"INSERT INTO {table}_parts SELECT {', '.join(KEYS)}, {sums} FROM {source} WHERE {where} GROUP BY ALL")
        self.con.execute(f"CREATE TABLE {table} AS SELECT {', '.join(KEYS)}, {', '.join(f'sum({c}) AS {c}' for c in COUNTS)} "
                         f"FROM {table}_parts GROUP BY ALL")
        self.con.execute(f"DROP TABLE {table}_parts")

    def _plan(self) -> tuple[list[str], set[str]]:
        """(shards whose summaries were loaded into the table ``loaded``, shards to scan)."""
        from pipeline.run.tables import IMAGES_SCHEMA

        opts = self.options
        served = opts.group_by == FOLDER or opts.group_by not in IMAGES_SCHEMA.names  # the folder, or a metadata key
        have = [s for s in map(stem, self.run.summary_files) if s in self.image_parts]
        self.con.register("empty_summary", SCHEMA.empty_table())
        if not (opts.summaries and self.sink_layout and have and not opts.filter.active and served):
            self.con.execute("CREATE TABLE loaded AS SELECT * FROM empty_summary")
            return [], set(self.image_parts)
        # One pass over every summary; the gallery's and the error list's rows (SAMPLES) later, from the few
        # shards that may hold the run's first ones, so memory grows with a few rows per shard, not dozens.
        samples = ", ".join(f"'{k}'" for k in SAMPLES)
        self._load(have, "loaded", f"(version = {VERSION} OR kind = 'shard') AND kind NOT IN ({samples})")
        facts = self.con.sql("SELECT kind, shard, key, value, version, ok, flagged, objects, bin, uri, image_id FROM loaded "
                             "WHERE kind IN ('shard', 'shard_reason', 'group_key', 'first_error')").fetchall()
        for kind, shard, key, value, version, ok, flagged, objects, most, uri, image_id in facts:
            if kind == "shard" and version == VERSION:
                entry = self.shards.setdefault(shard, Shard())
                entry.uris, entry.ok, entry.flagged = (key, value), int(ok or 0), int(flagged or 0)
                entry.most = None if most is None else (-int(most), image_id or "")
        for kind, shard, key, value, version, ok, flagged, objects, most, uri, image_id in facts:
            if shard in self.shards and kind == "shard_reason":
                self.shards[shard].reasons[value] = int(objects)
            elif shard in self.shards and kind == "group_key":
                self.shards[shard].keys.add(key)
            elif shard in self.shards and kind == "first_error":
                self.shards[shard].first_error = (value or "", uri or "")
        scanned = {s for s in self.image_parts if s not in self.shards or opts.group_by not in self.shards[s].keys}
        scanned |= self._touched_by_review()
        for s in scanned:
            self.shards.pop(s, None)
        return have, scanned

    def _touched_by_review(self) -> set[str]:
        """Shards holding an image a review decision is about: those whose URI range holds its URI
        (decisions carry the image's URI as the run wrote it)."""
        if not self.review or not self.shards:
            return set()
        import pyarrow as pa

        uris = sorted({d["uri"] for d in self.review.final.values() if d["uri"] is not None})
        ranges = pa.table({"shard": list(self.shards), "lo": [s.uris[0] for s in self.shards.values()],
                           "hi": [s.uris[1] for s in self.shards.values()]})
        self.con.register("review_uris", pa.table({"uri": pa.array(uris, pa.string())}))
        self.con.register("shard_ranges", ranges)
        candidates = sorted(r[0] for r in self.con.sql("SELECT DISTINCT shard FROM shard_ranges JOIN review_uris ON uri BETWEEN lo AND hi").fetchall())
        if not candidates:
            return set()
        # Ranges overlap where the listing was not in URI order (a manifest): look at the candidates' image ids.
        import pyarrow.compute as pc

        ids = sorted(self.review.images)
        scan = self.run.dataset_of("images", [self.image_parts[s] for s in candidates]).scanner(
            columns=["image_id"], filter=pc.field("image_id").isin(ids))
        return {stem(b.fragment.path) for b in scan.scan_batches() if b.record_batch.num_rows}

    def _scan(self, loaded: list[str]) -> None:
        """Views over the scanned shards' rows, their summary, and ``m``: everything merged."""
        import pyarrow as pa

        run, opts = self.run, self.options
        images = [self.image_parts[s] for s in self.scanned]
        if not self.sink_layout:  # parts not named like the sink's: only a scan of everything is sure
            objects = list(run.object_files)
        else:
            objects = [self.object_parts[s] for s in self.scanned if s in self.object_parts]
        self.con.register("images_ds", run.dataset_of("images", images) if images else run.schema("images").empty_table())
        object_schema = run.schema("objects")
        self.con.register("objects_ds", run.dataset_of("objects", objects) if objects else object_schema.empty_table())
        create_views(self.con, self.image_columns, object_schema, opts.filter, self.review, run)
        self.object_columns = object_schema.names
        scan = summarize(self.con, self.object_columns, [opts.group_by], opts.filter.sql()) if (images or self.review) else SCHEMA.empty_table()
        self.con.register("scan_summary", scan)
        minus = [s for s in loaded if s not in self.shards]  # loaded, then found to need a scan: take their counts out again
        self.con.register("minus_shards", pa.table({"shard": pa.array(minus, pa.string())}))
        parts = [f"SELECT {', '.join(KEYS)}, {', '.join(COUNTS)} FROM loaded "
                 "WHERE shard IS NULL OR shard NOT IN (SELECT shard FROM minus_shards)"]
        self._load(minus, "minus", f"version = {VERSION} AND shard IS NULL", sign="-")
        self._load(self._sample_sources(), "sampled", f"version = {VERSION} AND kind IN ({', '.join(repr(k) for k in SAMPLES)})")
        parts += [f"SELECT {', '.join(KEYS)}, {', '.join(COUNTS)} FROM {t}" for t in ("minus", "sampled")]
        parts.append(f"SELECT {', '.join(KEYS)}, {', '.join(COUNTS)} FROM scan_summary")
        sums = ", ".join(f"sum({c}) AS {c}" for c in COUNTS)
        nonzero = " OR ".join(f"coalesce(sum({c}), 0) <> 0" for c in COUNTS)
        self.con.execute(f"CREATE TABLE m AS SELECT {', '.join(KEYS)}, {sums} FROM ({' UNION ALL '.join(parts)}) GROUP BY ALL "
                         f"HAVING list_contains(?, kind) OR {nonzero}", [list(UNCOUNTED)])

    def _sample_sources(self) -> list[str]:
        """The summarized shards that may hold one of the run's TOP_IMAGES most crowded images or its
        first ERROR_SAMPLE error rows: those whose own first one is among the first TOP_IMAGES (ERROR_SAMPLE)
        shards' first ones, in the report's order (most objects, then image_id; error class, then URI).
        Any other shard's first one, and so all of its rows, comes after that many images of other shards."""
        chosen: set[str] = set()
        for attr, count in (("most", TOP_IMAGES), ("first_error", ERROR_SAMPLE)):
            firsts = sorted((getattr(s, attr), n) for n, s in self.shards.items() if getattr(s, attr) is not None)
            chosen.update(n for _, n in firsts[:count])
        return sorted(chosen)

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def rows(self, sql: str, params=None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def _count(self, kind: str, col: str = "objects", where: str = "TRUE") -> int:
        return int(self.rows(f"SELECT coalesce(sum({col}), 0) FROM m WHERE kind = ? AND {where}", [kind])[0][0])

    def _bins(self, kind: str, key=None, col: str = "objects") -> list[tuple]:
        where = "key = ?" if key is not None else "TRUE"
        return self.rows(f"SELECT bin, sum({col}) FROM m WHERE kind = ? AND {where} GROUP BY bin ORDER BY bin NULLS FIRST",
                         [kind, key] if key is not None else [kind])

    # ------------------------------------------------------------------ the numbers

    def known_classes(self) -> dict[int, str]:
        """Classes met in the objects table (every row, also those not counted)."""
        return {int(i): n for i, n in self.rows("SELECT DISTINCT class_id, class_name FROM m WHERE kind = 'seen_class' AND class_id IS NOT NULL "
                                                "ORDER BY class_id, class_name")}

    @property
    def prompt_errors(self) -> int:
        return self._count("prompt_errors")

    def totals(self) -> dict:
        by_status = self.rows("SELECT key, value, sum(images) AS n FROM m WHERE kind = 'images' GROUP BY ALL ORDER BY n DESC, value")
        classes = self.rows("SELECT class_id, class_name, sum(objects) AS n FROM m WHERE kind = 'class' GROUP BY ALL ORDER BY n DESC, class_id, class_name")
        ok = sum(n for s, _, n in by_status if s == "ok")
        errors = {(c or "unknown"): int(n) for s, c, n in by_status if s != "ok"}
        return {
            "images": int(sum(n for _, _, n in by_status)),
            "ok": int(ok),
            "error": sum(errors.values()),
            "errors_by_class": errors,
            "objects": int(sum(n for *_, n in classes)),
            "objects_by_class": [{"class_id": None if i is None else int(i), "class_name": c, "count": int(n)} for i, c, n in classes],
            "prompt_errors": self.prompt_errors,
            "images_with_objects": self._count("per_image", "images", "bin > 0"),
        }

    def histograms(self) -> dict:
        per_image = self._bins("per_image", col="images")
        out = {"objects_per_image": {"values": [int(v) for v, _ in per_image], "images": [int(c) for _, c in per_image]}}
        for col in ("det_score", "mask_score"):
            out[col] = self._unit_histogram(col)
        out["area"] = _log_histogram(self._bins("area"))
        quantiles = area_quantiles(self._bins("area_fine"))
        out["area"]["quantiles"] = dict(zip(("p05", "p25", "p50", "p75", "p95"), quantiles)) if quantiles else None
        return out

    def _unit_histogram(self, col: str) -> dict:
        """SCORE_BINS bins over [0, 1] of a score-like column (nulls left out)."""
        counts = np.zeros(SCORE_BINS, np.int64)
        for b, c in self._bins("hist", col):
            counts[b] = c
        return {"edges": [round(i / SCORE_BINS, 4) for i in range(SCORE_BINS + 1)], "counts": counts.tolist()}

    def quality(self) -> dict:
        """The QA numbers over the counted objects: flagged (``needs_review``; reviewed objects no longer
        are), by reason and by class, duplicates still marked, and a histogram of each metric."""
        if not self.qa_recorded:
            return {"recorded": False}
        objects, flagged = self._count("class"), self._count("class", "flagged")
        by_reason = {r: int(n) for r, n in self.rows("SELECT value, sum(objects) FROM m WHERE kind = 'reason' GROUP BY value")}
        reasons = [r for r in FLAG_REASONS if r in by_reason] + sorted(r for r in by_reason if r not in FLAG_REASONS)
        classes = self.rows("SELECT class_id, class_name, sum(objects) AS n, sum(flagged) AS f FROM m WHERE kind = 'class' "
                            "GROUP BY ALL ORDER BY f DESC, n DESC, class_id, class_name")
        cells = self.rows("SELECT class_name, value, sum(objects) FROM m WHERE kind = 'class_reason' GROUP BY ALL ORDER BY 1, 2")
        by_class = {name: {"class_id": None if cid is None else int(cid), "class_name": name, "objects": int(n), "flagged": int(f),
                           "by_reason": {}} for cid, name, n, f in classes}
        for name, reason, n in cells:
            by_class[name]["by_reason"][reason] = int(n)
        hist = {col: self._unit_histogram(col) for col in ("stability", "box_iou", "outside_box", "largest_region")}
        regions = self._bins("regions")
        hist["regions"] = {"values": [int(v) for v, _ in regions], "objects": [int(n) for _, n in regions], "last_is_at_least": MAX_REGIONS}
        holes = self._bins("hole_area")
        none = sum(n for b, n in holes if b is None)
        hist["hole_area"] = {"without_holes": int(none), **_log_histogram([(b, n) for b, n in holes if b is not None])}
        run_totals = self.run.manifest.get("totals") or {}
        return {
            "recorded": True,
            "thresholds": self.run.manifest.get("qa"),
            "objects": objects,
            "flagged": flagged,
            "flagged_share": round(flagged / objects, 6) if objects else 0.0,
            "flagged_by_reason": {r: by_reason[r] for r in reasons},
            "flagged_by_class": list(by_class.values()),
            # Masks still marked as duplicates (a person's accept makes one an object again); counted as objects only with --include-duplicates.
            "duplicates": self._count("duplicates"),
            "run_json": {k: run_totals.get(k) for k in ("flagged", "flagged_by_reason")},
            "histograms": hist,
        }

    @property
    def qa_recorded(self) -> bool:
        """Did the run record quality metrics? Runs made before them have no QA columns; with the columns
        all null (written by a version that had them but computed none) there is nothing to show either."""
        return self.run.has_qa and ("qa" in self.run.manifest or self._count("qa_values") > 0)

    def groups(self) -> tuple[list[dict], int]:
        """The largest MAX_GROUPS groups (by objects, then images) with per-class counts, and how many
        groups there are; counts.csv has them all. Bounded however many distinct values the column has."""
        key = self.options.group_by
        total = self.rows("SELECT count(DISTINCT value) FROM m WHERE kind = 'group_images' AND key = ?", [key])[0][0]
        top = self.rows(
            "WITH img AS (SELECT value AS g, sum(images) AS images, sum(ok) AS ok, sum(error) AS error FROM m "
            "WHERE kind = 'group_images' AND key = $1 GROUP BY g), "
            "obj AS (SELECT value AS g, sum(objects) AS objects FROM m WHERE kind = 'group_objects' AND key = $1 GROUP BY g) "
            "SELECT img.g, images, ok, error, coalesce(objects, 0) AS objects FROM img LEFT JOIN obj USING (g) "
            "ORDER BY objects DESC, images DESC, img.g LIMIT $2", [key, MAX_GROUPS]
        )
        groups = {g: {"group": g, "images": int(n), "ok": int(ok), "error": int(err), "objects": int(objs), "by_class": {}}
                  for g, n, ok, err, objs in top}
        class_rows = self.rows(
            "SELECT value AS g, class_id, class_name, sum(objects) AS n FROM m WHERE kind = 'group_class' AND key = ? "
            "AND list_contains(?, value) GROUP BY ALL ORDER BY n DESC, class_id, class_name", [key, list(groups)]
        )
        for g, cid, cname, n in class_rows:
            groups[g]["by_class"][cname] = {"class_id": None if cid is None else int(cid), "count": int(n)}
        return list(groups.values()), int(total)

    def errors_sample(self, limit: int = 20) -> list[tuple]:
        return self.rows("SELECT uri, value, text FROM m WHERE kind = 'error_sample' ORDER BY value, uri LIMIT ?", [limit])

    def class_group_csv(self, fileobj) -> int:
        """counts.csv: one row per (group, class) with objects and images holding that class; streamed."""
        key = self.options.group_by.replace("'", "''")
        reader = self.con.sql(
            "SELECT value AS g, class_id, class_name, sum(objects) AS objects, sum(images) AS images FROM m "
            f"WHERE kind = 'group_class' AND key = '{key}' GROUP BY ALL ORDER BY g, objects DESC, class_id, class_name"
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
