"""Shard summaries: the report's numbers for one shard, so that a report merges one small file per
shard instead of scanning every object row, and its cost grows with shards, not rows.

Each shard's commit (run/sink.py) writes ``RUN/summaries/shard-X.parquet`` beside
``images/shard-X.parquet`` and ``objects/shard-X.parquet``. The report (stats.py) merges them, and
runs the very same queries over the rows of the shards it cannot take from a summary (a run made
before summaries, shards a review touched, a filtered report): one definition of every number, so
merged numbers equal a scan. Counts add up across shards because each image and its objects live
in exactly one shard.

A summary is a long table (``SCHEMA``): one row per count, ``kind`` saying which (docs/output.md
lists them). Counts (``objects``, ``images``, ``ok``, ``error``, ``flagged``) are summed when
merged; rows with ``shard`` set are facts about that shard (its URI range, the images the gallery
may draw) and are never summed.
"""
from __future__ import annotations

from typing import Optional

import pyarrow as pa

from pipeline.outputs.columns import UNLABELED, normalize_objects, normalized_columns_sql

VERSION = 1  # rows of another version are not merged: those shards are scanned
FOLDER = "folder"  # the group key of the parent folder of each image's URI (--group-by folder)
SCORE_BINS = 50  # bins over [0, 1] of det_score, mask_score and the QA metrics
AREA_BINS_PER_DECADE = 10  # the area and hole-area charts
QUANTILE_BINS_PER_DECADE = 100  # area quantiles, estimated from these finer bins (within 1.2 %)
UNIT_COLUMNS = ("det_score", "mask_score", "stability", "box_iou", "outside_box", "largest_region")
MAX_REGIONS = 10  # the regions histogram's last bar is "10 or more"
TOP_IMAGES = 32  # the most crowded images a summary keeps: the gallery's "most objects" picks, up to 32
ERROR_SAMPLE = 20  # error rows a summary keeps (the report lists the first 20, by class and URI)
MAX_GROUP_VALUES = 1000  # a metadata key with more values in one shard is left out (a report grouped by it scans)

SCHEMA = pa.schema([
    ("version", pa.int32()),
    ("kind", pa.string()),  # what the row counts (docs/output.md)
    ("shard", pa.string()),  # set on the rows about this shard alone (never summed)
    ("key", pa.string()),  # images: status; hist: the column; group_*: the group key (folder or a metadata column)
    ("value", pa.string()),  # images: error_class; reason: the flag; group_*: the group's value
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("bin", pa.int64()),  # histogram bin (or value: objects per image, regions)
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("text", pa.string()),  # error_sample: the error message
    ("objects", pa.int64()),
    ("images", pa.int64()),
    ("ok", pa.int64()),
    ("error", pa.int64()),
    ("flagged", pa.int64()),
])
COUNTS = ("objects", "images", "ok", "error", "flagged")
KEYS = tuple(n for n in SCHEMA.names if n not in COUNTS)


def unit_bin(col: str) -> str:
    """SQL: the bin of a score-like column, SCORE_BINS bins over [0, 1]."""
    return f"least(greatest(floor({col} * {SCORE_BINS}), 0), {SCORE_BINS - 1})::INT"


def log_bin(col: str, per_decade: int) -> str:
    return f"floor(log10(greatest({col}, 1)) * {per_decade})::INT"


def group_expr(key: str, alias: str = "") -> str:
    """SQL for the group of an images row (``alias`` = table alias with its dot, or "")."""
    if key == FOLDER:
        return f"regexp_replace({alias}uri, '/[^/]*$', '')"
    return f"CAST({alias}{quote(key)} AS VARCHAR)"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_views(con, image_columns: list[str], object_schema: pa.Schema, filt=None, review=None, run=None) -> None:
    """The report's views over the tables registered as ``images_ds`` and ``objects_ds``: ``images``,
    ``objects_norm`` (every objects row, QA columns present), ``objects_reviewed`` (the counted rows as
    reviewed, duplicates included), ``objects`` (what the report counts: reviewed, filtered) and
    ``per_image``. ``review`` (decisions.Review, with its ``run``) applies decisions; ``filt`` the
    user's filters (filters.ObjectFilter)."""
    from pipeline.outputs.filters import ObjectFilter
    from pipeline.outputs.rundata import counted_sql

    filt = filt or ObjectFilter()
    columns = object_schema.names
    con.execute("CREATE VIEW images AS SELECT * FROM images_ds")
    # QA columns as nulls where the run has none (made before them): no metrics, nothing flagged.
    con.execute(f"CREATE VIEW objects_norm AS SELECT *{normalized_columns_sql(columns)} FROM objects_ds")
    if review:
        review.sql_view(con, run, "objects_norm", normalize_objects(object_schema.empty_table()).schema, True, "objects_reviewed")
    else:
        con.execute(f"CREATE VIEW objects_reviewed AS SELECT * FROM objects_norm WHERE {counted_sql(columns, True)}")
    # Only rows that are objects (not invalid-prompt rows, extra SAM candidates or duplicates), then the user's filters.
    shown = "TRUE" if filt.include_duplicates or "status" not in columns else "status <> 'duplicate'"
    con.execute(f"CREATE VIEW objects AS SELECT * REPLACE (coalesce(class_name, {literal(UNLABELED)}) AS class_name) "
                f"FROM objects_reviewed WHERE {shown} AND {filt.sql()}")
    if filt.active or review:
        con.execute(
            "CREATE VIEW per_image AS SELECT i.image_id, i.uri, i.width, i.height, coalesce(c.n, 0) AS n "
            "FROM images i LEFT JOIN (SELECT image_id, count(*) AS n FROM objects GROUP BY image_id) c USING (image_id) "
            "WHERE i.status = 'ok'"
        )
    else:  # no filter, no review: the images table's own counts, no join needed
        con.execute("CREATE VIEW per_image AS SELECT image_id, uri, width, height, num_objects AS n FROM images WHERE status = 'ok'")


