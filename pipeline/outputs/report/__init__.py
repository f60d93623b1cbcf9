"""``autolabel report RUN``: one self-contained HTML page (plus counts.csv, summary.json) about a run.

Every number comes from the Parquet tables through duckdb, which scans the pyarrow datasets
column by column with a memory limit: a run with tens of millions of objects reports in bounded
memory, and only the gallery images' masks are ever decoded. Charts are matplotlib (Agg) SVGs and
gallery pictures JPEGs, both inlined as data: URIs, so the page opens from disk with no network,
no scripts and no external fonts (a Content-Security-Policy forbids anything else).
"""
from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import yaml

from pipeline.io.credentials import redact
from pipeline.outputs.colors import class_color
from pipeline.outputs.columns import FLAG_REASONS, QA_COLUMNS, UNLABELED, normalize_objects, normalized_columns_sql
from pipeline.outputs.filters import FilterError, ObjectFilter
from pipeline.outputs.rundata import RunData, RunError, read_rgb

log = logging.getLogger("autolabel.report")

FOLDER = "folder"  # --group-by pseudo-column: the parent folder of each image's URI
SCORE_BINS = 50
AREA_BINS_PER_DECADE = 10
GALLERY_MAX_SIDE = 640
UNREADABLE_HINT = (
    "If the images need credentials or an endpoint (the run's input.storage_options; run.json keeps only their names), "
    "pass them to `autolabel report` with --image-storage-option key=value (repeatable), e.g. "
    "--image-storage-option endpoint_url=... --image-storage-option key=... --image-storage-option secret=..."
)
LABELS_PER_IMAGE = 40
TOP_GROUPS_SHOWN = 40
TOP_CLASSES_CHARTED = 30
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


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb)


# ----------------------------------------------------------------------------------- numbers


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
            from pipeline.run.sink import OBJECTS_SCHEMA

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
        # The same rows the exports give: normalised, reviewed (pipeline/review.py), then the user's filters.
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


# ----------------------------------------------------------------------------------- pictures


# Applied with matplotlib.rc_context while the report draws, so a caller's own settings are left alone.
STYLE = {"svg.fonttype": "path", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "autolabel"}


