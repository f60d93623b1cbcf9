"""``ray job submit`` of jobs/autolabel.py to a real head node started by the test on loopback."""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster_harness import LoopbackCluster
from conftest import REPO, VENV_BIN, run_overrides
from pipeline.sam import masks as mask_codec

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head(tmp_path):
    """A one-node cluster as `ray start --head` makes it, with token auth (Ray's default), started
    and stopped by the loopback harness (by its own processes: never `ray stop`)."""
    cluster = LoopbackCluster.start(tmp_path / "head", head_cpus=2, workers=())
    try:
        yield cluster.env, cluster.dashboard
    finally:
        cluster.stop()


def test_ray_job_submit_writes_the_same_output(ray_head, labeled, checkpoints, photo_folder, tmp_path):
    env, address = ray_head
    out = tmp_path / "submitted"
    # The entry point runs on the head with the head's Python; the cluster image of infra/ has
    # the package installed the same way.
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
        str(VENV_BIN / "python"), "jobs/autolabel.py", *run_overrides(photo_folder, out, checkpoints),
    ]
    for _ in range(30):  # the job agent can come up a little after the dashboard answers
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "autolabel run finished" in proc.stdout
    assert "succeeded" in proc.stdout + proc.stderr

    mine = pq.read_table(out / "objects").to_pandas().sort_values(["image_id", "object_id"]).reset_index(drop=True)
    ref = labeled["objects"].sort_values(["image_id", "object_id"]).reset_index(drop=True)
    assert list(mine["image_id"]) == list(ref["image_id"]) and list(mine["object_id"]) == list(ref["object_id"])
    np.testing.assert_allclose(np.stack(mine["box"]), np.stack(ref["box"]), atol=1e-3)
    for a, b in zip(mine["mask"], ref["mask"]):
        assert mask_codec.iou(mask_codec.decode(a), mask_codec.decode(b)) >= 0.99
    images = pq.read_table(out / "images").to_pandas().sort_values("image_id")
    expected = labeled["images"].sort_values("image_id")
    assert list(images["status"]) == list(expected["status"]) and list(images["num_objects"]) == list(expected["num_objects"])
