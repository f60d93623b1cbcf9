"""The human review loop: ``autolabel review import RUN FILE``.

A person reviews the tasks of ``autolabel export --format labelstudio`` in Label Studio and exports
them (Label Studio's JSON export). ``import_review`` reads that file and records, per object the
task showed, one decision, relative to the run's own mask (the Parquet):

- ``accepted``: the annotation has the object's region with the run's mask and label, bit for bit;
- ``corrected``: the region is there with another mask or label (the new mask is stored as COCO RLE
  in original image pixels, with the label);
- ``rejected``: the region was deleted;
- ``added``: a region the person drew (a new object, with a new ``object_id`` of that image).

Decisions go to ``RUN/review/import-<UTC time>.parquet`` (and a JSON log to ``RUN/review/_logs/``); the run's
committed shards are never touched. Each decision carries the ``run_id`` of the run it was made on:
``run --overwrite`` removes them with the run, and decisions of another run are ignored (with a
warning) rather than applied to objects that merely share an ``object_id``. A task's objects are matched by the region ids the export gave
them (``o<object_id>``, listed in the task's ``data.autolabel.objects``), or, where Label Studio gave
a region a new id, by a bit-identical mask. Of a task's annotations the newest one not cancelled
(skipped) counts; tasks without one are left unreviewed.

Imports supersede each other per object, in the order they were made (their file names sort by
time): the newest decision about an object wins. Importing the same reviewed tasks again gives the
same decisions: an added region keeps the ``object_id`` it got the first time (matched by its
Label Studio id), and one that was deleted since is rejected.

The decisions' schema and ``Review``, the run as reviewed (what every export and the report
read), are in outputs/decisions.py.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.outputs import labelstudio as ls
from pipeline.outputs.columns import UNLABELED
from pipeline.outputs.decisions import DECISION_SCHEMA, DECISIONS, LOG_FOLDER, Review
from pipeline.outputs.rundata import RunData, known_classes
from pipeline.sam import masks as mask_codec

log = logging.getLogger("autolabel.review")


class ReviewError(ValueError):
    """The file cannot be imported into this run (not a Label Studio export of it, unknown labels, ...)."""


@dataclass
class ImportResult:
    import_id: str
    path: str
    tasks: int = 0
    reviewed_tasks: int = 0
    unreviewed_tasks: int = 0  # no annotation, or only cancelled (skipped) ones
    decisions: dict = field(default_factory=lambda: {d: 0 for d in DECISIONS})
    ignored_results: int = 0  # regions of other types (rectangles, polygons, ...): not masks
    matched_by_mask: int = 0  # regions Label Studio gave a new id, matched to their object by an identical mask

    def summary(self) -> str:
        d = self.decisions
        lines = [
            f"autolabel review import: {self.tasks:,} tasks ({self.reviewed_tasks:,} reviewed, {self.unreviewed_tasks:,} without a "
            f"submitted annotation): {d['accepted']:,} accepted, {d['corrected']:,} corrected, {d['rejected']:,} rejected, "
            f"{d['added']:,} added -> {self.path}",
        ]
        if self.ignored_results:
            lines.append(f"  {self.ignored_results:,} regions that are not brush masks (rectangles, polygons, ...) were ignored")
        return "\n".join(lines)


def _annotation_of(task: dict) -> Optional[dict]:
    """The task's newest annotation that was submitted (not cancelled/skipped), or None."""
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def _annotator(annotation: dict) -> Optional[str]:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def _read_tasks(run: RunData, file_uri: str, storage_options: Optional[dict]) -> list[dict]:
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(file_uri, **(storage_options or {}))
        tasks = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise ReviewError(f"{file_uri}: no such file") from None
    except ValueError as exc:
        raise ReviewError(f"{file_uri} is not JSON ({exc}); export the project from Label Studio as JSON") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ReviewError(f"{file_uri}: not a Label Studio JSON export (a list of tasks)")
    if tasks and not any("annotations" in t for t in tasks):
        raise ReviewError(f"{file_uri}: the tasks have no 'annotations'; export the project from Label Studio with the JSON "
                          "format (not JSON-MIN or CSV)")
    ours = [t for t in tasks if isinstance((t.get("data") or {}).get(ls.DATA_KEY), dict)]
    if len(ours) < len(tasks):
        raise ReviewError(f"{file_uri}: {len(tasks) - len(ours)} of {len(tasks)} tasks have no data.{ls.DATA_KEY}: only tasks "
                          "made by `autolabel export --format labelstudio` can be imported")
    return ours