def _svg(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width=6.4, height=3.2):
    """A figure without pyplot: no global figure registry, no backend switch (Agg renders the pixels)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def chart_classes(classes: list[dict]) -> Optional[str]:
    if not classes:
        return None
    shown = classes[:TOP_CLASSES_CHARTED]
    fig, ax = _figure(6.4, max(1.6, 0.24 * len(shown) + 0.8))
    names = [c["class_name"] for c in shown][::-1]
    counts = [c["count"] for c in shown][::-1]
    bars = ax.barh(names, counts, color=[class_color(c["class_id"]) for c in shown][::-1])
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3, fontsize=8)
    ax.set_xlabel("objects")
    title = "Objects per class" + (f" (top {TOP_CLASSES_CHARTED} of {len(classes)})" if len(classes) > len(shown) else "")
    ax.set_title(title, loc="left")
    ax.margins(x=0.12)
    return _svg(fig)


def chart_hist(edges, counts, title: str, xlabel: str, log_x: bool = False) -> Optional[str]:
    if not len(counts) or not sum(counts):
        return None
    fig, ax = _figure(4.6, 2.8)
    ax.stairs(counts, edges, fill=True, color="#4c78a8", alpha=0.85)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objects")
    return _svg(fig)


def chart_objects_per_image(values, images) -> Optional[str]:
    if not values:
        return None
    fig, ax = _figure(4.6, 2.8)
    from matplotlib.ticker import MaxNLocator

    ax.bar(values, images, width=0.9 if len(values) < 60 else 1.0, color="#f58518")
    ax.set_xlim(-0.6, max(values) + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Objects per image (ok images)", loc="left")
    ax.set_xlabel("objects in the image")
    ax.set_ylabel("images")
    return _svg(fig)


def chart_groups(groups: list[dict], classes: list[dict], label: str, num_groups: int) -> Optional[str]:
    shown = [g for g in groups[:TOP_GROUPS_SHOWN]]
    if not shown or not any(g["objects"] for g in shown):
        return None
    top = [c for c in classes[:8]]
    fig, ax = _figure(6.4, max(1.8, 0.26 * len(shown) + 1.0))
    names = [_short(str(g["group"]), 48) for g in shown][::-1]
    left = np.zeros(len(shown))
    for c in top:
        vals = np.array([g["by_class"].get(c["class_name"], {}).get("count", 0) for g in shown][::-1], float)
        ax.barh(names, vals, left=left, color=class_color(c["class_id"]), label=c["class_name"])
        left += vals
    other = np.array([g["objects"] for g in shown][::-1], float) - left
    if other.any():
        ax.barh(names, other, left=left, color="#bbbbbb", label="other classes")
    ax.set_xlabel("objects")
    ax.set_title(f"Objects by {label}" + (f" (top {len(shown)} of {num_groups:,})" if num_groups > len(shown) else ""), loc="left")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


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


def _score(value) -> str:
    """A score for a label; manifest objects have no detector score (null): shown as a dash."""
    return "–" if value is None else f"{value:.2f}"


def render_gallery_image(pick: dict, objects: list[dict], image_storage_options: Optional[dict] = None) -> tuple[str, Optional[str]]:
    """JPEG data URI of the image with masks in class colours, boxes and labels; and a note (the
    reason) when the image could not be drawn on its own pixels (unreadable, or changed size)."""
    from PIL import Image

    from pipeline.sam import masks as mask_codec
    from pipeline.errors import ImageError

    h, w = int(pick["height"]), int(pick["width"])
    note = None
    try:
        rgb = read_rgb(pick["uri"], image_storage_options)
        if rgb.shape[:2] != (h, w):
            note = f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run saw {w}x{h}: drawn on a blank canvas"
            rgb = None
    except Exception as exc:  # noqa: BLE001 - a missing picture must not stop the report; it is reported instead
        why = f"{exc.error_class}: {exc}" if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
        note = f"image not readable now ({redact(why, image_storage_options)}): masks drawn on a blank canvas"
        rgb = None
    # Every picture is drawn GALLERY_MAX_SIDE wide or high: big photos shrink, tiny ones are
    # enlarged (pixelated, not blurred) so the labels stay readable.
    scale = GALLERY_MAX_SIDE / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    base = np.full((h, w, 3), 235, np.uint8) if rgb is None else rgb
    resample = Image.BILINEAR if scale < 1 else Image.NEAREST
    canvas = np.asarray(Image.fromarray(base).resize((sw, sh), resample), dtype=np.float32) / 255.0
    for obj in sorted(objects, key=lambda o: -o["object_id"]):  # best-scoring object painted last, on top
        mask = mask_codec.decode(obj["mask"])
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((sw, sh), Image.NEAREST)) > 127
        canvas[small] = canvas[small] * 0.5 + np.array(class_color(obj["class_id"])) * 0.5
    fig, ax = _figure(sw / 100, sh / 100)
    fig.subplots_adjust(0, 0, 1, 1)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    from matplotlib.patches import Rectangle

    for obj in objects[:LABELS_PER_IMAGE]:
        x0, y0, x1, y1 = (v * scale for v in obj["box"])
        color = class_color(obj["class_id"])
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))
        inside = y0 < 16  # no room above the box (it touches the top): put the label just inside it
        ax.text(x0 + (1 if inside else 0), y0 + (1 if inside else 0), f"{obj['class_name']} {_score(obj['det_score'])}·{_score(obj['mask_score'])}", fontsize=9, color="white",
                va="top" if inside else "bottom", ha="left", bbox=dict(facecolor=color, edgecolor="none", pad=1.0, alpha=0.9), clip_on=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=100, pil_kwargs={"quality": 85})
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), note


REASON_COLORS = {"low_score": "#e45756", "unstable": "#f58518", "leaks_box": "#b279a2", "fragmented": "#4c78a8",
                 "tiny": "#72b7b2", "duplicate": "#9d755d"}
FLAGGED_MAX_SIDE = 260
METRIC_TITLES = {
    "stability": ("Stability (IoU of the mask at logit +1 and -1)", "stability"),
    "box_iou": ("Mask box vs prompt box (IoU)", "box_iou"),
    "outside_box": ("Share of the mask outside the prompt box", "outside_box"),
    "largest_region": ("Share of the area in the largest region", "largest_region"),
}


def chart_reasons(by_reason: dict) -> Optional[str]:
    if not by_reason:
        return None
    names = list(by_reason)[::-1]
    fig, ax = _figure(4.6, max(1.4, 0.3 * len(names) + 0.8))
    bars = ax.barh(names, [by_reason[n] for n in names], color=[REASON_COLORS.get(n, "#888888") for n in names])
    ax.bar_label(bars, labels=[f"{by_reason[n]:,}" for n in names], padding=3, fontsize=8)
    ax.set_xlabel("flagged objects (an object may have several reasons)")
    ax.set_title("Flagged objects by reason", loc="left")
    ax.margins(x=0.15)
    return _svg(fig)


def chart_flagged_classes(by_class: list[dict]) -> Optional[str]:
    shown = [c for c in by_class if c["objects"]][:TOP_CLASSES_CHARTED]
    if not shown or not any(c["flagged"] for c in shown):
        return None
    fig, ax = _figure(6.4, max(1.6, 0.26 * len(shown) + 0.9))
    names = [c["class_name"] for c in shown][::-1]
    flagged = np.array([c["flagged"] for c in shown][::-1], float)
    fine = np.array([c["objects"] - c["flagged"] for c in shown][::-1], float)
    ax.barh(names, flagged, color="#e45756", label="flagged")
    ax.barh(names, fine, left=flagged, color="#c9d3df", label="not flagged")
    for y, (f, total) in enumerate(zip(flagged, flagged + fine)):
        ax.text(total, y, f"  {100 * f / total:.0f} %", va="center", fontsize=8)
    ax.set_xlabel("objects")
    ax.set_title("Flagged objects by class", loc="left")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.margins(x=0.12)
    return _svg(fig)


def chart_counts(values: list[int], counts: list[int], title: str, xlabel: str, last_is_at_least: Optional[int] = None) -> Optional[str]:
    if not values or not sum(counts):
        return None
    fig, ax = _figure(4.6, 2.8)
    ax.bar(values, counts, width=0.8, color="#4c78a8")
    ax.set_xticks(values, [f"{v}+" if last_is_at_least is not None and v >= last_is_at_least else str(v) for v in values])
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objects")
    return _svg(fig)


def render_flagged_object(obj: dict, rgb: Optional[np.ndarray], size: tuple[int, int]) -> str:
    """JPEG data URI: the object's surroundings (its mask and prompt box, padded), the mask tinted in its
    class colour with its outline, the prompt box in yellow."""
    from PIL import Image, ImageDraw

    from pipeline.sam import masks as mask_codec

    h, w = size
    mask = mask_codec.decode(obj["mask"])
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = (float(v) for v in obj["box"]) if obj.get("box") is not None else (0.0, 0.0, float(w), float(h))
    if len(xs):
        x0, y0, x1, y1 = min(x0, xs.min()), min(y0, ys.min()), max(x1, xs.max() + 1), max(y1, ys.max() + 1)
    pad = max(8.0, 0.2 * max(x1 - x0, y1 - y0))
    cx0, cy0 = int(max(0, np.floor(x0 - pad))), int(max(0, np.floor(y0 - pad)))
    cx1, cy1 = int(min(w, np.ceil(x1 + pad))), int(min(h, np.ceil(y1 + pad)))
    base = np.full((h, w, 3), 235, np.uint8) if rgb is None else rgb
    crop = base[cy0:cy1, cx0:cx1].astype(np.float32) / 255.0
    m = mask[cy0:cy1, cx0:cx1]
    color = np.array(class_color(obj.get("class_id")))
    crop[m] = crop[m] * 0.45 + color * 0.55
    edge = m & ~(np.pad(m, 1)[2:, 1:-1] & np.pad(m, 1)[:-2, 1:-1] & np.pad(m, 1)[1:-1, 2:] & np.pad(m, 1)[1:-1, :-2])
    crop[edge] = color * 0.6
    scale = FLAGGED_MAX_SIDE / max(crop.shape[0], crop.shape[1])
    out_w, out_h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    picture = Image.fromarray((crop * 255).round().astype(np.uint8)).resize((out_w, out_h), Image.NEAREST if scale >= 1 else Image.BILINEAR)
    if obj.get("box") is not None:
        bx0, by0, bx1, by1 = ((float(v) - o) * scale for v, o in zip(obj["box"], (cx0, cy0, cx0, cy0)))
        ImageDraw.Draw(picture).rectangle([bx0, by0, max(bx0, bx1 - 1), max(by0, by1 - 1)], outline=(255, 204, 0), width=2)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def draw_flagged(stats: "RunStats", picks: list[tuple[str, int]], image_storage_options: Optional[dict]) -> list[dict]:
    """The quality gallery: each picked flagged object drawn on its own image (read once per image)."""
    from pipeline.errors import ImageError

    if not picks:
        return []
    image_ids = sorted({i for i, _ in picks})
    info = {r[0]: r for r in stats.rows("SELECT image_id, uri, width, height FROM images WHERE list_contains(?, image_id)", [image_ids])}
    objects = stats.objects_of(image_ids)
    by_key = {(o["image_id"], o["object_id"]): o for rows in objects.values() for o in rows}
    out, pixels = [], {}
    for image_id, object_id in picks:
        obj = by_key.get((image_id, object_id))
        if obj is None:
            continue
        _, uri, width, height = info[image_id]
        if image_id not in pixels:
            try:
                rgb = read_rgb(uri, image_storage_options)
                pixels[image_id] = (rgb, None) if rgb.shape[:2] == (height, width) else (
                    None, f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run saw {width}x{height}: drawn on a blank canvas")
            except Exception as exc:  # noqa: BLE001 - reported on the page, never fatal
                why = f"{exc.error_class}: {exc}" if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
                pixels[image_id] = (None, f"image not readable now ({redact(why, image_storage_options)}): drawn on a blank canvas")
        rgb, note = pixels[image_id]
        out.append({
            "image_id": image_id, "object_id": object_id, "uri": uri, "class_name": obj["class_name"], "flags": list(obj.get("flags") or []),
            "mask_score": obj.get("mask_score"), "stability": obj.get("stability"), "box_iou": obj.get("box_iou"),
            "regions": obj.get("regions"), "area": obj.get("area"), "note": note,
            "src": render_flagged_object(obj, rgb, (int(height), int(width))),
        })
    return out


# ----------------------------------------------------------------------------------- page

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0; color: #1d2430; background: #f6f7f9; }
header { background: #1d2430; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header .sub { color: #c3cad6; font-size: 13px; word-break: break-all; }
main { padding: 12px 28px 40px; max-width: 1280px; }
section { background: #fff; border: 1px solid #e2e6ec; border-radius: 8px; padding: 14px 18px; margin: 14px 0; }
h2 { font-size: 16px; margin: 0 0 10px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #f1f4f8; border-radius: 6px; padding: 10px 16px; min-width: 130px; }
.card .v { font-size: 24px; font-weight: 600; }
.card .k { color: #5a6577; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.warn { background: #fff4e5; border: 1px solid #f0b35a; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.warn.bad { background: #fdecec; border: 2px solid #d64545; font-size: 15px; }
.warn.bad ul { margin: 6px 0; padding-left: 20px; word-break: break-all; }
figure.unreadable { outline: 3px solid #d64545; }
figure.unreadable figcaption .problem { color: #b02020; font-weight: 600; }
table { border-collapse: collapse; font-size: 13px; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid #eceff3; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.charts img { max-width: 100%; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 14px; }
figure { margin: 0; background: #f1f4f8; border-radius: 6px; overflow: hidden; }
figure img { width: 100%; display: block; }
figcaption { padding: 6px 10px; font-size: 12px; color: #3b4555; word-break: break-all; }
.tag { display: inline-block; background: #1d2430; color: #fff; border-radius: 3px; padding: 0 5px; font-size: 11px; margin-right: 4px; }
.gallery.flagged { grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); }
.gallery.flagged img { image-rendering: pixelated; }
code { background: #f1f4f8; border-radius: 3px; padding: 0 3px; font-size: 12px; }
#flagged-reasons, #flagged-classes { margin: 8px 0; }
pre { background: #f1f4f8; padding: 10px; border-radius: 6px; overflow: auto; font-size: 12px; max-height: 420px; }
.muted { color: #5a6577; }
.scroll { overflow-x: auto; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value) -> str:
    return f"{value:,}" if isinstance(value, (int, np.integer)) else _e(value)


def _img(uri: Optional[str], alt: str, data_chart: str) -> str:
    if uri is None:
        return f'<p class="muted" data-chart-empty="{_e(data_chart)}">{_e(alt)}: nothing to show.</p>'
    return f'<img src="{uri}" alt="{_e(alt)}" data-chart="{_e(data_chart)}">'


def _metric(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else _e(value)


def _quality_section(summary: dict, charts: dict, flagged: list[dict]) -> str:
    """The page's Quality section: flagged objects (by reason, by class, a gallery), metric histograms,
    the thresholds, and what the review changed."""
    q, review = summary["quality"], summary.get("review") or {}
    review_html = ""
    if review.get("imported"):
        cards = "".join(f'<div class="card"><div class="v" data-review="{k}">{_num(review[k])}</div><div class="k">{k}</div></div>'
                        for k in ("reviewed", "accepted", "corrected", "rejected", "added"))
        imports = "".join(
            f"<tr><td>{_e(i.get('import_id'))}</td><td>{_e(i.get('imported_at'))}</td><td>{_e(i.get('file'))}</td>"
            f"<td class='n'>{_num(i.get('reviewed_tasks'))}</td></tr>" for i in review.get("imports") or [])
        review_html = (
            "<h3 id='review'>Human review</h3><p class='muted'>Objects people reviewed in Label Studio (<code>autolabel review import</code>); "
            "every number on this page is the reviewed one: rejected objects are left out, corrected and added ones "
            "(<code>source = review</code>) are counted, and reviewed objects are no longer flagged.</p>"
            f"<div class='cards'>{cards}</div><div class='scroll'><table><tr><th>import</th><th>when</th><th>file</th>"
            f"<th class='n'>tasks reviewed</th></tr>{imports}</table></div>")
    if not q.get("recorded"):
        return ("<section id='quality'><h2>Quality</h2><p class='muted' data-qa='not-recorded'>QA was not recorded for this run: "
                "it has no quality metrics or flags (made before they existed, or with QA turned off), so nothing is flagged.</p>"
                f"{review_html}</section>")
    reasons = q["flagged_by_reason"]
    reason_rows = "".join(
        f"<tr><td><span class='swatch' style='background:{REASON_COLORS.get(r, '#888888')}'></span>{_e(r)}</td>"
        f"<td class='n' data-reason='{_e(r)}'>{_num(n)}</td><td class='n'>{100 * n / max(q['objects'], 1):.1f} %</td></tr>"
        for r, n in reasons.items())
    shown_reasons = list(reasons)
    class_rows = "".join(
        f"<tr><td><span class='swatch' style='background:{_hex(class_color(c['class_id']))}'></span>{_e(c['class_name'])}</td>"
        f"<td class='n'>{_num(c['objects'])}</td><td class='n' data-flagged-class='{_e(c['class_name'])}'>{_num(c['flagged'])}</td>"
        f"<td class='n'>{100 * c['flagged'] / max(c['objects'], 1):.1f} %</td>"
        + "".join(f"<td class='n'>{_num(c['by_reason'].get(r, 0))}</td>" for r in shown_reasons) + "</tr>"
        for c in q["flagged_by_class"][:TOP_GROUPS_SHOWN])
    thresholds = q.get("thresholds") or {}
    threshold_text = ", ".join(f"{k} {v}" for k, v in thresholds.items() if k != "enabled") if thresholds else "not in run.json"
    figures = "".join(
        f"<figure data-flagged-object='{_e(f['image_id'])}:{f['object_id']}'{' class=unreadable data-unreadable' if f.get('note') else ''}>"
        f"<img src='{f['src']}' alt='{_e(f['uri'])} object {f['object_id']}' data-flagged-gallery>"
        "<figcaption>" + "".join(f"<span class='tag reason' style='background:{REASON_COLORS.get(r, '#1d2430')}'>{_e(r)}</span>" for r in f["flags"])
        + f"<br><b>{_e(f['class_name'])}</b> · object {f['object_id']} · mask {_metric(f['mask_score'])} · stability {_metric(f['stability'])}"
        f" · box IoU {_metric(f['box_iou'])} · regions {_metric(f['regions'])} · {_num(f['area'])} px<br>{_e(f['uri'])}"
        + (f"<br><span class='problem'>{_e(f['note'])}</span>" if f.get("note") else "") + "</figcaption></figure>"
        for f in flagged)
    gallery = (f"<div class='gallery flagged'>{figures}</div><p class='muted'>Each flagged object on its own image: the mask in its "
               "class colour with its outline, the prompt box in yellow; the reasons above the numbers.</p>"
               if flagged else "<p class='muted'>No flagged objects to show.</p>")
    metric_charts = "".join(_img(charts.get(k), t, k) for k, t in (
        ("stability", "Stability"), ("box_iou", "Box IoU"), ("outside_box", "Outside the box"), ("regions", "Regions"),
        ("largest_region", "Largest region"), ("hole_area", "Hole area")))
    duplicates = q.get("duplicates") or 0
    return f"""<section id="quality"><h2>Quality</h2>
