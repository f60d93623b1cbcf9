"""``autolabel report``: the HTML page in a real headless Chromium, its numbers against the Parquet,
filters, grouping, fsspec URLs, refusals, and the scale benchmark's code on a small synthetic run."""
from __future__ import annotations

import base64
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import REPO, autolabel_cli, counted_objects
from synthetic_run import write_synthetic_run

from pipeline.filters import ObjectFilter
from pipeline.report import ReportError, ReportOptions, report_after_run, write_report

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"


class Chromium:
    """Headless Chromium over the Chrome DevTools Protocol: one page, every event recorded."""

    def __init__(self, width: int = 1280, height: int = 900):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="autolabel-chromium-")
        self.proc = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        for _ in range(600):  # Chromium writes its port here once it listens
            if port_file.exists() and port_file.read_text().strip():
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=120, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(json.loads(self.ws.recv()))

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        height = self.call("Page.getLayoutMetrics")["cssContentSize"]["height"]
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
        path.write_bytes(base64.b64decode(shot["data"]))

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {p.get('args')}")
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(30)
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """A small synthetic run (real PNG files behind the URIs, error rows, three folders)."""
    root = tmp_path_factory.mktemp("synthetic")
    totals = write_synthetic_run(str(root / "run"), num_images=240, image_folder=root / "img", seed=1)
    return {
        "out": root / "run",
        "totals": totals,
        "images": pq.read_table(root / "run" / "images").to_pandas(),
        "objects": pq.read_table(root / "run" / "objects").to_pandas(),
    }


def _parquet_class_counts(objects: pd.DataFrame) -> dict[str, int]:
    return {k: int(v) for k, v in objects.groupby("class_name").size().items()}


