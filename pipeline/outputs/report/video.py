"""The report's video section (runs with ``RUN/videos/``; a run without videos reports as before):
unique objects per video and class, the counting line's crossings, a chart of the tracks alive over
each video's time, and a few frames with their masks and track ids.

Everything comes from the small tables (``videos``: a row per video, ``tracks``: a row per track,
read for the charted videos only); only the drawn frames' objects are read, from the part that
holds them, and their pixels decoded (frames are drawn from a video's first ``FRAME_SCAN_LIMIT``
decoded frames, so a report never decodes a long video to its end).
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.io.credentials import redact
from pipeline.outputs.colors import class_color
from pipeline.outputs.report.charts import _svg, figure
from pipeline.outputs.rundata import RunData

VIDEOS_LISTED = 40  # rows of the per-video table (summary.json lists as many)
VIDEOS_CHARTED = 4  # tracks-over-time charts, for the videos with the most tracks
VIDEOS_DRAWN = 2  # videos whose frames are drawn
FRAMES_PER_VIDEO = 3
FRAME_SCAN_LIMIT = 1500  # frames are picked among a video's first decoded frames only
CLASSES_CHARTED = 6
FRAME_MAX_SIDE = 480


@dataclass
class VideoReport:
    summary: dict
    charts: dict = field(default_factory=dict)  # video uri -> SVG data URI
    frames: list = field(default_factory=list)  # drawn frames: uri, video_uri, frame_index, time_s, src, tracks, note


def _merge_counts(lists) -> list[dict]:
    """Sum class count lists (``class_counts``, ``line_in``, ...) over videos, most first."""
    total: Counter = Counter()
    for counts in lists:
        for c in counts or []:
            total[(c["class_id"], c["class_name"])] += c["count"]
    return [{"class_id": k[0], "class_name": k[1], "count": n}
            for k, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0][1] or ""))]


def video_report(run: RunData, stats, image_storage_options: Optional[dict] = None) -> Optional[VideoReport]:
    """The section's numbers, charts and frames; None for a run without videos."""
    table = run.table_of("videos")
    if table is None:
        return None
    rows = sorted(table.to_pylist(), key=lambda r: (-(r.get("num_tracks") or 0), r["uri"]))
    video_cfg = (run.manifest.get("config") or {}).get("video") or {}
    min_frames = int(video_cfg.get("min_track_frames") or 1)
    has_line = "line_in" in table.column_names and any(r.get("line_in") is not None for r in rows)
    errors = Counter(r["error_class"] for r in rows if r["status"] != "ok")
    keys = ("uri", "status", "error_class", "width", "height", "fps", "frames", "frames_processed", "duration_s", "num_tracks",
            "class_counts", *(("line_in", "line_out") if has_line else ()))
    summary = {
        "videos": len(rows), "ok": sum(r["status"] == "ok" for r in rows), "error": sum(r["status"] != "ok" for r in rows),
        "errors_by_class": dict(errors.most_common()), "frames": sum(r.get("frames_processed") or 0 for r in rows),
        "tracks": sum(r.get("num_tracks") or 0 for r in rows), "min_track_frames": min_frames,
        "unique_by_class": _merge_counts(r.get("class_counts") for r in rows),
        "count_line": video_cfg.get("count_line"),
        "line_in": _merge_counts(r.get("line_in") for r in rows) if has_line else None,
        "line_out": _merge_counts(r.get("line_out") for r in rows) if has_line else None,
        "listed": [{k: r.get(k) for k in keys} for r in rows[:VIDEOS_LISTED]],
        # The numbers are the videos table's, as committed: filters and review decisions change the frames drawn only.
        "as_committed": bool(stats.options.filter.active or stats.review),
    }
    report = VideoReport(summary)
    charted = [r for r in rows if r["status"] == "ok" and r.get("num_tracks")][:VIDEOS_CHARTED]
    if charted:
        import pyarrow.compute as pc

        tracks = run.table_of("tracks", columns=["video_uri", "track_id", "class_id", "class_name", "first_frame", "last_frame", "num_frames"],
                              filter=pc.field("video_uri").isin([r["uri"] for r in charted]))
        by_video: dict[str, list] = {}
        for t in ([] if tracks is None else tracks.to_pylist()):
            if t["first_frame"] is not None and (t["num_frames"] or 0) >= min_frames:
                by_video.setdefault(t["video_uri"], []).append(t)
        for r in charted:
            report.charts[r["uri"]] = chart_tracks_over_time(r, by_video.get(r["uri"], []))
    for r in [r for r in rows if r["status"] == "ok" and r.get("num_tracks")][:VIDEOS_DRAWN]:
        report.frames += draw_frames(run, stats, r, image_storage_options)
    summary["frames_drawn"] = [{k: f[k] for k in ("uri", "video_uri", "frame_index", "tracks")} | {"problem": f["note"]}
                               for f in report.frames]
    return report