def _objects_of(run: RunData, image_ids: list[str]) -> dict[tuple[str, int], dict]:
    """The run's own rows (every status, candidate 0) of these images, keyed by (image_id, object_id)."""
    if not image_ids or not run.object_files:
        return {}
    table = run.dataset("objects").to_table(
        columns=["image_id", "object_id", "candidate", "status", "class_id", "class_name", "mask"],
        filter=pc.field("image_id").isin(image_ids) & (pc.field("candidate") == 0),
    )
    return {(r["image_id"], r["object_id"]): r for r in table.to_pylist()}


def _label_index(run: RunData) -> dict[str, Optional[int]]:
    index: dict[str, Optional[int]] = {}
    for cid, name in sorted(known_classes(run).items()):
        index.setdefault(name, None if name == UNLABELED else cid)
    return index


def _new_import_id(run: RunData) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    existing = {p.rsplit("/", 1)[-1] for p in run.review_files()}
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    import_id, n = f"import-{stamp}", 1
    while f"{import_id}.parquet" in existing:  # two imports in one microsecond: keep the order of their names
        n += 1
        import_id = f"import-{stamp}-{n:03d}"
    if existing and max(existing) > f"{import_id}.parquet":
        raise ReviewError(f"{run.url('review')} holds an import newer than now ({max(existing)}): is the clock right?")
    return import_id


def import_review(run_uri: str, file_uri: str, storage_options: Optional[dict] = None,
                  file_storage_options: Optional[dict] = None) -> ImportResult:
    """Record the decisions of a Label Studio JSON export in ``RUN/review/``; raises ReviewError/RunError
    (nothing written) when the file does not fit the run."""
    run = RunData(run_uri, storage_options)
    tasks = _read_tasks(run, file_uri, file_storage_options if file_storage_options is not None else storage_options)
    mine = (run.manifest.get("fingerprint") or {}).get("sha256")
    foreign = sorted({str(t["data"][ls.DATA_KEY].get("run_fingerprint")) for t in tasks
                      if mine and t["data"][ls.DATA_KEY].get("run_fingerprint") not in (None, mine)})
    if foreign:  # the same images labeled by another run: the same image ids, other objects behind the same object ids
        raise ReviewError(f"{file_uri}: the tasks were exported from another run (fingerprint {foreign[0][:12]}..., this run's is "
                          f"{mine[:12]}...); import them into the run they came from ({tasks[0]['data'][ls.DATA_KEY].get('run')})")
    image_ids = sorted({str(t["data"][ls.DATA_KEY].get("image_id")) for t in tasks})
    images = {}
    if image_ids:
        table = run.dataset("images").to_table(columns=["image_id", "uri", "width", "height", "status"],
                                               filter=pc.field("image_id").isin(image_ids))
        images = {r["image_id"]: r for r in table.to_pylist()}
    unknown = [i for i in image_ids if i not in images or images[i]["status"] != "ok"]
    if unknown:
        raise ReviewError(f"{file_uri}: {len(unknown)} tasks show images this run does not have (or has as error rows), e.g. "
                          f"image_id {unknown[0]}: were they exported from another run?")
    base = _objects_of(run, image_ids)
    labels = _label_index(run)
    earlier = run.review
    import_id = _new_import_id(run)
    result = ImportResult(import_id=import_id, path=run.url("review", f"{import_id}.parquet"), tasks=len(tasks))
    # Per image: the next free object_id, and the ids earlier imports gave added regions (by their Label Studio id).
    next_id: dict[str, int] = {}
    for (image_id, object_id) in base:
        next_id[image_id] = max(next_id.get(image_id, 0), object_id + 1)
    added_ids: dict[tuple[str, str], int] = {}
    added_from: dict[tuple[str, str], set[int]] = {}  # (image, export) -> ids added from that export's task
    for row in earlier.decisions.to_pylist():
        next_id[row["image_id"]] = max(next_id.get(row["image_id"], 0), row["object_id"] + 1)
        if row["decision"] == "added":
            added_ids[(row["image_id"], row["ls_result_id"])] = row["object_id"]
            added_from.setdefault((row["image_id"], row["export_id"]), set()).add(row["object_id"])
    rows, problems = [], []
    for task in tasks:
        meta = task["data"][ls.DATA_KEY]
        image = images[str(meta["image_id"])]
        annotation = _annotation_of(task)
        if annotation is None:
            result.unreviewed_tasks += 1
            continue
        result.reviewed_tasks += 1
        common = {
            "import_id": import_id, "run_id": run.manifest.get("run_id"), "image_id": image["image_id"], "uri": image["uri"],
            "ls_task_id": task.get("id"),
            "ls_annotation_id": annotation.get("id"), "export_id": meta.get("export_id"), "annotator": _annotator(annotation),
            "reviewed_at": str(annotation.get("updated_at") or annotation.get("created_at") or "") or None,
        }
        try:
            task_rows = _decide(task, annotation, meta, image, base, earlier, labels, next_id, added_ids, added_from, result)
        except (ReviewError, ls.LabelStudioError) as exc:
            problems.append(f"task {task.get('id')} ({image['uri']}): {exc}")
            continue
        rows += [{**common, **r} for r in task_rows]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ReviewError(f"{file_uri}: nothing imported; " + "; ".join(problems[:10]) + more)
    for r in rows:
        result.decisions[r["decision"]] += 1
    _write(run, import_id, rows, {
        "import_id": import_id, "run_id": run.manifest.get("run_id"), "run": run.url(), "file": file_uri,
        "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": result.tasks, "reviewed_tasks": result.reviewed_tasks, "unreviewed_tasks": result.unreviewed_tasks,
        "decisions": result.decisions, "ignored_results": result.ignored_results, "matched_by_mask": result.matched_by_mask,
        "export_ids": sorted({str(t["data"][ls.DATA_KEY].get("export_id")) for t in tasks}),
    })
    return result