_counted = counted_objects


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is installed by .ci/run")
def test_report_in_headless_chromium_shows_the_parquet_totals(labeled, tmp_path):
    images, objects = labeled["images"], _counted(labeled["objects"])
    out = tmp_path / "report"
    proc = subprocess.run([*autolabel_cli(), "report", str(labeled["out"]), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stdout
    page = Chromium()
    try:
        page.open((out / "report.html").as_uri())
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(ARTIFACTS / "report.png")
        assert page.problems() == []
        # Only the page itself and its inline data: pictures; nothing from any network.
        assert [u for u in page.requests() if not u.startswith("data:")] == [(out / "report.html").as_uri()]
        shown = page.js("Object.fromEntries([...document.querySelectorAll('[data-stat]')].map(e => [e.dataset.stat, e.textContent]))")
        assert int(shown["images"].replace(",", "")) == len(images)
        assert int(shown["ok"].replace(",", "")) == int((images["status"] == "ok").sum())
        assert int(shown["error"].replace(",", "")) == int((images["status"] == "error").sum())
        assert int(shown["objects"].replace(",", "")) == len(objects)
        per_class = page.js("Object.fromEntries([...document.querySelectorAll('td[data-class]')].map(e => [e.dataset.class, e.textContent]))")
        assert {k: int(v.replace(",", "")) for k, v in per_class.items()} == _parquet_class_counts(objects)
        pictures = page.js("[...document.images].map(i => [i.dataset.chart || (i.hasAttribute('data-gallery') ? 'gallery' : ''), i.complete && i.naturalWidth > 0])")
        charts = {name for name, ok in pictures if name != "gallery" and ok}
        assert charts == {"classes", "objects_per_image", "det_score", "mask_score", "area", "groups"}
        gallery = [ok for name, ok in pictures if name == "gallery"]
        assert len(gallery) == (images["status"] == "ok").sum() and all(gallery)  # 5 ok photos < 12
        assert all(ok for _, ok in pictures)
        text = page.js("document.body.innerText")
        assert labeled["manifest"]["models"]["sam"]["sha256"] in text  # models, config and timings are shown
        assert "image_size: 256" in text and "images/s" in text
    finally:
        page.close()


@pytest.mark.slow
def test_run_writes_its_report_automatically(labeled):
    report = labeled["out"] / "report"
    assert (report / "report.html").stat().st_size > 10_000
    summary = json.loads((report / "summary.json").read_text())
    objects = _counted(labeled["objects"])
    assert summary["totals"]["objects"] == len(objects) == labeled["manifest"]["totals"]["objects"]
    assert summary["totals"]["images"] == len(labeled["images"])
    assert summary["run_json_mismatch"] is None
    with open(report / "counts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["objects"]) for r in rows) == len(objects)


def test_summary_and_counts_csv_equal_the_parquet(synthetic, tmp_path):
    result = write_report(str(synthetic["out"]), str(tmp_path), ReportOptions(gallery=4))
    images, objects = synthetic["images"], synthetic["objects"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    t = summary["totals"]
    assert (t["images"], t["ok"], t["error"], t["objects"]) == (len(images), (images.status == "ok").sum(), (images.status == "error").sum(), len(objects))
    assert t["errors_by_class"] == images[images.status == "error"].groupby("error_class").size().to_dict()
    assert {c["class_name"]: c["count"] for c in t["objects_by_class"]} == _parquet_class_counts(objects)
    h = summary["histograms"]
    per_image = objects.groupby("image_id").size()
    ok = images[images.status == "ok"]
    expected_hist = ok["image_id"].map(per_image).fillna(0).astype(int).value_counts().sort_index()
    assert dict(zip(h["objects_per_image"]["values"], h["objects_per_image"]["images"])) == expected_hist.to_dict()
    for key in ("det_score", "mask_score", "area"):
        assert sum(h[key]["counts"]) == len(objects)
    folder = objects["uri"].str.rsplit("/", n=1).str[0]
    expected = objects.groupby([folder, "class_name"]).size().to_dict()
    with open(tmp_path / "counts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["folder"], r["class_name"]): int(r["objects"]) for r in rows} == expected
    assert {g["group"]: g["objects"] for g in summary["groups"]} == objects.groupby(folder).size().to_dict()
    assert len(summary["gallery"]) == 4
    assert all(g["drawn"] == g["n"] == per_image.get(g["image_id"], 0) for g in summary["gallery"])  # every mask drawn
    crowded = [g for g in summary["gallery"] if g["why"] == "most objects"]
    assert [g["n"] for g in crowded] == sorted(per_image, reverse=True)[: len(crowded)]
    assert result["paths"]["report.html"].startswith("file://")


def test_filters_change_every_number_and_say_so(synthetic, tmp_path):
    filt = ObjectFilter.parse(min_mask_score=0.6, min_area=20, classes="person,2")
    write_report(str(synthetic["out"]), str(tmp_path), ReportOptions(gallery=2, filter=filt))
    objects = synthetic["objects"]
    kept = objects[(objects.mask_score >= 0.6) & (objects.area >= 20) & objects.class_name.isin(["person", "car"])]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["totals"]["objects"] == len(kept) < len(objects)
    assert {c["class_name"]: c["count"] for c in summary["totals"]["objects_by_class"]} == _parquet_class_counts(kept)
    hist = summary["histograms"]["objects_per_image"]
    assert sum(v * n for v, n in zip(hist["values"], hist["images"])) == len(kept)
    assert sum(hist["images"]) == (synthetic["images"].status == "ok").sum()  # images left empty by the filter still count
    kept_per_image = kept.groupby("image_id").size()
    assert all(g["drawn"] == g["n"] == kept_per_image.get(g["image_id"], 0) for g in summary["gallery"])
    page = (tmp_path / "report.html").read_text()
    assert "Filtered: only objects with mask_score &gt;= 0.6; area &gt;= 20 px; classes 2, person" in page


def test_group_by_an_images_column(synthetic, tmp_path):
    write_report(str(synthetic["out"]), str(tmp_path), ReportOptions(group_by="shard_id", gallery=0))
    images, objects = synthetic["images"], synthetic["objects"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    shard_of = images.set_index("image_id")["shard_id"]
    expected = objects.groupby(objects["image_id"].map(shard_of)).size().to_dict()
    assert {g["group"]: g["objects"] for g in summary["groups"]} == expected
    assert {g["group"]: g["images"] for g in summary["groups"]} == images.groupby("shard_id").size().to_dict()
    with pytest.raises(ReportError, match="--group-by site: no such images column; use one of folder, image_id"):
        write_report(str(synthetic["out"]), str(tmp_path / "x"), ReportOptions(group_by="site"))


def test_report_reads_and_writes_fsspec_urls(synthetic, tmp_path):
    src = "memory://report-test/run"
    write_synthetic_run(src, num_images=30, image_folder=tmp_path / "img", seed=3)
    result = write_report(src, "memory://report-test/out", ReportOptions(gallery=2))
    fs = fsspec.filesystem("memory")
    assert fsspec.core.url_to_fs(result["paths"]["report.html"])[1] == "/report-test/out/report.html"
    page = fs.cat_file("/report-test/out/report.html").decode()
    summary = json.loads(fs.cat_file("/report-test/out/summary.json"))
    objects = pd.read_parquet("memory://report-test/run/objects")
    assert summary["totals"]["objects"] == len(objects)
    assert page.count("data-gallery") == 2


def test_report_refusals_exit_2_with_a_message(tmp_path, synthetic):
    cli = autolabel_cli()
    proc = subprocess.run([*cli, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{tmp_path}: no run.json here; RUN_DIR must be the output.uri of an `autolabel run`" in proc.stderr
    proc = subprocess.run([*cli, "report", str(synthetic["out"]), "--out", str(tmp_path / "r"), "--classes", "giraffe"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--classes: giraffe not in this run's classes (0=person, 1=bicycle" in proc.stderr
    proc = subprocess.run([*cli, "report", str(synthetic["out"]), "--min-mask-score", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--min-mask-score must be between 0 and 1" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_report_after_run_never_raises(tmp_path):
    import logging

    from pipeline.config import load_config

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("autolabel.report")
    logger.addHandler(handler)
    try:
        cfg = load_config(None, [f"output.uri={tmp_path}"])
        assert report_after_run(cfg, str(tmp_path)) is None  # not a run: the warning, not an exception
    finally:
        logger.removeHandler(handler)
    assert any("report: not written (RunError" in r.getMessage() for r in records)


def test_scale_benchmark_code_on_a_small_synthetic_run(tmp_path):
    """The benchmark (benchmarks/report_scale.py) run small: same code, numbers come out, memory is measured."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report_scale
    finally:
        sys.path.pop(0)
    result = report_scale.benchmark(tmp_path, num_images=400, mean_objects=6.0)
    assert result["objects"] == result["summary_objects"] > 1000
    assert result["peak_rss_mib"] > 0 and result["report_s"] > 0
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "image not readable now" in page  # synthetic URIs have no files: masks on a blank canvas