def alive_per_frame(tracks: list[dict], frames: int) -> np.ndarray:
    """Tracks alive on each decoded frame 0..frames-1 (from their first to their last frame)."""
    delta = np.zeros(frames + 1, np.int64)
    for t in tracks:
        first, last = int(t["first_frame"]), min(int(t["last_frame"]), frames - 1)
        if first <= last:
            delta[first] += 1
            delta[last + 1] -= 1
    return np.cumsum(delta)[:frames]


def chart_tracks_over_time(video: dict, tracks: list[dict]) -> Optional[str]:
    """Counted tracks alive over the video's time, per class (the most common ones) and in all."""
    if not tracks:
        return None
    frames = int(max(video.get("frames") or 0, max(int(t["last_frame"]) for t in tracks) + 1))
    fps = video.get("fps")
    x = np.arange(frames) / fps if fps else np.arange(frames)
    fig, ax = figure(6.4, 2.6)
    classes = Counter((t["class_id"], t["class_name"]) for t in tracks)
    for (cid, name), _ in classes.most_common(CLASSES_CHARTED):
        ax.step(x, alive_per_frame([t for t in tracks if (t["class_id"], t["class_name"]) == (cid, name)], frames), where="post",
                color=class_color(cid), label=str(name), linewidth=1.2)
    ax.step(x, alive_per_frame(tracks, frames), where="post", color="#1d2430", label="all", linewidth=1.6, linestyle="--")
    name = video["uri"].rstrip("/").rsplit("/", 1)[-1]
    ax.set_title(f"Tracks alive over time: {name}", loc="left")
    ax.set_xlabel("seconds" if fps else "frame")
    ax.set_ylabel("tracks")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def _frame_rows(run: RunData, video: dict) -> list[dict]:
    """The video's frames rows with objects, among its first FRAME_SCAN_LIMIT decoded frames, with
    the shard of the part that holds each (from its own shard's part when that is there)."""
    import pyarrow.compute as pc

    wanted = ((pc.field("video_uri") == video["uri"]) & (pc.field("frame_index") < FRAME_SCAN_LIMIT)
              & (pc.field("status") == "ok") & (pc.field("num_objects") > 0))
    own = [p for p in run.image_files if p.rsplit("/", 1)[-1] == f"shard-{video.get('shard_id')}.parquet"]
    out = []
    for paths in ([own] if own else []) + [run.image_files]:
        scan = run.dataset_of("images", paths).scanner(columns=["image_id", "uri", "width", "height", "frame_index", "time_s"], filter=wanted)
        for batch in scan.scan_batches():
            shard = batch.fragment.path.rsplit("/", 1)[-1].removesuffix(".parquet")
            out += [{**r, "shard": shard} for r in batch.record_batch.to_pylist()]
        if out:
            break
    return sorted(out, key=lambda r: r["frame_index"])