def _decide(task, annotation, meta, image, base, earlier: Review, labels, next_id, added_ids, added_from, result) -> list[dict]:
    """Decision rows for one reviewed task."""
    h, w = int(image["height"]), int(image["width"])
    image_id = image["image_id"]
    regions: dict[str, dict] = {}
    order: list[str] = []
    for item in annotation.get("result") or []:
        if not isinstance(item, dict) or str(item.get("type", "")).lower() != "brushlabels":
            result.ignored_results += 1
            continue
        value = item.get("value") or {}
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise ReviewError(f"region {item.get('id')} is not an RLE brush mask")
        if (item.get("original_width"), item.get("original_height")) not in ((w, h), (None, None)):
            raise ReviewError(f"region {item.get('id')} is {item.get('original_width')}x{item.get('original_height')}, "
                              f"the image is {w}x{h}")
        names = value.get("brushlabels") or [UNLABELED]
        if len(names) > 1:
            raise ReviewError(f"region {item.get('id')} has {len(names)} labels ({', '.join(map(str, names))}); give each mask one")
        if names[0] not in labels:
            raise ReviewError(f"label {names[0]!r} is not one of the run's classes ({', '.join(list(labels)[:20])})")
        rid = str(item.get("id"))
        if rid not in regions:
            order.append(rid)
        regions[rid] = {"mask": ls.rle_decode(value["rle"], h, w), "class_name": names[0], "class_id": labels[names[0]]}

    exported = {str(k): int(v) for k, v in (meta.get("objects") or {}).items()}

    def content(region: dict) -> dict:
        rle = mask_codec.encode(region["mask"][None])[0]
        x, y, bw, bh = mask_codec.bbox_xywh(rle)
        return {"class_id": region["class_id"], "class_name": None if region["class_name"] == UNLABELED else region["class_name"],
                "mask": rle, "area": int(region["mask"].sum()), "box": [x, y, x + bw, y + bh]}

    def original(object_id: int) -> Optional[dict]:
        """What the run (or an earlier import, for an added object) says object_id is."""
        row = base.get((image_id, object_id))
        if row is not None:
            return {"kind": "run", "mask": mask_codec.decode(row["mask"]) if row["mask"] else None,
                    "class_name": row["class_name"] if row["class_name"] is not None else UNLABELED}
        d = earlier.final.get((image_id, object_id))
        if d is not None and d["decision"] in ("added", "rejected") and d["mask"] is not None:
            return {"kind": "added", "mask": mask_codec.decode(d["mask"]), "class_name": d["class_name"] or UNLABELED}
        for row in earlier.decisions.to_pylist():  # an added object rejected later: its mask is in the import that added it
            if row["image_id"] == image_id and row["object_id"] == object_id and row["decision"] == "added":
                return {"kind": "added", "mask": mask_codec.decode(row["mask"]), "class_name": row["class_name"] or UNLABELED}
        return None

    # Regions whose id Label Studio changed: matched to an exported object by a bit-identical mask.
    unmatched = {rid: oid for rid, oid in exported.items() if rid not in regions}
    for rid in [r for r in order if r not in exported]:
        for exported_rid, oid in list(unmatched.items()):
            known = original(oid)
            if known is not None and known["mask"] is not None and np.array_equal(known["mask"], regions[rid]["mask"]):
                regions[exported_rid] = regions.pop(rid)
                order[order.index(rid)] = exported_rid
                del unmatched[exported_rid]
                result.matched_by_mask += 1
                break

    rows = []
    for rid, object_id in sorted(exported.items(), key=lambda kv: kv[1]):
        known = original(object_id)
        if known is None:
            raise ReviewError(f"region {rid} stands for object {object_id}, which this run does not have")
        region = regions.get(rid)
        if region is None:
            rows.append({"object_id": object_id, "decision": "rejected", "ls_result_id": None})
            continue
        same = known["mask"] is not None and np.array_equal(known["mask"], region["mask"]) and known["class_name"] == region["class_name"]
        if known["kind"] == "added":
            rows.append({"object_id": object_id, "decision": "added", "ls_result_id": rid, **content(region)})
        elif same:
            rows.append({"object_id": object_id, "decision": "accepted", "ls_result_id": rid, "class_id": region["class_id"],
                         "class_name": None if region["class_name"] == UNLABELED else region["class_name"]})
        else:
            rows.append({"object_id": object_id, "decision": "corrected", "ls_result_id": rid, **content(region)})
    seen_added = set()
    for rid in order:
        if rid in exported:
            continue
        object_id = added_ids.get((image_id, rid))
        if object_id is None:
            object_id = next_id.get(image_id, 0)
            next_id[image_id] = object_id + 1
            added_ids[(image_id, rid)] = object_id
        seen_added.add(object_id)
        rows.append({"object_id": object_id, "decision": "added", "ls_result_id": rid, **content(regions[rid])})
    # Re-import of a task: regions it added before and that are gone now were deleted by the person.
    for object_id in sorted(added_from.get((image_id, meta.get("export_id")), set()) - seen_added):
        if object_id not in exported.values():
            rows.append({"object_id": object_id, "decision": "rejected", "ls_result_id": None})
    return rows


