"""Checkpoint resolution: official names, fsspec URLs (cached once), Hugging Face ids, random."""
from __future__ import annotations

import fsspec
import pytest

from pipeline.models import weights as models
from pipeline.models.weights import WeightsError, resolve_detector_weights, resolve_sam_checkpoint, weights_identity


def test_random_is_explicit():
    weights = resolve_sam_checkpoint("small", "random")
    assert weights.is_random and weights.config == "configs/sam2.1/sam2.1_hiera_s.yaml"
    assert weights_identity(None) == {"path": None, "sha256": None, "random": True}
    assert resolve_detector_weights("yolov8n.yaml") == "yolov8n.yaml"


def test_size_table_matches_the_sam2_1_release():
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    released = {v for k, v in HF_MODEL_ID_TO_FILENAMES.items() if "sam2.1" in k}
    assert set(models.SAM_MODELS.values()) == released


def test_fsspec_checkpoint_is_copied_to_the_local_cache_once(tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/sam.pt", checkpoints["sam"].read_bytes())
    first = resolve_sam_checkpoint("tiny", "memory://bucket/sam.pt")
    assert first.path.startswith(str(tmp_path / "cache")) and first.source == "memory://bucket/sam.pt"
    assert models.sha256_file(first.path) == models.sha256_file(checkpoints["sam"])
    fs.rm("/bucket/sam.pt")  # a second resolution must not read the remote copy again
    assert resolve_sam_checkpoint("tiny", "memory://bucket/sam.pt").path == first.path
    with pytest.raises(WeightsError, match="checkpoint not found: memory://bucket/other.pt"):
        resolve_sam_checkpoint("tiny", "memory://bucket/other.pt")
    assert not [p for p in (tmp_path / "cache").rglob("*.part")], "no partial copies left behind"


def test_hugging_face_ids(monkeypatch):
    with pytest.raises(WeightsError, match="does not match sam.size=large"):
        resolve_sam_checkpoint("large", "facebook/sam2.1-hiera-tiny")
    with pytest.raises(WeightsError, match="unknown Hugging Face id 'facebook/sam9-giant'"):
        resolve_sam_checkpoint("tiny", "facebook/sam9-giant")
    # offline (HF_HUB_OFFLINE=1 in the tests): a clear error, never random weights
    with pytest.raises(WeightsError, match="cannot fetch sam2.1_hiera_tiny.pt from Hugging Face"):
        resolve_sam_checkpoint("tiny", "facebook/sam2.1-hiera-tiny")


def test_official_yolo_weights_in_the_checkpoint_folder_are_used(tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("AUTOLABEL_CHECKPOINTS", str(tmp_path))
    (tmp_path / "yolov8n.pt").write_bytes(checkpoints["yolo"].read_bytes())
    # random weights stand in for the official file: its pinned digest is theirs for this test
    monkeypatch.setitem(models.OFFICIAL_SHA256, "yolov8n.pt", models.sha256_file(checkpoints["yolo"]))
    assert resolve_detector_weights("yolov8n.pt") == str(tmp_path / "yolov8n.pt")
    with pytest.raises(WeightsError, match="detector.weights: file not found: nope.pt"):
        resolve_detector_weights("nope.pt")


def test_official_weights_are_checked_against_the_release_s_sha256(tmp_path, monkeypatch, checkpoints):
    """Issue 16, item 15. A loopback server stands in for the release URL and serves a file that
    is not the official yolov8n.pt (its Content-Length is right: that check alone passed it): it
    is refused, with both digests, and nothing is kept. CONTROL: pinned to its own digest, the
    same download is kept. A copy cut short under the official name is refused, not used."""
    from http_server import FolderServer

    release = tmp_path / "release"
    release.mkdir()
    (release / "yolov8n.pt").write_bytes(checkpoints["yolo"].read_bytes())
    served = models.sha256_file(release / "yolov8n.pt")
    folder = tmp_path / "checkpoints"
    monkeypatch.setenv("AUTOLABEL_CHECKPOINTS", str(folder))
    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path / "cache"))
    with FolderServer(release) as server:
        monkeypatch.setattr(models, "YOLO_BASE_URL", server.url().rstrip("/"))
        with pytest.raises(WeightsError) as err:
            resolve_detector_weights("yolov8n.pt")
        assert f"was not kept: sha256 {served}, but the official yolov8n.pt has {models.OFFICIAL_SHA256['yolov8n.pt']}" in str(err.value)
        assert sorted(p.name for p in folder.iterdir()) == [], "neither the file nor a .part may stay"
        monkeypatch.setitem(models.OFFICIAL_SHA256, "yolov8n.pt", served)
        assert resolve_detector_weights("yolov8n.pt") == str(folder / "yolov8n.pt")
        assert [r[0] for r in server.requests] == ["GET", "GET"]
    whole = (folder / "yolov8n.pt").read_bytes()
    (folder / "yolov8n.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightsError, match=f"yolov8n.pt: {folder / 'yolov8n.pt'} has sha256 [0-9a-f]{{64}}, but the official "
                                           r"yolov8n.pt has [0-9a-f]{64} \(a truncated download"):
        resolve_detector_weights("yolov8n.pt")
    assert (folder / "yolov8n.pt").read_bytes() == whole[: len(whole) // 2], "a file in the user's folder is not deleted"


def test_the_pinned_table_covers_every_official_name():
    """Every official file has an entry (a digest, or None where none was published), and each
    digest is 64 hex digits."""
    names = {name for _, name in models.SAM_MODELS.values()} | models.OFFICIAL_YOLO
    assert set(models.OFFICIAL_SHA256) == names
    assert all(d is None or models.normal_digest(d) == d for d in models.OFFICIAL_SHA256.values())
    assert sum(d is not None for d in models.OFFICIAL_SHA256.values()) >= 13


def test_a_segmentation_model_is_not_accepted_as_detector():
    import torch

    with pytest.raises(WeightsError, match="is a 'segment' model; a detect model is needed"):
        models.load_yolo("yolov8n-seg.yaml", torch.device("cpu"))


# ------------------------------------------------------------------ weights on every node
#
# Real processes, a real HTTP server on loopback and a real S3 server (moto): several processes
# of one node (Ray actors) fetching the same weights, as 4 SAM actors on an 8-GPU node do.

import hashlib  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

PAYLOAD = os.urandom(3 << 20)  # stands in for a checkpoint: fetch_once copies bytes, whatever they are
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()

# One "actor": waits for the common start time, then resolves the URL; prints what it got.
RACER = r"""
import json, sys, time
from pathlib import Path
from pipeline.models import weights as models
url, start, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, start - time.time()))
if mode == "fetch_once":
    path = models.fetch_once(url)
elif mode == "sam":
    path = Path(models.resolve_sam_checkpoint("tiny", url).path)
else:  # CONTROL: the bare copy step, without the node lock
    path = Path(sys.argv[4])
    models.copy_url(url, path)
print(json.dumps({"path": str(path), "sha256": models.sha256_file(path)}))
"""


class SlowServer:
    """HTTP on loopback serving PAYLOAD at /sam.pt slowly (about 1.5 s a copy), counting GETs
    and the most copies it was sending at once."""

    def __init__(self):
        self.gets = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with owner.lock:
                    owner.gets += 1
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PAYLOAD)))
                    self.end_headers()
                    for i in range(0, len(PAYLOAD), 64 << 10):
                        self.wfile.write(PAYLOAD[i:i + (64 << 10)])
                        time.sleep(0.03)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/sam.pt"