def draw_frames(run: RunData, stats, video: dict, image_storage_options: Optional[dict]) -> list[dict]:
    """A few frames of one video (evenly spread over the frames with objects) with masks and track ids."""
    rows = _frame_rows(run, video)
    if not rows:
        return []
    picks = [rows[i] for i in sorted({round(k * (len(rows) - 1) / max(FRAMES_PER_VIDEO - 1, 1)) for k in range(FRAMES_PER_VIDEO)})]
    for p in picks:
        stats.part_of[p["image_id"]] = p["shard"]
    objects = stats.objects_of([p["image_id"] for p in picks])
    pixels, note = {}, None
    try:
        from pipeline.io.video import iter_frames

        wanted = {p["frame_index"] for p in picks}
        for frame in iter_frames(video["uri"], start=min(wanted), stop=max(wanted) + 1, storage_options=image_storage_options):
            if frame.index in wanted:
                pixels[frame.index] = frame.rgb
    except Exception as exc:  # noqa: BLE001 - a video gone or unreadable now: the masks on a blank canvas, and why
        note = f"video not readable now ({redact(f'{type(exc).__name__}: {exc}', image_storage_options)}): drawn on a blank canvas"
    out = []
    for p in picks:
        objs = objects.get(p["image_id"], [])
        rgb = pixels.get(p["frame_index"])
        if rgb is not None and rgb.shape[:2] != (p["height"], p["width"]):
            rgb, note = None, f"the video's frames are now {rgb.shape[1]}x{rgb.shape[0]}, the run saw {p['width']}x{p['height']}"
        out.append({"uri": p["uri"], "video_uri": video["uri"], "frame_index": p["frame_index"], "time_s": p["time_s"],
                    "tracks": sorted(int(o["track_id"]) for o in objs if o.get("track_id") is not None),
                    "note": note if rgb is None else None, "src": render_frame(rgb, objs, int(p["height"]), int(p["width"]))})
    return out


def render_frame(rgb: Optional[np.ndarray], objects: list[dict], h: int, w: int) -> str:
    """JPEG data URI: the frame with each mask tinted in its track's colour and labelled ``#id class``."""
    from PIL import Image

    from pipeline.sam import masks as mask_codec

    scale = FRAME_MAX_SIDE / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    base = np.full((h, w, 3), 235, np.uint8) if rgb is None else rgb
    canvas = np.asarray(Image.fromarray(base).resize((sw, sh), Image.BILINEAR if scale < 1 else Image.NEAREST), dtype=np.float32) / 255.0
    for obj in objects:
        mask = np.asarray(Image.fromarray(mask_codec.decode(obj["mask"]).astype(np.uint8) * 255).resize((sw, sh), Image.NEAREST)) > 127
        canvas[mask] = canvas[mask] * 0.45 + np.array(track_color(obj.get("track_id"))) * 0.55
    fig, ax = figure(sw / 100, sh / 100)
    fig.subplots_adjust(0, 0, 1, 1)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for obj in objects:
        x0, y0 = obj["box"][0] * scale, obj["box"][1] * scale
        label = f"#{obj['track_id']} {obj['class_name']}" if obj.get("track_id") is not None else str(obj["class_name"])
        ax.text(x0 + 1, y0 + 1, label, fontsize=8, color="white", va="top", ha="left", clip_on=True,
                bbox=dict(facecolor=track_color(obj.get("track_id")), edgecolor="none", pad=1.0, alpha=0.9))
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=100, pil_kwargs={"quality": 85})
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def track_color(track_id: Optional[int]) -> tuple[float, float, float]:
    """A colour per track (tab10, so neighbouring ids differ), grey without one."""
    if track_id is None:
        return (0.55, 0.55, 0.55)
    from matplotlib import colormaps

    return tuple(colormaps["tab10"](int(track_id) % 10)[:3])


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _counts(counts, empty: str = "–") -> str:
    return ", ".join(f"{_e(c['class_name'])} {c['count']:,}" for c in counts or []) or empty


