"""The objects table as every reader of a run sees it: the quality-control columns and ``review``
present (null where a run made before them has none, so such a run counts as nothing flagged),
the status of duplicates, the name shown for objects without a class."""
from __future__ import annotations

import pyarrow as pa

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