def _objects_with_group(key: str) -> str:
    """FROM clause giving objects a ``g`` column (no join for the folder: the URI is there)."""
    if key == FOLDER:
        return f"(SELECT *, {group_expr(key)} AS g FROM objects)"
    return f"(SELECT o.*, {group_expr(key, 'i.')} AS g FROM objects o JOIN images i USING (image_id))"


def summary_queries(object_columns: list[str], keys: list[str], filter_sql: str = "TRUE", shard: Optional[str] = None) -> list[str]:
    """The SELECTs whose rows make a summary, over the views of ``create_views``. ``keys``: the group
    keys to count by; ``shard``: the shard's name for its own rows (None: a report's scan of several)."""
    k = lambda kind: f"SELECT {literal(kind)} AS kind, "  # noqa: E731
    qs = [
        k("images") + "status AS key, error_class AS value, count(*) AS images FROM images GROUP BY ALL",
        k("seen_class") + "class_id, class_name FROM objects_norm WHERE class_id IS NOT NULL GROUP BY ALL",
        k("qa_values") + "count(needs_review) AS objects FROM objects_norm",
        k("class") + "class_id, class_name, count(*) AS objects, count(*) FILTER (WHERE needs_review) AS flagged FROM objects GROUP BY ALL",
        k("reason") + "r AS value, count(*) AS objects FROM (SELECT unnest(flags) AS r FROM objects WHERE needs_review) GROUP BY r",
        k("class_reason") + "class_name, r AS value, count(*) AS objects "
                            "FROM (SELECT class_name, unnest(flags) AS r FROM objects WHERE needs_review) GROUP BY ALL",
        k("per_image") + "n AS bin, count(*) AS images FROM per_image GROUP BY n",
        k("area") + f"{log_bin('area', AREA_BINS_PER_DECADE)} AS bin, count(*) AS objects FROM objects GROUP BY bin",
        k("area_fine") + f"CASE WHEN area >= 1 THEN floor(log10(area) * {QUANTILE_BINS_PER_DECADE})::INT ELSE -1 END AS bin, "
                         "count(*) AS objects FROM objects WHERE area IS NOT NULL GROUP BY bin",
        k("regions") + f"least(regions, {MAX_REGIONS}) AS bin, count(*) AS objects FROM objects WHERE regions IS NOT NULL GROUP BY bin",
        k("hole_area") + f"CASE WHEN hole_area > 0 THEN floor(log10(hole_area) * {AREA_BINS_PER_DECADE})::INT END AS bin, "
                         "count(*) AS objects FROM objects WHERE hole_area IS NOT NULL GROUP BY bin",
        k("crowded") + "image_id, uri, width, height, n AS bin FROM per_image WHERE n > 0 "
                       f"ORDER BY n DESC, image_id LIMIT {TOP_IMAGES}",
        k("error_sample") + f"uri, error_class AS value, error AS text FROM images WHERE status <> 'ok' "
                            f"ORDER BY error_class, uri LIMIT {ERROR_SAMPLE}",
    ]
    qs += [k("hist") + f"{literal(col)} AS key, {unit_bin(col)} AS bin, count(*) AS objects FROM objects "
           f"WHERE {col} IS NOT NULL GROUP BY bin" for col in UNIT_COLUMNS]
    if "status" in object_columns:
        qs.append(k("prompt_errors") + "count(*) AS objects FROM objects_norm WHERE status = 'error'")
        qs.append(k("duplicates") + f"count(*) AS objects FROM objects_reviewed WHERE status = 'duplicate' AND {filter_sql}")
    for key in keys:
        g = group_expr(key)
        qs += [
            k("group_images") + f"{literal(key)} AS key, {g} AS value, count(*) AS images, count(*) FILTER (WHERE status = 'ok') AS ok, "
                                "count(*) FILTER (WHERE status <> 'ok') AS error FROM images GROUP BY value",
            k("group_objects") + f"{literal(key)} AS key, g AS value, count(*) AS objects FROM {_objects_with_group(key)} GROUP BY g",
            k("group_class") + f"{literal(key)} AS key, g AS value, class_id, class_name, count(*) AS objects, "
                               f"count(DISTINCT image_id) AS images FROM {_objects_with_group(key)} GROUP BY ALL",
        ]
    if shard is not None:  # facts about this shard alone: where its URIs lie, its ok images and flagged objects, its group keys
        qs += [
            k("shard") + "min(uri) AS key, max(uri) AS value, count(*) AS images, count(*) FILTER (WHERE status = 'ok') AS ok, "
                         "(SELECT count(*) FILTER (WHERE needs_review) FROM objects) AS flagged, "
                         "(SELECT max(n) FROM per_image WHERE n > 0) AS bin, "
                         "(SELECT image_id FROM per_image WHERE n > 0 ORDER BY n DESC, image_id LIMIT 1) AS image_id FROM images",
            k("first_error") + "uri, error_class AS value FROM images WHERE status <> 'ok' ORDER BY error_class, uri LIMIT 1",
            k("shard_reason") + "r AS value, count(*) AS objects FROM (SELECT unnest(flags) AS r FROM objects WHERE needs_review) GROUP BY r",
        ]
        qs += [k("group_key") + f"{literal(key)} AS key" for key in keys]
    return qs


