"""``autolabel report``: the HTML page in a real headless Chromium, its numbers against the Parquet,
filters, grouping, fsspec URLs, refusals, and the scale benchmark's code on a small synthetic run."""
from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import REPO, autolabel_cli, counted_objects
from synthetic_run import write_synthetic_run

from pipeline.outputs.filters import ObjectFilter
from pipeline.outputs.report import ReportError, ReportOptions, report_after_run, write_report

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
        pictures = page.js("[...document.images].map(i => [i.dataset.chart || (i.hasAttribute('data-gallery') ? 'gallery' : "
                           "i.hasAttribute('data-flagged-gallery') ? 'flagged' : ''), i.complete && i.naturalWidth > 0])")
        charts = {name for name, ok in pictures if name not in ("gallery", "flagged") and ok}
        base = {"classes", "objects_per_image", "det_score", "mask_score", "area", "groups"}
        quality = {"flagged_reasons", "flagged_classes", "stability", "box_iou", "outside_box", "regions", "largest_region", "hole_area"}
        assert base <= charts and charts - base <= quality  # the Quality section's charts: those its data has
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


# --------------------------------------------------------------- images behind credentials (real S3 server)


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory) -> dict:
    """moto's S3 server on loopback with IAM authentication on: only the key and secret of an IAM user
    it issued may read or write. Bucket ``photos`` holds a synthetic run's images, ``runs/r1`` the run."""
    import boto3
    import requests
    import s3fs

    from moto_server import start_moto

    root = tmp_path_factory.mktemp("private-s3")
    server = start_moto(root)
    endpoint = server.endpoint
    try:
        setup = dict(endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="labeler")
        key = iam.create_access_key(UserName="labeler")["AccessKey"]
        iam.put_user_policy(UserName="labeler", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        client = boto3.client("s3", **setup)
        client.create_bucket(Bucket="photos")
        client.create_bucket(Bucket="runs")
        # From here on every request must be signed with the labeler's key (moto's IAM check).
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=30).raise_for_status()
        options = {"endpoint_url": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        fs = s3fs.S3FileSystem(**options)
        images = root / "img"
        totals = write_synthetic_run("s3://runs/r1", num_images=4, mean_objects=2.0, error_every=0, image_folder=images,
                                     image_uri_base="s3://photos/synth", seed=11, storage_options=options)
        for path in images.rglob("*.png"):
            fs.put_file(str(path), f"photos/synth/{path.relative_to(images).as_posix()}")
        with pytest.raises(PermissionError):  # the bucket really needs the credentials
            s3fs.S3FileSystem(endpoint_url=endpoint, anon=True, skip_instance_cache=True).cat_file("photos/synth/site-a/img_000000.png")
        # The CLI's environment has no AWS credentials of its own (and asks no metadata service).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(root / "none"), AWS_CONFIG_FILE=str(root / "none"))
        yield {"endpoint": endpoint, "options": options, "fs": fs, "images": images, "totals": totals, "env": env,
               "secrets": (options["key"], options["secret"])}
    finally:
        server.stop()


def _flags(flag: str, options: dict) -> list[str]:
    return [item for k, v in options.items() for item in (flag, f"{k}={v}")]


def _local_image(private_s3: dict, uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(private_s3["images"] / uri.removeprefix("s3://photos/synth/")).convert("RGB"))


def _gallery_differences(page: str, private_s3: dict, objects: pd.DataFrame, uri_of: dict[str, str]) -> dict[str, float]:
    """Per gallery picture: median |gallery - the real image| over pixels no mask covers (0-255).
    The real pixels give a few grey levels of JPEG noise; a blank canvas (235) gives far more."""
    import io
    import re

    from PIL import Image

    from pipeline.sam import masks as mask_codec

    found = re.findall(r"<figure data-image-id='([0-9a-f]+)'[^>]*><img src='data:image/jpeg;base64,([^']+)'", page)
    out = {}
    for image_id, data in found:
        drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(np.int16)
        rows = objects[objects["image_id"] == image_id]
        real = _local_image(private_s3, uri_of[image_id])
        h, w = drawn.shape[:2]
        covered = np.zeros(real.shape[:2], bool)
        for row in rows.itertuples():
            covered |= mask_codec.decode(row.mask)
        expected = np.asarray(Image.fromarray(real).resize((w, h), Image.NEAREST)).astype(np.int16)
        free = ~(np.asarray(Image.fromarray(covered.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0)
        out[uri_of[image_id]] = float(np.median(np.abs(drawn - expected).max(-1)[free]))
    return out


def test_report_and_exports_reread_private_images_with_image_storage_options(private_s3, tmp_path):
    """Images and run folder in a bucket that needs credentials. Without --image-storage-option the
    report fails loudly (exit 1, the images named, the page says so) instead of drawing blank canvases
    as it did; with it, the gallery and the exports have the real pixels. No credential is echoed."""
    import s3fs
    from PIL import Image

    from pipeline.sam import masks as mask_codec

    fs: s3fs.S3FileSystem = private_s3["fs"]
    run_flags = _flags("--storage-option", private_s3["options"])
    image_flags = _flags("--image-storage-option", private_s3["options"])
    outputs = []

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*autolabel_cli(), *args], capture_output=True, text=True, timeout=180, env=private_s3["env"], cwd=tmp_path)
        outputs.append(proc.stdout + proc.stderr)
        return proc

    objects = _counted(pd.read_parquet("s3://runs/r1/objects", storage_options=private_s3["options"]))
    images = pd.read_parquet("s3://runs/r1/images", storage_options=private_s3["options"])
    uris = sorted(images.loc[images["status"] == "ok", "uri"])
    uri_of = dict(zip(images["image_id"], images["uri"]))

    # 1. Only the run folder's options: the report is written, says what is wrong, and exits 1.
    proc = cli("report", "s3://runs/r1", *run_flags, "--out", str(tmp_path / "blank"))
    assert proc.returncode == 1, proc.stderr
    assert f"{len(uris)} of {len(uris)} gallery images could not be read" in proc.stderr
    for uri in uris:
        assert f"{uri}: image not readable now (read_error: NoCredentialsError" in proc.stderr
    assert "--image-storage-option key=value" in proc.stderr and "Traceback" not in proc.stderr
    page = (tmp_path / "blank" / "report.html").read_text()
    assert 'id="gallery-unreadable"' in page and f"{len(uris)} of {len(uris)} gallery images could not be drawn" in page
    assert page.count("data-unreadable") == len(uris)
    summary = json.loads((tmp_path / "blank" / "summary.json").read_text())
    assert sorted(u["uri"] for u in summary["gallery_unreadable"]) == uris
    assert min(_gallery_differences(page, private_s3, objects, uri_of).values()) > 60  # blank canvases

    # 2. With the images' options: the real pixels, exit 0; the report goes to the run folder on S3.
    proc = cli("report", "s3://runs/r1", *run_flags, *image_flags)
    assert proc.returncode == 0, proc.stderr
    fs.invalidate_cache()
    page = fs.cat_file("runs/r1/report/report.html").decode()
    assert "gallery-unreadable" not in page and "data-unreadable" not in page
    differences = _gallery_differences(page, private_s3, objects, uri_of)
    assert sorted(differences) == uris and max(differences.values()) < 12, differences

    # 3. Exports that re-read the images: cutouts (local --out) and YOLO (onto S3).
    proc = cli("export", "s3://runs/r1", "--format", "cutouts", "--out", str(tmp_path / "cut"), "--quiet")
    assert proc.returncode == 2 and "cannot read run.json (NoCredentialsError" in proc.stderr and "--storage-option" in proc.stderr
    proc = cli("export", "s3://runs/r1", "--format", "cutouts", "--out", str(tmp_path / "cut"), "--quiet", *run_flags)
    assert proc.returncode == 1 and "images FAILED" in proc.stdout and "NoCredentialsError" in proc.stdout  # named, no traceback
    assert "Traceback" not in proc.stderr and "--image-storage-option" in proc.stdout
    assert not (tmp_path / "cut").exists() or not any((tmp_path / "cut").glob("*/*.png"))
    shutil.rmtree(tmp_path / "cut", ignore_errors=True)
    proc = cli("export", "s3://runs/r1", "--format", "cutouts", "--out", str(tmp_path / "cut"), "--quiet", *run_flags, *image_flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "cut" / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == len(objects) > 0
    by_key = {(r.image_id, r.object_id): r for r in objects.itertuples()}
    for entry in index:
        row = by_key[(entry["image_id"], int(entry["object_id"]))]
        mask = mask_codec.decode(row.mask)
        ys, xs = np.nonzero(mask)
        crop = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        cut = np.asarray(Image.open(tmp_path / "cut" / entry["path"]))
        assert np.array_equal(cut[..., :3][mask[crop]], _local_image(private_s3, row.uri)[crop][mask[crop]])
    proc = cli("export", "s3://runs/r1", "--format", "yolo", "--out", "s3://runs/r1-yolo", "--quiet", *run_flags, *image_flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fs.invalidate_cache()
    for uri in uris:
        image_id = images.set_index("uri").loc[uri, "image_id"]
        stem = uri.rsplit("/", 1)[1].removesuffix(".png")
        assert fs.cat_file(f"runs/r1-yolo/images/train/{stem}-{image_id}.png") == (private_s3["images"] / uri.removeprefix("s3://photos/synth/")).read_bytes()

    # Nothing written or printed holds a credential.
    fs.invalidate_cache()
    written = [(p, fs.cat_file(p)) for p in fs.find("runs")] + [(str(p), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.endswith(".autolabel-export.json") for p, _ in written)
    for secret in private_s3["secrets"]:
        assert all(secret not in text for text in outputs), "a credential was printed"
        for path, data in written:
            assert secret.encode() not in data, f"a credential was written to {path}"


def test_report_after_run_rereads_images_with_the_runs_input_storage_options(private_s3):
    """The automatic report at the end of `autolabel run` gets the run's own input/output storage options."""
    from pipeline.config import load_config

    options = json.dumps(private_s3["options"])
    cfg = load_config(None, ["output.uri=s3://runs/r1", f"input.storage_options={options}", f"output.storage_options={options}",
                             "report.gallery=2"])
    assert report_after_run(cfg, "s3://runs/r1") == "s3://runs/r1/report/report.html"
    fs = private_s3["fs"]
    fs.invalidate_cache()
    page = fs.cat_file("runs/r1/report/report.html").decode()
    objects = _counted(pd.read_parquet("s3://runs/r1/objects", storage_options=private_s3["options"]))
    images = pd.read_parquet("s3://runs/r1/images", storage_options=private_s3["options"])
    differences = _gallery_differences(page, private_s3, objects, dict(zip(images["image_id"], images["uri"])))
    assert len(differences) == 2 and max(differences.values()) < 12, differences  # the real pixels, not blank canvases
    assert "gallery-unreadable" not in page


def test_storage_option_mistakes_are_refused_without_echoing_values(synthetic, tmp_path, capsys):
    """A malformed --storage-option (a bare secret, a repeated key) or a stray key=value word exits 2
    and never prints the value."""
    from pipeline.cli import main

    secret = "s3cr3t-VALUE-never-shown"
    for argv in (["--storage-option", secret], ["--image-storage-option", f"secret={secret}", "--image-storage-option", f"secret={secret}x"]):
        assert main(["report", str(synthetic["out"]), "--out", str(tmp_path / "r"), *argv]) == 2
        err = capsys.readouterr().err
        assert "--storage-option number 1 is not key=value" in err or "--image-storage-option secret is given twice" in err
        assert secret not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(synthetic["out"]), "--format", "coco", f"secret={secret}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized arguments: secret=..." in err and secret not in err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------- quality control (issue 13)


@pytest.fixture(scope="module")
def qa_reviewed(tmp_path_factory) -> dict:
    """A synthetic run with the QA columns, and one review imported into it: the first task of the
    flagged objects' Label Studio export accepted as it is, one region of the second deleted."""
    from pipeline.outputs.export import export
    from pipeline.outputs.review import import_review

    root = tmp_path_factory.mktemp("qa-report")
    run = root / "run"
    write_synthetic_run(str(run), num_images=24, mean_objects=4.0, image_folder=root / "img", seed=31, qa=True)
    export(str(run), "labelstudio", str(root / "ls"), filt=ObjectFilter.parse(flagged=True), progress=False)
    tasks = json.loads((root / "ls" / "tasks.json").read_text())
    reviewed = []
    for n, task in enumerate(tasks[:2]):
        regions = task["predictions"][0]["result"][n:]  # the second task loses its first region
        reviewed.append({"id": n + 1, "data": task["data"], "predictions": [n + 1],
                         "annotations": [{"id": n + 1, "result": regions, "was_cancelled": False, "completed_by": 1}]})
    (root / "reviewed.json").write_text(json.dumps(reviewed))
    result = import_review(str(run), str(root / "reviewed.json"))
    assert result.decisions["rejected"] == 1 and result.decisions["accepted"] > 0
    objects = pq.read_table(run / "objects").to_pandas()
    reviewed_keys = {(t["data"]["autolabel"]["image_id"], oid) for t in tasks[:2] for oid in t["data"]["autolabel"]["objects"].values()}
    return {"out": run, "objects": objects, "decisions": result.decisions, "reviewed_keys": reviewed_keys}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is installed by .ci/run")
def test_quality_section_in_headless_chromium(qa_reviewed, tmp_path):
    objects = qa_reviewed["objects"]
    out = tmp_path / "report"
    proc = subprocess.run([*autolabel_cli(), "report", str(qa_reviewed["out"]), "--out", str(out), "--gallery", "2", "--flagged-gallery", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    counted = objects[objects.status == "ok"]
    still = counted[counted.needs_review & ~pd.Series(list(zip(counted.image_id, counted.object_id)), index=counted.index).isin(qa_reviewed["reviewed_keys"])]
    assert summary["quality"]["flagged"] == len(still) and f"{len(still):,} flagged for review" in proc.stdout
    page = Chromium()
    try:
        page.open((out / "report.html").as_uri())
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(ARTIFACTS / "report-quality.png")
        assert page.problems() == []
        assert [u for u in page.requests() if not u.startswith("data:")] == [(out / "report.html").as_uri()]
        shown = page.js("Object.fromEntries([...document.querySelectorAll('#quality [data-stat]')].map(e => [e.dataset.stat, e.textContent]))")
        assert int(shown["flagged"].replace(",", "")) == len(still)
        assert int(shown["duplicates"].replace(",", "")) == int((objects.status == "duplicate").sum()) > 0
        reasons = page.js("Object.fromEntries([...document.querySelectorAll('td[data-reason]')].map(e => [e.dataset.reason, +e.textContent.replace(/,/g, '')]))")
        assert reasons == pd.Series([f for fl in still["flags"] for f in fl]).value_counts().to_dict()
        review = page.js("Object.fromEntries([...document.querySelectorAll('[data-review]')].map(e => [e.dataset.review, +e.textContent]))")
        assert review == {**{k: qa_reviewed["decisions"][k] for k in ("accepted", "corrected", "rejected", "added")},
                          "reviewed": qa_reviewed["decisions"]["accepted"] + qa_reviewed["decisions"]["rejected"]}
        pictures = page.js("[...document.images].map(i => [i.dataset.chart || (i.hasAttribute('data-flagged-gallery') ? 'flagged' : 'other'), "
                           "i.complete && i.naturalWidth > 0])")
        assert all(ok for _, ok in pictures)
        charts = {name for name, _ in pictures if name not in ("flagged", "other")}
        assert {"flagged_reasons", "flagged_classes", "stability", "box_iou", "outside_box", "regions", "largest_region"} <= charts
        assert sum(name == "flagged" for name, _ in pictures) == 8
        captions = page.js("[...document.querySelectorAll('figure[data-flagged-object]')].map(f => [f.dataset.flaggedObject, "
                           "[...f.querySelectorAll('.reason')].map(r => r.textContent)])")
        by_key = {f"{r.image_id}:{r.object_id}": list(r.flags) for r in still.itertuples()}
        assert len(captions) == 8 and all(by_key[key] == reasons_shown for key, reasons_shown in captions)
        text = page.js("document.getElementById('quality').innerText")
        assert "Human review" in text and "min_stability 0.8" in text
    finally:
        page.close()
    # The object the reviewer deleted is gone from every number.
    assert summary["totals"]["objects"] == len(counted) - 1


def test_quality_section_without_qa_columns(synthetic, tmp_path):
    write_report(str(synthetic["out"]), str(tmp_path), ReportOptions(gallery=0))
    page = (tmp_path / "report.html").read_text()
    assert "QA was not recorded for this run" in page and "data-flagged-gallery" not in page
    assert json.loads((tmp_path / "summary.json").read_text())["quality"] == {"recorded": False}
