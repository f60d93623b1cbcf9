"""A cluster that starts with no GPU: the job asks for one, Ray's autoscaler adds a GPU node, and
the SAM pool runs there (never silently on the head's CPUs).

Ray's own fake multi-node provider (``RAY_FAKE_CLUSTER=1``, provider ``fake_multinode``) plays the
cloud: it starts local "nodes" with the declared resources when the autoscaler asks for them.
Their GPUs are declared, not real (torch sees no CUDA there), so the run asks for float32.
The cluster is the loopback harness's head, stopped by its session (every process it started,
the autoscaler's nodes included), never by ``ray stop``.
"""
from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster_harness import LoopbackCluster, free_port
from conftest import REPO, autolabel_cli, model_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    """A head with 2 CPUs and no GPU (the loopback harness), and an autoscaler that may add up to
    2 nodes of 1 GPU; the nodes it adds live in the head's session and stop with it."""
    folder = tmp_path_factory.mktemp("autoscaling")
    port = free_port()
    config = {
        "cluster_name": "fake_gpu", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.gpu": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 500_000_000}, "node_config": {},
                               "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.2,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }
    (folder / "cluster.yaml").write_text(yaml.safe_dump(config))
    # The autoscaler looks at the demand every second instead of Ray's 5 s: the job's wait for its
    # GPU node is shorter, what the autoscaler decides is the same.
    cluster = LoopbackCluster.start(folder, head_cpus=2, workers=(), gcs_port=port,
                                    env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_METRIC_PORT": str(free_port()), "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                                    head_args=(f"--autoscaling-config={folder / 'cluster.yaml'}",))
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_cluster_without_gpus_gets_one_for_sam(autoscaling_cluster, checkpoints, photo_folder, tmp_path):
    """Also: storage options (here a made-up token the local filesystem accepts and ignores) travel
    to the workers as task and actor arguments, and appear in none of Ray's task or actor
    listings, nor in any log file of the cluster."""
    cluster = autoscaling_cluster
    env, address = cluster.env, cluster.address
    out = tmp_path / "out"
    token = "tok-" + secrets.token_hex(12)
    proc = subprocess.run(
        [*autolabel_cli(), "run", f"input.uri={photo_folder}", f"output.uri={out}", f"ray.address={address}",
         "sam.dtype=float32", "input.shard_size=2", "report.enabled=false", *model_overrides(checkpoints),
         f"input.storage_options.token={token}", f"output.storage_options.token={token}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert token not in proc.stdout + proc.stderr
    assert "waiting up to 600 s (ray.gpu_wait_s) for a GPU" in proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["totals"]["ok"] == 5
    assert manifest["ray"]["mode"] == "gpu" and manifest["ray"]["gpus"] == 0  # none when the job started
    nodes = {n["node_id"]: n for n in cluster.list_nodes()}
    added = [n for n in nodes.values() if not n["is_head_node"]]
    assert added and all(n["resources_total"].get("GPU", 0) >= 1 for n in added)  # the autoscaler added GPU nodes
    actors = manifest["timings"]["sam_actors"]
    assert actors and all(a["images"] > 0 for a in actors.values())
    for actor in actors.values():  # SAM ran on a node the autoscaler added, with its GPU, not on the head
        node = nodes[actor["node"]]
        assert not node["is_head_node"] and node["resources_total"]["GPU"] >= 1, node
    # Where the storage options did not go: Ray's listings of tasks and actors, and its logs.
    for kind in ("tasks", "actors"):
        listing = cluster.ray_cli("list", kind, "--address", cluster.dashboard, "--format", "json", "--detail", "--limit", "10000")
        assert listing.returncode == 0 and len(json.loads(listing.stdout)) > 0, listing.stderr[-2000:]
        assert token not in listing.stdout, f"the storage options appear in `ray list {kind}`"
    # every node's logs: the nodes the autoscaler started share the head's temp folder
    logs = [p for p in Path(cluster.node("head").temp_dir).rglob("*") if p.is_file() and not p.is_symlink()]
    assert any("worker" in p.name for p in logs), [str(p) for p in logs][:20]
    assert not [p for p in logs if token.encode() in p.read_bytes()], "the storage options reached a Ray log"
    assert token.encode() not in (out / "run.json").read_bytes()
