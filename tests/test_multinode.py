"""The job on a real multi-node Ray cluster on loopback: a head (2 CPUs, no GPU) and two worker
nodes declaring 2 GPUs each (fake: Ray schedules on them and sets CUDA_VISIBLE_DEVICES, torch
sees no CUDA, so the models run on the CPU in float32), all ``ray start`` processes with token
auth, started once for the module (tests/cluster_harness.py).

- The actors spread over the worker nodes (none on the GPU-less head), and the output is the
  single-node run's (the session's ``labeled`` run), row for row, mask for mask.
- The weights are s3:// objects (a moto S3 server on loopback; endpoint and keys in each node's
  environment, as a cluster gives them): each node that runs a model, and the driver, copies
  each object once into its own cache (AUTOLABEL_CACHE differs per node), checked by sha256.
- The default plan (one SAM actor per GPU) starts every actor: 4 SAM actors, 2 per worker.
- ``kill -9`` of one worker node's raylet mid-run: the job finishes, its actors restarted on the
  other node, and the output is exactly the clean run's (no row lost, none twice).

One image per detector call and per SAM encoder batch (as the fault tests): which images share a
batch depends on timing, and batching moves boxes and logits in their last bits.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster_harness import LoopbackCluster
from conftest import autolabel_cli, run_overrides
from moto_server import start_moto
from pipeline.models import weights as models

pytestmark = pytest.mark.slow

SEGMENTER, DETECTOR = "MapWorker(MapBatches(Segmenter))", "MapWorker(MapBatches(Detector))"
WORKERS = ("worker1", "worker2")


@pytest.fixture(scope="module")
def weights(checkpoints, tmp_path_factory):
    """Both checkpoints in a bucket of a moto S3 server, and how many GETs one copy of each takes
    (s3fs fetches a large object in ranges), measured with one copy into a scratch cache."""
    server = start_moto(tmp_path_factory.mktemp("moto-weights"))
    client = server.client()
    client.create_bucket(Bucket="weights")
    urls, per_copy = {}, {}
    for name in ("sam", "yolo"):
        key = checkpoints[name].name
        client.upload_file(str(checkpoints[name]), "weights", key)
        urls[name] = f"s3://weights/{key}"
    scratch = tmp_path_factory.mktemp("scratch-cache")
    saved = os.environ.get("AUTOLABEL_CACHE")
    os.environ["AUTOLABEL_CACHE"] = str(scratch)
    try:
        for name, url in urls.items():
            models.fetch_once(url, storage_options=server.options)
            per_copy[name] = server.requests("GET", url.removeprefix("s3:/"))
    finally:
        os.environ.pop("AUTOLABEL_CACHE") if saved is None else os.environ.update(AUTOLABEL_CACHE=saved)
    yield {"server": server, "urls": urls, "per_copy": per_copy,
           "sha256": {name: models.sha256_file(checkpoints[name]) for name in urls}}
    server.stop()


def weight_gets(weights: dict) -> dict:
    return {name: weights["server"].requests("GET", url.removeprefix("s3:/")) for name, url in weights["urls"].items()}


@pytest.fixture(scope="module")
def cluster(weights, tmp_path_factory):
    # Worker CPUs are declared, not real (2 cores in all): the GPU plan gives each actor 1 CPU,
    # and 2 SAM + 2 detector actors per node leave room for the read and write tasks.
    root = tmp_path_factory.mktemp("loopback-cluster")
    caches = {name: root / f"cache-{name}" for name in ("head", *WORKERS)}
    # S3 endpoint and keys from every node's environment; each node its own weights cache. The
    # driver keeps its cache under its HOME: an AUTOLABEL_CACHE of the driver's would be handed
    # to every actor by the job (runtime_env), overriding each node's own.
    env = {**weights["server"].env, "AUTOLABEL_CACHE": None, "AUTOLABEL_CHECKPOINTS": None}
    cluster = LoopbackCluster.start(root, head_cpus=2, workers=((5, 2), (5, 2)), env=env,
                                    node_env={name: {"AUTOLABEL_CACHE": str(path)} for name, path in caches.items()})
    cluster.caches = caches
    cluster.driver_home = root / "driver-home"
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def more_photos(photo_folder, tmp_path_factory) -> Path:
    """The session's photo folder (same bytes) and its photos mirrored both ways: 16 images."""
    folder = tmp_path_factory.mktemp("more-photos") / "photos"
    shutil.copytree(photo_folder, folder)
    (folder / "mirrored").mkdir()
    for path in sorted(photo_folder.rglob("*")):
        if path.suffix in (".jpg", ".png") and path.name != "broken.jpg":
            rgb = Image.open(path).convert("RGB")
            rgb.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "mirrored" / f"{path.stem}-lr.jpg", quality=92)
            rgb.transpose(Image.FLIP_TOP_BOTTOM).save(folder / "mirrored" / f"{path.stem}-tb.jpg", quality=92)
    return folder


