"""GPUs the job does not have to itself (issue 16, items 12 and 13), on a real Ray cluster on
loopback: a head (no GPU) and one worker node declaring 2 GPUs (fake: Ray schedules on them and
torch sees no CUDA, so the models run on the CPU), started once for the module
(tests/cluster_harness.py).

- Another job holds one of the two GPUs: the run starts its SAM pool with the one that is free
  and finishes (before: the pool's minimum was both GPUs, and the job failed after
  ``ray.gpu_wait_s``).
- The GPU node dies mid-run: the job waits ``ray.gpu_wait_s`` for GPUs to come back, then fails
  with a message that says so; the run folder says ``failed`` and keeps its shards, and once a
  GPU node is back the same command resumes it and labels each image exactly once (before: the
  job waited forever).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster_harness import LoopbackCluster
from conftest import autolabel_cli, run_overrides

pytestmark = pytest.mark.slow

HOLDER = r"""
import sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_gpus=1, num_cpus=0)
class OtherJobsModel:  # another job's actor, holding a whole GPU for as long as this driver lives
    def gpus(self):
        return ray.get_gpu_ids()

holder = OtherJobsModel.remote()
print("holding", ray.get(holder.gpus.remote()), flush=True)
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-gpu-cluster")
    # Declared CPUs, not real ones: the GPU plan gives each actor 1 CPU.
    cluster = LoopbackCluster.start(root, head_cpus=2, workers=((4, 2),))
    cluster.driver_home = root / "driver-home"
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def eleven_photos(photo_folder, tmp_path_factory) -> Path:
    """The session's photo folder and its photos mirrored: 11 images (one broken)."""
    folder = tmp_path_factory.mktemp("eleven") / "photos"
    shutil.copytree(photo_folder, folder)
    for path in sorted(photo_folder.rglob("*")):
        if path.suffix in (".jpg", ".png") and path.name != "broken.jpg":
            Image.open(path).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"{path.stem}-lr.jpg", quality=92)
    assert len([p for p in folder.rglob("*") if p.suffix in (".jpg", ".png")]) == 11
    return folder


def overrides(images: Path, out: Path, checkpoints: dict, *extra: str) -> list[str]:
    """The shared labeled run's config on the cluster's (fake) GPUs: the plan sizes the pools;
    float32 as on the CPU; one image per shard, so shards are committed as the job runs."""
    replaced = ("ray.sam_actors=", "sam.device=", "input.shard_size=")
    keep = [o for o in run_overrides(images, out, checkpoints) if not o.startswith(replaced)]
    return [*keep, "input.shard_size=1", "sam.dtype=float32", "report.enabled=false", *extra]


def start_job(cluster: LoopbackCluster, args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*autolabel_cli(), "run", *args, f"ray.address={cluster.address}"],
                            env={**cluster.env, "HOME": str(cluster.driver_home)}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        logs, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        logs, _ = proc.communicate()
        pytest.fail(f"the job did not end in {timeout:.0f} s:\n{logs[-4000:]}")
    return proc.returncode, logs


def read_run(out: Path) -> dict:
    return {"images": pq.read_table(out / "images").to_pandas(), "manifest": json.loads((out / "run.json").read_text())}


def test_another_job_holds_a_gpu_and_the_run_uses_the_free_one(cluster, photo_folder, checkpoints, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.address], env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        while not (seen and seen[-1].startswith("holding")):  # Ray's own lines come first
            seen.append(holder.stdout.readline())
            assert seen[-1], "".join(seen)[-3000:]
        out = tmp_path / "out"
        code, logs = finish(start_job(cluster, overrides(photo_folder, out, checkpoints, "ray.gpu_wait_s=30"), tmp_path))
        assert code == 0, logs[-4000:]
    finally:
        holder.terminate()
        holder.communicate(timeout=60)
    result = read_run(out)
    plan = result["manifest"]["ray"]
    assert result["manifest"]["status"] == "finished" and len(result["images"]) == 6
    assert (plan["gpus"], plan["gpus_free"], plan["sam"]["min_size"], plan["sam"]["max_size"]) == (2, 1, 1, None)
    assert "2 GPUs now, 1 of them free" in logs


def test_the_gpu_node_dies_mid_run_the_job_fails_resumably_and_resumes_when_gpus_are_back(cluster, eleven_photos, checkpoints, tmp_path):
    """Runs last: worker1 stays dead (a new GPU node, worker2, resumes the run)."""
    out = tmp_path / "out"
    # One SAM actor (ray.gpus=1), so it starts well within ray.gpu_wait_s on 2 busy cores: the
    # same wait applies to the first actors.
    args = overrides(eleven_photos, out, checkpoints, "ray.gpu_wait_s=30", "ray.gpus=1")
    proc = start_job(cluster, args, tmp_path)
    done = out / "_done"
    deadline = time.time() + 240
    while not (done.is_dir() and any(done.glob("shard-*.json"))):  # mid-run: a shard committed
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "no shard was committed in 240 s"
        time.sleep(0.05)
    cluster.kill_raylet("worker1")
    killed_at = time.time()
    code, logs = finish(proc, timeout=240)
    waited = time.time() - killed_at
    shards_kept = len(list(done.glob("shard-*.json")))
    assert code == 1, logs[-4000:]
    assert "the cluster lost every GPU and none came back within ray.gpu_wait_s=30 s" in logs, logs[-4000:]
    assert "waiting up to 30 s (ray.gpu_wait_s) for GPU nodes to come back" in logs
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and "the same command resumes the run" in manifest["error"]
    assert "rerun the same command to resume" in logs  # the command line's own advice
    assert 1 <= shards_kept < 11, "the kill came after the work was done"
    assert waited >= 30, "it waited ray.gpu_wait_s for GPUs to come back"
    # A GPU node is back: the same command resumes the run and finishes it, each image once.
    cluster.add_worker(4, 2, "worker2")
    code, logs = finish(start_job(cluster, args, tmp_path))
    assert code == 0, logs[-4000:]
    result = read_run(out)
    progress = result["manifest"]["progress"]
    assert result["manifest"]["status"] == "finished" and len(result["manifest"]["attempts"]) == 2
    assert progress["shards_done_before_this_attempt"] == shards_kept
    assert len(result["images"]) == 11 and result["images"]["image_id"].is_unique
