"""``autolabel report RUN``: one self-contained HTML page (plus counts.csv, summary.json) about a run.

Every number comes from the shard summaries the commits wrote (summaries.py), merged, so a run with
a billion objects reports in seconds; shards without one (runs made before them, shards a review
touched, a filtered report) are scanned by duckdb column by column with a memory limit, with the
same queries. Only the gallery images' masks are ever decoded. Charts are matplotlib (Agg) SVGs and
gallery pictures JPEGs, both inlined as data: URIs, so the page opens from disk with no network,
no scripts and no external fonts (a Content-Security-Policy forbids anything else).

The parts: summaries.py (one shard's numbers), stats.py (the numbers merged), charts.py, gallery.py
(the pictures), video.py (the videos section: runs with videos only) and html.py (the page);
here the driver that puts them together and writes the files.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Optional

from pipeline.io.credentials import redact
from pipeline.outputs.filters import FilterError
from pipeline.outputs.report.charts import (METRIC_TITLES, STYLE, chart_classes, chart_counts, chart_flagged_classes, chart_groups,
                                            chart_hist, chart_objects_per_image, chart_reasons)
from pipeline.outputs.report.gallery import draw_flagged, render_gallery_image
from pipeline.outputs.report.html import UNREADABLE_HINT, render_html
from pipeline.outputs.report.stats import FOLDER, ReportError, ReportOptions, RunStats
from pipeline.outputs.report.video import video_report
from pipeline.outputs.rundata import RunData, RunError

log = logging.getLogger("autolabel.report")


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
    options.filter.check_classes({**run.class_names(), **stats.known_classes()})
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
        "classes": run.class_definition(),
        "totals": totals,
        "histograms": histograms,
        "groups": [{**g, "by_class": [{"class_name": k, **v} for k, v in g["by_class"].items()]} for g in groups],
        "num_groups": num_groups,
        # Review decisions change the objects on purpose: then run.json's totals are the run's, not the reviewed ones.
        "run_json_mismatch": None if options.filter.active or stats.review else _compare_with_manifest(totals, run.manifest),
        "quality": stats.quality(),
        "review": {"imported": bool(stats.review), **stats.review.counts(), "imports": stats.review.logs},
        # Shards counted from their summaries, and scanned (no summary, touched by a review, a filter): see stats.py.
        "shards": {"from_summaries": len(stats.summarized), "scanned": len(stats.scanned)},
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
    with matplotlib.rc_context(STYLE):
        videos = video_report(run, stats, image_storage_options)  # None: no videos in the run (report/video.py)
    summary["videos"] = None if videos is None else videos.summary
    page = render_html(summary, groups, charts, picks, stats.errors_sample(), run, flagged, videos)
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


__all__ = ["report_after_run", "ReportError", "ReportOptions", "write_report", "build_report", "FilterError", "RunError", "FOLDER",
           "UNREADABLE_HINT"]