def cluster_overrides(images: Path, out: Path, checkpoints: dict, weights: dict, *extra: str) -> list[str]:
    """The shared labeled run's config (its weights, from the bucket), on the cluster's (fake)
    GPUs: the plan decides the actors, float32 as on the single node, one image per shard so
    shards are committed as the job runs."""
    replaced = ("ray.sam_actors=", "sam.device=", "input.shard_size=", "sam.checkpoint=", "detector.weights=")
    keep = [o for o in run_overrides(images, out, checkpoints) if not o.startswith(replaced)]
    return [*keep, f"sam.checkpoint={weights['urls']['sam']}", f"detector.weights={weights['urls']['yolo']}",
            "input.shard_size=1", "sam.dtype=float32", "report.enabled=false", "ray.gpu_wait_s=60", *extra]


def start_job(cluster: LoopbackCluster, overrides: list[str], cwd: Path) -> subprocess.Popen:
    """``autolabel run`` as a driver joining the cluster (it attaches to the head node)."""
    return subprocess.Popen([*autolabel_cli(), "run", *overrides, f"ray.address={cluster.address}"],
                            env={**cluster.env, "HOME": str(cluster.driver_home)}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cached_weights(cache: Path) -> dict:
    """{file name: sha256} of the weights a node's cache holds; partial downloads listed as such."""
    return {p.name: models.sha256_file(p) for p in sorted(cache.rglob("*")) if p.is_file() and p.suffix in (".pt", ".part")}


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        logs, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        logs, _ = proc.communicate()
        pytest.fail(f"the job did not finish in {timeout:.0f} s:\n{logs[-4000:]}")
    assert proc.returncode == 0, logs[-4000:]
    return logs


def read_run(out: Path) -> dict:
    return {"images": pq.read_table(out / "images").to_pandas(), "objects": pq.read_table(out / "objects").to_pandas(),
            "manifest": json.loads((out / "run.json").read_text())}


def rows(result: dict, root: Path) -> tuple[list, list]:
    """Object rows (path below ``root``, object, candidate, status, mask) and image rows (path,
    status, objects), so runs over different folders with the same files compare."""
    def rel(uri: str) -> str:
        return uri.split(str(root), 1)[1]

    objects = sorted((rel(r.uri), r.object_id, r.candidate, r.status, None if r.mask is None else r.mask["counts"])
                     for r in result["objects"].itertuples())
    images = sorted((rel(r.uri), r.status, r.num_objects) for r in result["images"].itertuples())
    return objects, images


def assert_exactly_once(result: dict) -> None:
    assert result["images"]["image_id"].is_unique, "an image has two rows"
    assert not result["objects"].duplicated(["image_id", "object_id", "candidate"]).any(), "an object has two rows"


def job_actors(cluster: LoopbackCluster, manifest: dict) -> list[dict]:
    """This run's Ray actors (Ray's state API keeps dead ones), found by the job id that Ray puts
    in every actor id (its last 8 hex digits), read from a SAM actor of run.json."""
    job_ids = {actor_id[-8:] for actor_id in manifest["timings"]["sam_actors"]}
    assert len(job_ids) == 1, job_ids
    job_id = job_ids.pop()
    return [a for a in cluster.list_actors() if a["job_id"] == job_id]


def placement(cluster: LoopbackCluster, actors: list[dict], class_name: str) -> list[str]:
    return sorted(cluster.name_of(a["node_id"]) or "?" for a in actors if a["class_name"] == class_name)


@pytest.fixture(scope="module")
def clean_run(cluster, more_photos, checkpoints, weights, tmp_path_factory) -> dict:
    """16 images on the cluster, pools capped at 2 GPUs' worth (one SAM and one detector actor
    per worker node, the detector pool fixed at 2 so that it is not left at its starting size of
    one, and either node has room for the other's actors if it dies)."""
    out = tmp_path_factory.mktemp("clean-cluster-run") / "out"
    started = time.time()
    logs = finish(start_job(cluster, cluster_overrides(more_photos, out, checkpoints, weights, "ray.gpus=2", "ray.detector_actors=2"), out.parent))
    result = read_run(out)
    result.update(logs=logs, seconds=time.time() - started, actors=job_actors(cluster, result["manifest"]))
    return result


def test_actors_spread_over_the_gpu_nodes_and_the_output_is_the_single_node_run(cluster, clean_run, labeled, more_photos, photo_folder):
    manifest = clean_run["manifest"]
    assert manifest["status"] == "finished" and manifest["totals"]["ok"] == 15 and manifest["totals"]["error"] == 1
    assert manifest["ray"]["mode"] == "gpu" and manifest["ray"]["gpus"] == 4
    # One SAM and one detector actor on each worker node; nothing on the head, which has no GPU.
    assert placement(cluster, clean_run["actors"], SEGMENTER) == list(WORKERS)
    assert placement(cluster, clean_run["actors"], DETECTOR) == list(WORKERS)
    worked = {cluster.name_of(a["node"]) for a in manifest["timings"]["sam_actors"].values() if a["images"]}
    assert worked == set(WORKERS), "both nodes' SAM actors labeled images"
    assert_exactly_once(clean_run)
    # The photos the single-node run labeled come out the same, mask for mask.
    objects, images = rows(clean_run, more_photos)
    ref_objects, ref_images = rows(labeled, photo_folder)
    assert [r for r in objects if not r[0].startswith("/mirrored/")] == ref_objects
    assert [r for r in images if not r[0].startswith("/mirrored/")] == ref_images
    assert len(ref_objects) > 5 and len(images) == 16


def test_each_node_copies_the_weights_from_the_bucket_once(cluster, clean_run, weights, checkpoints):
    names = {"sam": checkpoints["sam"].name, "yolo": checkpoints["yolo"].name}
    expected = {names[k]: digest for k, digest in weights["sha256"].items()}
    for worker in WORKERS:  # each node that ran models: one verified copy of each, nothing half-done
        assert cached_weights(cluster.caches[worker]) == expected, worker
    assert cached_weights(cluster.driver_home / ".cache" / "autolabel") == expected  # the driver's checks
    assert cached_weights(cluster.caches["head"]) == {}  # no model actor on the head (no GPU)
    # One copy per node and the driver (+ the scratch copy that measured a copy's GETs).
    assert weight_gets(weights) == {name: 4 * n for name, n in weights["per_copy"].items()}
    assert clean_run["manifest"]["models"]["sam"]["sha256"] == weights["sha256"]["sam"]


def test_the_default_plan_starts_one_sam_actor_per_gpu(cluster, labeled, photo_folder, checkpoints, weights, tmp_path):
    out = tmp_path / "out"
    finish(start_job(cluster, cluster_overrides(photo_folder, out, checkpoints, weights), tmp_path))
    result = read_run(out)
    actors = job_actors(cluster, result["manifest"])
    assert placement(cluster, actors, SEGMENTER) == ["worker1", "worker1", "worker2", "worker2"]
    assert_exactly_once(result)
    assert rows(result, photo_folder) == rows(labeled, photo_folder)


def test_a_worker_node_killed_mid_run_changes_nothing(cluster, clean_run, more_photos, checkpoints, weights, tmp_path):
    """Runs last: worker2 stays dead."""
    out = tmp_path / "out"
    gets_before = weight_gets(weights)
    proc = start_job(cluster, cluster_overrides(more_photos, out, checkpoints, weights, "ray.gpus=2", "ray.detector_actors=2"), tmp_path)
    done = out / "_done"
    deadline = time.time() + 240
    while not (done.is_dir() and any(done.glob("shard-*.json"))):  # mid-run: some shards committed
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "no shard was committed in 240 s"
        time.sleep(0.05)
    killed = cluster.kill_raylet("worker2")
    shards_done_at_kill = len(list(done.glob("shard-*.json")))
    finish(proc)
    assert shards_done_at_kill < 16, "the kill came after the work was done"
    result = read_run(out)
    assert result["manifest"]["status"] == "finished"
    assert_exactly_once(result)
    assert rows(result, more_photos) == rows(clean_run, more_photos)
    nodes = {n["node_id"]: n for n in cluster.list_nodes()}
    assert nodes[cluster.node("worker2").node_id]["state"] == "DEAD", f"raylet {killed} was killed"
    # worker2's SAM and detector actors were restarted on worker1 and ended there.
    actors = job_actors(cluster, result["manifest"])
    for name in (SEGMENTER, DETECTOR):
        assert placement(cluster, actors, name) == ["worker1", "worker1"], name
        assert sorted(a["num_restarts"] for a in actors if a["class_name"] == name) == [0, 1], name
    # The restarted actors found the weights in worker1's cache: nothing was fetched again.
    assert weight_gets(weights) == gets_before