@pytest.fixture
def slow_server():
    server = SlowServer()
    yield server
    server.server.shutdown()


def _racers(args_each: list[list[str]], env: dict) -> list[dict]:
    """Start one process per argument list together; each sleeps until a common start time."""
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", RACER, args[0], str(start), *args[1:]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in args_each]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _node_env(cache: Path, **extra) -> dict:
    return {**os.environ, "AUTOLABEL_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **extra}


def _entry(cache: Path, url: str) -> Path:
    """Where ``fetch_once`` keeps ``url`` in a node whose AUTOLABEL_CACHE is ``cache``."""
    return cache / models.cached_path(url).relative_to(models.cache_dir())


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".part")]


def test_four_processes_racing_for_one_url_download_it_once(slow_server, tmp_path):
    cache = tmp_path / "cache"
    results = _racers([[slow_server.url, "fetch_once"]] * 4, _node_env(cache))
    assert slow_server.gets == 1, "one download for the node, the other processes waited for it"
    assert {r["path"] for r in results} == {str(_entry(cache, slow_server.url))}
    assert {r["sha256"] for r in results} == {PAYLOAD_SHA}
    assert not _leftovers(cache)
    # CONTROL: the same four processes doing the copy step without the lock really overlap and
    # download four times, so the count above is the lock's doing.
    slow_server.gets = slow_server.max_in_flight = 0
    _racers([[slow_server.url, "copy", str(tmp_path / f"bare{i}.pt")] for i in range(4)], _node_env(cache))
    assert slow_server.gets == 4 and slow_server.max_in_flight >= 2