PER_SHARD = ("shard", "shard_reason", "group_key", "first_error", "crowded", "error_sample")  # kinds whose rows carry their shard
UNCOUNTED = ("seen_class", "group_key", "first_error", "crowded", "error_sample")  # kinds whose rows are facts, not counts
SAMPLES = ("crowded", "error_sample")  # per-shard rows a report reads only from the shards that may hold the run's first ones


def summarize(con, object_columns: list[str], keys: list[str], filter_sql: str = "TRUE", shard: Optional[str] = None) -> pa.Table:
    """The summary of what the views of ``create_views`` hold, as one table in ``SCHEMA``."""
    sql = " UNION ALL BY NAME ".join(f"({q})" for q in summary_queries(object_columns, keys, filter_sql, shard))
    table = con.sql(sql).to_arrow_table()
    n = table.num_rows
    columns = []
    for field in SCHEMA:
        if field.name == "version":
            columns.append(pa.array([VERSION] * n, pa.int32()))
        elif field.name == "shard":
            kinds = table.column("kind").to_pylist()
            columns.append(pa.array([shard if kind in PER_SHARD else None for kind in kinds], pa.string()))
        elif field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def shard_summary(images: pa.Table, objects: pa.Table, meta_columns: list[str], shard: str) -> pa.Table:
    """A committed shard's summary, from the two tables its commit wrote (nothing reviewed, nothing
    filtered): counts by folder and by each metadata key with at most MAX_GROUP_VALUES values here."""
    import duckdb

    con = duckdb.connect(config={"threads": 1})
    try:
        con.register("images_ds", images)
        con.register("objects_ds", objects)
        create_views(con, images.column_names, objects.schema)
        keys = [FOLDER]
        for key in meta_columns:
            if con.sql(f"SELECT count(DISTINCT {quote(key)}) FROM images").fetchall()[0][0] <= MAX_GROUP_VALUES:
                keys.append(key)
        return summarize(con, objects.column_names, keys, shard=shard)
    finally:
        con.close()


def area_quantiles(bins: list[tuple[int, int]], qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> Optional[list[float]]:
    """Quantiles (as duckdb's ``quantile_cont``: interpolated between neighbouring ranks) of the
    areas counted in ``area_fine`` bins, each area taken as its bin's value: exact where a bin holds
    a single whole number of pixels (areas under 44), otherwise within 1.2 %."""
    bins = sorted((b, n) for b, n in bins if n)
    total = sum(n for _, n in bins)
    if not total:
        return None

    def value(b: int) -> float:
        if b < 0:
            return 0.0
        lo, hi = 10 ** (b / QUANTILE_BINS_PER_DECADE), 10 ** ((b + 1) / QUANTILE_BINS_PER_DECADE)
        first, last = int(-(-lo // 1)), int(-(-hi // 1)) - 1  # the whole numbers in [lo, hi)
        return float(first) if first >= last else (lo * hi) ** 0.5

    def at(rank: int) -> float:
        seen = 0
        for b, n in bins:
            seen += n
            if rank < seen:
                return value(b)
        return value(bins[-1][0])

    out = []
    for q in qs:
        pos = q * (total - 1)
        lo = int(pos)
        frac = pos - lo
        out.append(at(lo) if frac == 0 else at(lo) + (at(lo + 1) - at(lo)) * frac)
    return out