<div class="cards">
<div class="card"><div class="v" data-stat="flagged">{_num(q['flagged'])}</div><div class="k">flagged for review</div></div>
<div class="card"><div class="v">{100 * q['flagged_share']:.1f} %</div><div class="k">of objects flagged</div></div>
<div class="card"><div class="v" data-stat="duplicates">{_num(duplicates)}</div><div class="k">duplicates marked</div></div>
</div>
<p class="muted">Flagged = <code>needs_review</code>: at least one reason below (QA settings of this run: {_e(threshold_text)}).
Duplicates are masks marked <code>status = duplicate</code> in favour of another object; they are not counted as objects
(see them with <code>--include-duplicates</code>). Export the flagged objects for review with
<code>autolabel export RUN --format labelstudio --flagged</code>.</p>
<div class="charts">{_img(charts.get('flagged_reasons'), 'Flagged objects by reason', 'flagged_reasons')}{_img(charts.get('flagged_classes'), 'Flagged objects by class', 'flagged_classes')}</div>
<div class="scroll"><table id="flagged-reasons"><tr><th>reason</th><th class="n">flagged objects</th><th class="n">share of objects</th></tr>{reason_rows}</table></div>
<div class="scroll"><table id="flagged-classes"><tr><th>class</th><th class="n">objects</th><th class="n">flagged</th><th class="n">share</th>{''.join(f'<th class="n">{_e(r)}</th>' for r in shown_reasons)}</tr>{class_rows}</table></div>
<h3>Flagged objects</h3>{gallery}
<h3>Metrics</h3><div class="charts">{metric_charts}</div>
{review_html}</section>"""


def render_html(summary: dict, groups: list[dict], charts: dict, gallery: list[dict], errors: list[tuple], run: RunData,
                flagged: list[dict] = ()) -> str:
    t = summary["totals"]
    m = run.manifest
    warn = []
    if m.get("status") != "finished":
        warn.append(f"The run's status is <b>{_e(m.get('status'))}</b>: the tables may be incomplete." + (f" Error: {_e(m.get('error'))}" if m.get("error") else ""))
    if m.get("random_weights"):
        warn.append("This run used <b>random weights</b> (a smoke test): boxes, masks and classes are meaningless.")
    if summary["filters"]["active"]:
        warn.append(f"Filtered: only objects with {_e(summary['filters']['description'])} are counted and shown.")
    if (summary.get("review") or {}).get("imported"):
        r = summary["review"]
        warn.append(f"Reviewed: {r['reviewed']:,} objects reviewed by people ({r['accepted']:,} accepted, {r['corrected']:,} corrected, "
                    f"{r['rejected']:,} rejected) and {r['added']:,} added; every number and picture is the reviewed one "
                    "(<a href='#review'>details</a>).")
    if summary.get("run_json_mismatch"):
        warn.append("run.json's totals differ from the Parquet tables: " + _e(summary["run_json_mismatch"]) + " (this page shows the Parquet).")
    unreadable = summary.get("gallery_unreadable") or []
    bad = []
    if unreadable:
        items = "".join(f"<li>{_e(u['uri'])}: {_e(u['reason'])}</li>" for u in unreadable)
        bad.append(
            f"<b>{len(unreadable)} of {summary.get('gallery_images', len(gallery))} gallery images could not be drawn on their own pixels</b> "
            "(their masks are on blank canvases):<ul>" + items + "</ul>" + _e(UNREADABLE_HINT)
        )
    error_lines = "".join(f"<tr><td>{_e(c)}</td><td class='n' data-error-class='{_e(c)}'>{_num(n)}</td></tr>" for c, n in t["errors_by_class"].items())
    class_rows = "".join(
        f"<tr><td><span class='swatch' style='background:{_hex(class_color(c['class_id']))}'></span>{_e(c['class_name'])}</td>"
        f"<td class='n'>{_e(c['class_id'])}</td><td class='n' data-class='{_e(c['class_name'])}'>{_num(c['count'])}</td>"
        f"<td class='n'>{100 * c['count'] / max(t['objects'], 1):.1f}%</td></tr>"
        for c in t["objects_by_class"]
    )
    group_label = summary["group_by"]
    top_classes = [c["class_name"] for c in t["objects_by_class"][:6]]
    group_rows = ""
    for g in groups[:TOP_GROUPS_SHOWN]:
        per_img = f"{g['objects'] / g['ok']:.2f}" if g["ok"] else "–"
        cells = "".join(f"<td class='n'>{_num(g['by_class'].get(c, {}).get('count', 0))}</td>" for c in top_classes)
        group_rows += (
            f"<tr><td>{_e(g['group'])}</td><td class='n'>{_num(g['images'])}</td><td class='n'>{_num(g['ok'])}</td>"
            f"<td class='n'>{_num(g['error'])}</td><td class='n' data-group-objects>{_num(g['objects'])}</td>"
            f"<td class='n'>{per_img}</td>{cells}</tr>"
        )
    num_groups = summary["num_groups"]
    more_groups = f"<p class='muted'>{num_groups - TOP_GROUPS_SHOWN:,} more groups in counts.csv.</p>" if num_groups > TOP_GROUPS_SHOWN else ""
    figures = "".join(
        f"<figure data-image-id='{_e(p['image_id'])}'{' class=unreadable data-unreadable' if p.get('note') else ''}>"
        f"<img src='{p['src']}' alt='{_e(p['uri'])}' data-gallery>"
        f"<figcaption><span class='tag'>{_e(p['why'])}</span><b>{_num(p['n'])}</b> objects · {p['width']}×{p['height']}<br>{_e(p['uri'])}"
        + (f"<br><span class='problem'>{_e(p['note'])}</span>" if p.get("note") else "")
        + "</figcaption></figure>"
        for p in gallery
    )
    error_rows = "".join(f"<tr><td>{_e(u)}</td><td>{_e(c)}</td><td>{_e(msg)}</td></tr>" for u, c, msg in errors)
    models = m.get("models") or {}
    sam, det = models.get("sam") or {}, models.get("detector") or {}

    def kv(rows):
        return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v is not None) + "</table>"

    run_rows = [
        ("status", m.get("status")), ("started", m.get("started_at")), ("finished", m.get("finished_at")),
        ("duration", f"{m['duration_s']:,.1f} s" if m.get("duration_s") is not None else None),
        ("speed", f"{m['images_per_second']:.3f} images/s" if m.get("images_per_second") is not None else None),
        ("input", (m.get("input") or {}).get("uri")), ("listed images", (m.get("input") or {}).get("num_images")),
        ("shards", (m.get("input") or {}).get("num_shards")),
        ("Ray", ", ".join(f"{k}: {v}" for k, v in (m.get("ray") or {}).items()) or None),
    ]
    model_rows = [
        ("SAM 2.1", f"{sam.get('size')} · {sam.get('checkpoint')} · {sam.get('dtype', '')}".strip(" ·")),
        ("SAM sha256", sam.get("sha256")),
        ("detector", det.get("weights")), ("detector sha256", det.get("sha256")),
        ("detector classes", len(det.get("class_names") or {}) or None),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
    timing_section = _timing_section(m)
    gallery_section = (
        f"<div class='gallery'>{figures}</div><p class='muted'>Labels: class, detector score · mask score (SAM's predicted IoU; "
        "– for manifest prompts, which have no detector score). "
        f"At most {LABELS_PER_IMAGE} labels per image; every mask is drawn.</p>"
        if gallery else "<p class='muted'>No gallery (gallery size 0 or no ok images).</p>"
    )
    hist = "".join(_img(charts[k], title, k) for k, title in (
        ("objects_per_image", "Objects per image"), ("det_score", "Detector scores"),
        ("mask_score", "Mask scores"), ("area", "Mask areas")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autolabel report – {_e(run.uri)}</title><style>{CSS}</style></head>
<body>
<header><h1>autolabel report</h1><div class="sub">{_e(run.url())} · generated {_e(summary['generated_at'])}</div></header>
<main>
{''.join(f'<div class="warn bad" id="gallery-unreadable">{w}</div>' for w in bad)}
{''.join(f'<div class="warn">{w}</div>' for w in warn)}
<section id="totals"><h2>Totals</h2>
<div class="cards">
<div class="card"><div class="v" data-stat="images">{_num(t['images'])}</div><div class="k">images</div></div>
<div class="card"><div class="v" data-stat="ok">{_num(t['ok'])}</div><div class="k">ok</div></div>
<div class="card"><div class="v" data-stat="error">{_num(t['error'])}</div><div class="k">errors</div></div>
<div class="card"><div class="v" data-stat="objects">{_num(t['objects'])}</div><div class="k">objects</div></div>
<div class="card"><div class="v" data-stat="classes">{_num(len(t['objects_by_class']))}</div><div class="k">classes seen</div></div>
<div class="card"><div class="v">{t['objects'] / max(t['ok'], 1):.2f}</div><div class="k">objects / ok image</div></div>
{f'<div class="card"><div class="v" data-stat="prompt_errors">{_num(t["prompt_errors"])}</div><div class="k">invalid prompts</div></div>' if t.get("prompt_errors") else ''}
</div>
{('<h3>Errors by class</h3><table><tr><th>error class</th><th class="n">images</th></tr>' + error_lines + '</table>') if error_lines else ''}
</section>
<section id="classes"><h2>Objects per class</h2>
<div class="charts">{_img(charts['classes'], 'Objects per class', 'classes')}</div>
<div class="scroll"><table><tr><th>class</th><th class="n">id</th><th class="n">objects</th><th class="n">share</th></tr>{class_rows}</table></div>
</section>
<section id="distributions"><h2>Distributions</h2><div class="charts">{hist}</div>
{('<p class="muted">Mask area (pixels): ' + ', '.join(f'{k} {v:,.0f}' for k, v in summary['histograms']['area']['quantiles'].items()) + '</p>') if summary['histograms']['area'].get('quantiles') else ''}
</section>
{_quality_section(summary, charts, flagged)}
<section id="groups"><h2>Counts by {_e(group_label)}{' (parent folder of the URI)' if group_label == FOLDER else ''}</h2>
<div class="charts">{_img(charts['groups'], 'Objects by ' + group_label, 'groups')}</div>
<div class="scroll"><table><tr><th>{_e(group_label)}</th><th class="n">images</th><th class="n">ok</th><th class="n">errors</th><th class="n">objects</th><th class="n">objects / ok image</th>{''.join(f'<th class="n">{_e(c)}</th>' for c in top_classes)}</tr>{group_rows}</table></div>{more_groups}
</section>
<section id="gallery"><h2>Gallery</h2>{gallery_section}</section>
{('<section id="errors"><h2>Failed images (first ' + str(len(errors)) + ')</h2><div class="scroll"><table><tr><th>uri</th><th>class</th><th>error</th></tr>' + error_rows + '</table></div></section>') if errors else ''}
<section id="run"><h2>Run</h2>{kv(run_rows)}{timing_section}<h3>Models</h3>{kv(model_rows)}<p class="muted">Versions: {_e(versions)}</p>
<h3>Config</h3><pre>{_e(yaml.safe_dump(m.get('config') or {}, sort_keys=False))}</pre></section>
</main></body></html>
"""