def test_a_download_killed_midway_never_counts(slow_server, tmp_path):
    """SIGKILL of the process holding the lock mid-download: its lock dies with it (flock), the
    half file is never used, and the next process fetches a whole verified copy."""
    cache = tmp_path / "cache"
    env = _node_env(cache)
    proc = subprocess.Popen([sys.executable, "-c", RACER, slow_server.url, "0", "fetch_once"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not _leftovers(cache) or slow_server.gets == 0:
        assert time.time() < deadline and proc.poll() is None, "the download never started"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    dest = _entry(cache, slow_server.url)
    part = _leftovers(cache)
    assert part and 0 < part[0].stat().st_size < len(PAYLOAD) and not dest.exists()
    (result,) = _racers([[slow_server.url, "fetch_once"]], env)
    assert result == {"path": str(dest), "sha256": PAYLOAD_SHA} and slow_server.gets == 2
    assert not _leftovers(cache), "the dead process's half file was cleaned up"


def test_a_corrupt_cache_entry_is_fetched_again_and_a_wrong_digest_is_refused(slow_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path / "cache"))
    first = models.fetch_once(slow_server.url, expected_sha256=PAYLOAD_SHA)
    assert models.sha256_file(first) == PAYLOAD_SHA and slow_server.gets == 1
    assert models.fetch_once(slow_server.url) == first and slow_server.gets == 1  # cached: no request
    # A corrupt entry (a disk error, a person editing it): noticed by its recorded digest, replaced.
    with open(first, "r+b") as fh:
        fh.write(b"\0" * 100)
    with caplog.at_level("WARNING", logger="pipeline.models.weights"):
        again = models.fetch_once(slow_server.url)
    assert again == first and models.sha256_file(again) == PAYLOAD_SHA and slow_server.gets == 2
    assert "is corrupt" in caplog.text and PAYLOAD_SHA in caplog.text
    # The run expects other weights (the driver's copy differs, or a pinned digest): refused with
    # both digests; the good copy stays as it was.
    wrong = "ab" * 32
    with pytest.raises(WeightsError) as err:
        models.fetch_once(slow_server.url, expected_sha256=wrong)
    assert PAYLOAD_SHA in str(err.value) and wrong in str(err.value) and "was not kept" in str(err.value)
    assert models.sha256_file(first) == PAYLOAD_SHA and not _leftovers(tmp_path / "cache")
    with pytest.raises(WeightsError, match="is not 64 hex digits"):
        models.fetch_once(slow_server.url, expected_sha256="abc")
    assert models.fetch_once(slow_server.url, expected_sha256=f"sha256:{PAYLOAD_SHA.upper()}") == first
    # A local file (e.g. baked into a node's image) is checked the same way.
    with pytest.raises(WeightsError, match=f"has sha256 {PAYLOAD_SHA}, but this run expects {wrong}"):
        models.resolve_detector_weights(str(first), expected_sha256=wrong)


def test_a_corrupt_entry_whose_source_is_gone_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/weights/gone.pt", PAYLOAD)
    path = models.fetch_once("memory://weights/gone.pt")
    fs.rm("/weights/gone.pt")
    Path(path).write_bytes(PAYLOAD[:1000])  # truncated
    with pytest.raises(WeightsError) as err:
        models.fetch_once("memory://weights/gone.pt")
    text = str(err.value)
    assert "checkpoint not found: memory://weights/gone.pt" in text and "is corrupt" in text
    assert PAYLOAD_SHA in text and hashlib.sha256(PAYLOAD[:1000]).hexdigest() in text


def test_s3_checkpoint_is_copied_once_per_node_through_moto(checkpoints, tmp_path):
    """A real SAM checkpoint in a real S3 server (moto, on loopback); three processes of one
    node resolve ``sam.checkpoint=s3://...`` together, with the endpoint and keys from their
    environment, as cluster nodes get them: one copy's worth of GETs, one verified file."""
    from moto_server import start_moto

    server = start_moto(tmp_path)
    try:
        client = server.client()
        client.create_bucket(Bucket="weights")
        client.upload_file(str(checkpoints["sam"]), "weights", "sam2.1_hiera_tiny.pt")
        url = "s3://weights/sam2.1_hiera_tiny.pt"
        expected = models.sha256_file(checkpoints["sam"])
        # one copy alone, in another cache, to know how many GETs a copy takes (s3fs fetches a
        # large object in ranges)
        _racers([[url, "sam"]], _node_env(tmp_path / "one", **server.env))
        per_copy = server.requests("GET", "/weights/sam2.1_hiera_tiny.pt")
        assert per_copy >= 1
        cache = tmp_path / "node"
        results = _racers([[url, "sam"]] * 3, _node_env(cache, **server.env))
        assert server.requests("GET", "/weights/sam2.1_hiera_tiny.pt") == 2 * per_copy
        assert {r["sha256"] for r in results} == {expected} and len({r["path"] for r in results}) == 1
        assert results[0]["path"].startswith(str(cache)) and not _leftovers(cache)
        # storage options instead of the environment, in this process: the same file
        os.environ["AUTOLABEL_CACHE"] = str(tmp_path / "options")
        try:
            path = models.resolve_sam_checkpoint("tiny", url, expected, storage_options=server.options).path
        finally:
            del os.environ["AUTOLABEL_CACHE"]
        assert path.startswith(str(tmp_path / "options")) and models.sha256_file(path) == expected
    finally:
        server.stop()


def test_official_names_in_the_checkpoint_folder_never_touch_the_network(checkpoints, tmp_path):
    """Weights baked into an image (AUTOLABEL_CHECKPOINTS): ``auto`` and ``yolov8n.pt`` resolve
    and load with no socket opened at all (a Python audit hook records every connect and DNS
    look-up). CONTROL: the same hook sees the attempt when the file is missing."""
    folder = tmp_path / "baked"
    folder.mkdir()
    (folder / "sam2.1_hiera_tiny.pt").symlink_to(checkpoints["sam"])
    (folder / "yolov8n.pt").symlink_to(checkpoints["yolo"])
    # random weights stand in for the official files: the pinned digests are theirs here
    pins = json.dumps({"sam2.1_hiera_tiny.pt": models.sha256_file(checkpoints["sam"]), "yolov8n.pt": models.sha256_file(checkpoints["yolo"])})
    script = r"""
import json, sys
events = []
sys.addaudithook(lambda name, args: events.append([name, repr(args)[:120]]) if name in ("socket.connect", "socket.getaddrinfo") else None)
import torch
from pipeline.models import weights as models
models.OFFICIAL_SHA256.update(json.loads(sys.argv[2]))
if sys.argv[1] == "baked":
    sam = models.resolve_sam_checkpoint("tiny", "auto")
    det = models.resolve_detector_weights("yolov8n.pt")
    models.load_yolo(det, torch.device("cpu"))
    models.build_sam_model(sam, 256, torch.device("cpu"))
    print(json.dumps({"paths": [sam.path, det], "events": events}))
else:  # CONTROL: no file; the official URL pointed at a closed port on loopback
    models.YOLO_BASE_URL = "http://127.0.0.1:9"
    try:
        models.resolve_detector_weights("yolov8s.pt")
    except models.WeightsError as exc:
        print(json.dumps({"error": str(exc).splitlines()[0], "events": events}))
"""
    env = _node_env(tmp_path / "cache", AUTOLABEL_CHECKPOINTS=str(folder))
    baked = subprocess.run([sys.executable, "-c", script, "baked", pins], env=env, capture_output=True, text=True, timeout=300)
    assert baked.returncode == 0, baked.stderr[-3000:]
    out = json.loads(baked.stdout.strip().splitlines()[-1])
    assert out["paths"] == [str(folder / "sam2.1_hiera_tiny.pt"), str(folder / "yolov8n.pt")]
    assert out["events"] == []
    control = subprocess.run([sys.executable, "-c", script, "missing", pins], env=env, capture_output=True, text=True, timeout=300)
    out = json.loads(control.stdout.strip().splitlines()[-1])
    assert "yolov8s.pt is not in" in out["error"] and any(e[0] == "socket.connect" and "9)" in e[1] for e in out["events"])


def test_official_weights_are_fetched_once_into_the_cache_when_the_checkpoint_folder_is_read_only(slow_server, tmp_path, monkeypatch):
    """A container whose checkpoint folder cannot be written: ``auto`` fetches the official file
    (here from a loopback server standing in for the release URL) into the node's cache, once."""
    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "file").write_text("a file, so no folder can be made below it")
    monkeypatch.setenv("AUTOLABEL_CHECKPOINTS", str(tmp_path / "file" / "checkpoints"))
    monkeypatch.setattr(models, "SAM_BASE_URL", slow_server.url.rsplit("/", 1)[0])
    monkeypatch.setitem(models.SAM_MODELS, "tiny", (models.SAM_MODELS["tiny"][0], "sam.pt"))
    first = models.resolve_sam_checkpoint("tiny", "auto", expected_sha256=PAYLOAD_SHA)
    assert first.path == str(tmp_path / "cache" / "official" / "sam.pt") and slow_server.gets == 1
    assert models.resolve_sam_checkpoint("tiny", "auto").path == first.path and slow_server.gets == 1
    with pytest.raises(WeightsError, match=f"has sha256 {PAYLOAD_SHA}, but this run expects"):
        models.resolve_sam_checkpoint("tiny", "auto", expected_sha256="0" * 64)


