"""The report page: one self-contained HTML document from the summary, charts and pictures:
inline CSS and data: URIs only, under a Content-Security-Policy that forbids anything else, so it
opens from disk with no network, no scripts and no external fonts.
"""
from __future__ import annotations

import html
from typing import Optional

import numpy as np
import yaml

from pipeline.outputs.colors import class_color
from pipeline.outputs.report.charts import REASON_COLORS, TOP_GROUPS_SHOWN
from pipeline.outputs.report.gallery import LABELS_PER_IMAGE
from pipeline.outputs.report.stats import FOLDER
from pipeline.outputs.report.video import video_section
from pipeline.outputs.rundata import RunData

UNREADABLE_HINT = (
    "If the images need credentials or an endpoint (the run's input.storage_options; run.json keeps only their names), "
    "pass them to `autolabel report` with --image-storage-option key=value (repeatable), e.g. "
    "--image-storage-option endpoint_url=... --image-storage-option key=... --image-storage-option secret=..."
)


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb)


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
                flagged: list[dict] = (), videos=None) -> str:
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
{_classes_defined(summary["classes"])}
<div class="charts">{_img(charts['classes'], 'Objects per class', 'classes')}</div>
<div class="scroll"><table><tr><th>class</th><th class="n">id</th><th class="n">objects</th><th class="n">share</th></tr>{class_rows}</table></div>
</section>
<section id="distributions"><h2>Distributions</h2><div class="charts">{hist}</div>
{('<p class="muted">Mask area (pixels; quantiles to within about 1 %): ' + ', '.join(f'{k} {v:,.0f}' for k, v in summary['histograms']['area']['quantiles'].items()) + '</p>') if summary['histograms']['area'].get('quantiles') else ''}
</section>
{video_section(videos)}
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


def _classes_defined(c: dict) -> str:
    """How the classes were defined (text, examples, a file, the detector's own, ...), and which."""
    shown = ", ".join(c["names"][:40]) + (f" and {len(c['names']) - 40} more" if len(c["names"]) > 40 else "")
    emb = c.get("embeddings") or {}
    made = f" Embeddings for {_e(emb.get('model'))}, kept in the run as {_e(emb.get('file'))}." if emb else ""
    names = f": {_e(shown)}" if c["names"] and c["defined_by"] not in ("closed-set", "automatic") else ""
    return (f"<p id='classes-defined' data-defined-by='{_e(c['defined_by'])}'>Classes: {_e(c['description'])}{names}.{made}</p>")


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