def _timing_section(m: dict) -> str:
    """Where the time went (run.json ``timings``): worker seconds per stage, and per SAM actor its
    images and how busy its device was. Empty for runs made before timings were recorded."""
    timings = m.get("timings") or {}
    stages, actors = timings.get("stages") or {}, timings.get("sam_actors") or {}
    if not stages:
        return ""
    rows = "".join(
        f"<tr><td>{_e(stage)}</td><td class='n'>{v['seconds']:,.1f}</td><td class='n'>{v['ms_per_image']:,.1f}</td>"
        f"<td class='n'>{100 * v['share']:.1f} %</td></tr>" for stage, v in stages.items())
    def busy(v: dict) -> str:
        return "" if v.get("busy_fraction") is None else f"{100 * v['busy_fraction']:.0f} %"

    actor_rows = "".join(
        f"<tr><td>{_e(actor)}</td><td>{_e(v.get('node'))}</td><td class='n'>{_num(v['images'])}</td><td class='n'>{busy(v)}</td></tr>"
        for actor, v in actors.items())
    steady = (m.get("progress") or {}).get("steady_images_per_second")
    return (
        "<h3>Where the time went</h3><p class='muted'>Seconds summed over all workers (stages overlap in time); "
        "the stage with the largest share is the one to give more resources."
        + (f" Steady rate: {steady:.2f} images/s." if steady else "") + "</p>"
        "<table id='timings'><tr><th>stage</th><th class='n'>worker seconds</th><th class='n'>ms / image</th><th class='n'>share</th></tr>"
        + rows + "</table>"
        + ("<table id='sam-actors'><tr><th>SAM actor</th><th>node</th><th class='n'>images</th><th class='n'>device busy</th></tr>"
           + actor_rows + "</table>" if actor_rows else "")
    )