def test_a_hugging_face_copy_already_on_the_node_is_used_offline(checkpoints, tmp_path):
    """The hub's cache layout (as ``hf_hub_download`` leaves it, or an image bakes it) under
    HF_HOME, HF_HUB_OFFLINE=1: the id resolves to that file; a wrong digest is refused."""
    snapshot = tmp_path / "hf" / "hub" / "models--facebook--sam2.1-hiera-tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "sam2.1_hiera_tiny.pt").symlink_to(checkpoints["sam"])
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    script = r"""
import sys
from pipeline.models import weights as models
if sys.argv[2]:  # random weights stand in for the official file: the pinned digest is theirs
    models.OFFICIAL_SHA256["sam2.1_hiera_tiny.pt"] = sys.argv[2]
try:
    print(models.resolve_sam_checkpoint("tiny", "facebook/sam2.1-hiera-tiny", expected_sha256=sys.argv[1] or None).path)
except models.WeightsError as exc:
    print("ERROR", exc)
"""
    env = _node_env(tmp_path / "cache", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    digest = models.sha256_file(checkpoints["sam"])
    good = subprocess.run([sys.executable, "-c", script, digest, digest], env=env, capture_output=True, text=True, timeout=120)
    assert good.stdout.strip() == str(snapshot / "sam2.1_hiera_tiny.pt"), good.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", script, "1" * 64, digest], env=env, capture_output=True, text=True, timeout=120)
    assert bad.stdout.startswith("ERROR sam.checkpoint facebook/sam2.1-hiera-tiny:") and "1" * 64 in bad.stdout
    # not the official file (the real pinned digest): refused, whatever the run expects
    official = subprocess.run([sys.executable, "-c", script, "", ""], env=env, capture_output=True, text=True, timeout=120)
    assert official.stdout.startswith("ERROR sam2.1_hiera_tiny.pt:") and models.OFFICIAL_SHA256["sam2.1_hiera_tiny.pt"] in official.stdout