def _write(run: RunData, import_id: str, rows: list[dict], log_entry: dict) -> None:
    """The decisions, then the log; the Parquet under a dot-name first and renamed (readers skip dot-names)."""
    import io

    table = pa.Table.from_pylist([{k: r.get(k) for k in DECISION_SCHEMA.names} for r in rows], schema=DECISION_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    folder = f"{run.root}/review"
    run.fs.makedirs(folder, exist_ok=True)
    final = f"{folder}/{import_id}.parquet"
    if run.is_local:
        tmp = f"{folder}/.{import_id}.parquet.tmp"
        run.fs.pipe_file(tmp, buf.getvalue())
        run.fs.mv(tmp, final)
    else:  # object stores: one PUT is atomic
        run.fs.pipe_file(final, buf.getvalue())
    run.fs.makedirs(f"{folder}/{LOG_FOLDER}", exist_ok=True)
    run.fs.pipe_file(f"{folder}/{LOG_FOLDER}/{import_id}.json", (json.dumps(log_entry, indent=2) + "\n").encode())
    run.fs.invalidate_cache(folder)
    log.info("review: %d decisions -> %s", len(rows), run.url("review", f"{import_id}.parquet"))


__all__ = ["DECISIONS", "DECISION_SCHEMA", "ImportResult", "Review", "ReviewError", "import_review"]