# ----------------------------------------------------------------------------------- driver


def _compare_with_manifest(totals: dict, manifest: dict) -> Optional[str]:
    recorded = manifest.get("totals") or {}
    diffs = [f"{k}: run.json {recorded[k]} vs Parquet {totals[k]}" for k in ("images", "ok", "error", "objects") if k in recorded and recorded[k] != totals[k]]
    return "; ".join(diffs) or None


def build_report(run: RunData, options: ReportOptions, image_storage_options: Optional[dict] = None) -> tuple[str, dict, RunStats]:
    """(html, summary dict, stats) for a run; the caller writes them. ``image_storage_options``:
    fsspec options for re-reading the gallery's images (the run's ``input.storage_options``)."""
    stats = RunStats(run, options)
    try:
        return _build(run, options, stats, image_storage_options)
    except BaseException:
        stats.close()
        raise


def _build(run: RunData, options: ReportOptions, stats: RunStats, image_storage_options: Optional[dict]) -> tuple[str, dict, RunStats]:
    known = {**run.class_names(), **{int(i): n for i, n in stats.rows("SELECT DISTINCT class_id, class_name FROM objects_ds WHERE class_id IS NOT NULL")}}
    options.filter.check_classes(known)
    log.info("report: counting %s (%d images parts, %d objects parts)", run.uri, len(run.image_files), len(run.object_files))
    totals = stats.totals()
    histograms = stats.histograms()
    groups, num_groups = stats.groups()
    summary = {
        "run": run.url(),
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_status": run.manifest.get("status"),
        "random_weights": run.manifest.get("random_weights"),
        "filters": {"active": options.filter.active, "description": options.filter.describe(), **options.filter.as_dict()},
        "group_by": options.group_by,
        "totals": totals,
        "histograms": histograms,
        "groups": [{**g, "by_class": [{"class_name": k, **v} for k, v in g["by_class"].items()]} for g in groups],
        "num_groups": num_groups,
        # Review decisions change the objects on purpose: then run.json's totals are the run's, not the reviewed ones.
        "run_json_mismatch": None if options.filter.active or stats.review else _compare_with_manifest(totals, run.manifest),
        "quality": stats.quality(),
        "review": {"imported": bool(stats.review), **stats.review.counts(), "imports": stats.review.logs},
    }
    import matplotlib

    with matplotlib.rc_context(STYLE):
        charts, picks, objects = _draw(stats, totals, histograms, groups, num_groups, options, image_storage_options)
        flagged = draw_flagged(stats, stats.flagged_picks(options.flagged_gallery), image_storage_options)
        charts.update(_quality_charts(summary["quality"]))
    summary["gallery"] = [{**{k: p[k] for k in ("image_id", "uri", "n", "why")}, "drawn": len(objects[p["image_id"]]),
                           "on_image": not p["note"], "problem": p["note"]} for p in picks]
    if summary["quality"]["recorded"]:
        summary["quality"]["gallery"] = [{k: v for k, v in f.items() if k not in ("src", "note")} | {"problem": f["note"]} for f in flagged]
    # Images a gallery could not draw on their pixels: the page, the CLI (exit 1) and the log say so.
    unreadable = {p["uri"]: p["note"] for p in [*picks, *flagged] if p["note"]}
    summary["gallery_unreadable"] = [{"uri": u, "reason": why} for u, why in unreadable.items()]
    summary["gallery_images"] = len({p["uri"] for p in [*picks, *flagged]})
    page = render_html(summary, groups, charts, picks, stats.errors_sample(), run, flagged)
    return page, summary, stats