def video_section(report: Optional[VideoReport]) -> str:
    """The page's Videos section ("" without videos)."""
    if report is None:
        return ""
    s = report.summary
    has_line = s["line_in"] is not None
    unique_rows = "".join(
        f"<tr><td>{_e(c['class_name'])}</td><td class='n' data-video-class='{_e(c['class_name'])}'>{c['count']:,}</td>"
        + (f"<td class='n'>{_line_count(s['line_in'], c)}</td><td class='n'>{_line_count(s['line_out'], c)}</td>" if has_line else "")
        + "</tr>" for c in s["unique_by_class"])
    line_head = "<th class='n'>crossed in</th><th class='n'>crossed out</th>" if has_line else ""
    video_rows = "".join(
        f"<tr data-video='{_e(v['uri'])}'><td>{_e(v['uri'])}</td><td>{_e(v['status'] if v['status'] == 'ok' else v['error_class'])}</td>"
        f"<td class='n'>{_e(v.get('frames_processed'))}</td><td class='n'>{_seconds(v.get('duration_s'))}</td>"
        f"<td class='n'>{_e(v.get('num_tracks'))}</td><td>{_counts(v.get('class_counts'))}</td>"
        + (f"<td>{_counts(v.get('line_in'), '0')}</td><td>{_counts(v.get('line_out'), '0')}</td>" if has_line else "") + "</tr>"
        for v in s["listed"])
    more = f"<p class='muted'>{s['videos'] - len(s['listed']):,} more videos in summary.json's totals.</p>" if s["videos"] > len(s["listed"]) else ""
    charts = "".join(f'<img src="{src}" alt="Tracks alive over time: {_e(uri)}" data-chart="tracks-over-time" data-video="{_e(uri)}">'
                     for uri, src in report.charts.items() if src)
    figures = "".join(
        f"<figure data-video-frame='{_e(f['uri'])}'{' class=unreadable data-unreadable' if f['note'] else ''}>"
        f"<img src='{f['src']}' alt='{_e(f['uri'])}'><figcaption>frame {f['frame_index']}"
        + (f" · {f['time_s']:.2f} s" if f.get("time_s") is not None else "")
        + f" · tracks {', '.join('#' + str(t) for t in f['tracks']) or '–'}<br>{_e(f['video_uri'])}"
        + (f"<br><span class='problem'>{_e(f['note'])}</span>" if f["note"] else "") + "</figcaption></figure>"
        for f in report.frames)
    line = (f"<p>Counting line <code>{_e(s['count_line'])}</code>: a counted track crosses it at most once; across a line more vertical "
            "than horizontal, moving right is <i>in</i>, otherwise moving down is <i>in</i>.</p>") if has_line else ""
    return f"""<section id="videos"><h2>Videos</h2>
<div class="cards">
<div class="card"><div class="v" data-stat="videos">{s['videos']:,}</div><div class="k">videos</div></div>
<div class="card"><div class="v" data-stat="video_errors">{s['error']:,}</div><div class="k">unreadable</div></div>
<div class="card"><div class="v" data-stat="video_frames">{s['frames']:,}</div><div class="k">frames tracked</div></div>
<div class="card"><div class="v" data-stat="tracks">{s['tracks']:,}</div><div class="k">tracks</div></div>
<div class="card"><div class="v" data-stat="unique_objects">{sum(c['count'] for c in s['unique_by_class']):,}</div><div class="k">unique objects</div></div>
</div>
<p class="muted">Unique objects: tracks with at least {s['min_track_frames']} frames (<code>video.min_track_frames</code>), each counted once
however many frames it spans.{' These numbers are the run&#x27;s as committed: the filters and review decisions apply to the frames drawn only.' if s['as_committed'] else ''}</p>{line}
<div class="scroll"><table id="video-classes"><tr><th>class</th><th class="n">unique objects</th>{line_head}</tr>{unique_rows}</table></div>
<h3>Per video</h3>
<div class="scroll"><table id="video-list"><tr><th>video</th><th>status</th><th class="n">frames</th><th class="n">duration</th><th class="n">tracks</th><th>unique objects</th>{'<th>crossed in</th><th>crossed out</th>' if has_line else ''}</tr>{video_rows}</table></div>{more}
<h3>Tracks over time</h3><div class="charts">{charts or '<p class="muted">No counted tracks to chart.</p>'}</div>
<h3>Frames</h3>{f"<div class='gallery'>{figures}</div><p class='muted'>Each mask in its track's colour, labelled with its track id and class.</p>" if figures else "<p class='muted'>No frames with objects to show.</p>"}
</section>"""


def _seconds(value) -> str:
    return "" if value is None else f"{value:.1f} s"


def _line_count(counts, c) -> str:
    return f"{sum(x['count'] for x in counts or [] if (x['class_id'], x['class_name']) == (c['class_id'], c['class_name'])):,}"