def _quality_charts(quality: dict) -> dict:
    if not quality["recorded"]:
        return {}
    h = quality["histograms"]
    charts = {
        "flagged_reasons": chart_reasons(quality["flagged_by_reason"]),
        "flagged_classes": chart_flagged_classes(quality["flagged_by_class"]),
        "regions": chart_counts(h["regions"]["values"], h["regions"]["objects"], "Connected regions per mask", "regions",
                                h["regions"]["last_is_at_least"]),
        "hole_area": chart_hist(h["hole_area"]["edges"], h["hole_area"]["counts"],
                                f"Hole area (masks with holes; {h['hole_area']['without_holes']:,} without)", "pixels (log scale)", log_x=True),
    }
    for key, (title, xlabel) in METRIC_TITLES.items():
        charts[key] = chart_hist(h[key]["edges"], h[key]["counts"], title, xlabel)
    return charts


def _draw(stats: RunStats, totals: dict, histograms: dict, groups: list[dict], num_groups: int, options: ReportOptions,
          image_storage_options: Optional[dict] = None):
    """Charts (SVG data URIs) and the gallery (JPEG data URIs)."""
    charts = {
        "classes": chart_classes(totals["objects_by_class"]),
        "objects_per_image": chart_objects_per_image(histograms["objects_per_image"]["values"], histograms["objects_per_image"]["images"]),
        "det_score": chart_hist(histograms["det_score"]["edges"], histograms["det_score"]["counts"], "Detector scores", "det_score"),
        "mask_score": chart_hist(histograms["mask_score"]["edges"], histograms["mask_score"]["counts"], "Mask scores (SAM predicted IoU)", "mask_score"),
        "area": chart_hist(histograms["area"]["edges"], histograms["area"]["counts"], "Mask areas", "pixels (log scale)", log_x=True),
        "groups": chart_groups(groups, totals["objects_by_class"], options.group_by, num_groups),
    }
    picks = stats.gallery_picks()
    log.info("report: drawing %d gallery images", len(picks))
    objects = stats.objects_of([p["image_id"] for p in picks])
    for pick in picks:
        pick["src"], pick["note"] = render_gallery_image(pick, objects[pick["image_id"]], image_storage_options)
    return charts, picks, objects


def write_report(
    run_uri: str,
    out_uri: Optional[str] = None,
    options: Optional[ReportOptions] = None,
    storage_options: Optional[dict] = None,
    image_storage_options: Optional[dict] = None,
) -> dict:
    """Write report.html, counts.csv and summary.json (default: RUN/report/); returns their URLs and
    the summary (``summary["gallery_unreadable"]`` lists gallery images that could not be read).

    ``storage_options``: fsspec options of the run folder and of ``out_uri``; ``image_storage_options``:
    those of the images (the run's ``input.storage_options``). Neither is ever written or logged."""
    options = options or ReportOptions()
    run = RunData(run_uri, storage_options)
    page, summary, stats = build_report(run, options, image_storage_options)
    try:
        return _write_outputs(run, out_uri, storage_options, page, summary, stats)
    finally:
        stats.close()


def _write_outputs(run: RunData, out_uri: Optional[str], storage_options: Optional[dict], page: str, summary: dict, stats: RunStats) -> dict:
    from fsspec.core import url_to_fs

    if out_uri is None:
        fs, folder = run.fs, f"{run.root}/report"
    else:
        fs, folder = url_to_fs(out_uri, **(storage_options or {}))
        folder = folder.rstrip("/")
    fs.makedirs(folder, exist_ok=True)
    with fs.open(f"{folder}/counts.csv", "w", newline="") as f:
        summary["counts_csv_rows"] = stats.class_group_csv(f)
    fs.pipe_file(f"{folder}/summary.json", json.dumps(summary, indent=2, default=str).encode())
    fs.pipe_file(f"{folder}/report.html", page.encode("utf-8"))
    paths = {name: fs.unstrip_protocol(f"{folder}/{name}") for name in ("report.html", "counts.csv", "summary.json")}
    log.info("report: %s", paths["report.html"])
    return {"paths": paths, "summary": summary}


def report_after_run(cfg, run_uri: str) -> Optional[str]:
    """The automatic report at the end of ``autolabel run`` (``report.*`` config); never fails the run."""
    secrets = (cfg.input.storage_options, cfg.output.storage_options)
    try:
        options = ReportOptions(group_by=cfg.report.group_by, gallery=cfg.report.gallery)
        result = write_report(run_uri, None, options, cfg.output.storage_options, cfg.input.storage_options)
    except Exception as exc:  # noqa: BLE001 - the labels are written; a report problem is only a warning
        log.warning("report: not written (%s: %s); run `autolabel report %s` to retry", type(exc).__name__, redact(str(exc), *secrets), run_uri)
        return None
    for item in result["summary"]["gallery_unreadable"]:
        log.warning("report: gallery image %s drawn on a blank canvas: %s", item["uri"], item["reason"])
    return result["paths"]["report.html"]


__all__ = ["report_after_run", "ReportError", "ReportOptions", "write_report", "build_report", "FilterError", "RunError", "FOLDER"]
