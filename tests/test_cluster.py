"""``ray job submit`` of jobs/autolabel.py to a real head node started by the test on loopback."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, VENV_BIN, run_overrides
from pipeline import masks as mask_codec

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A one-node cluster as `ray start --head` makes it, with token auth (Ray's default).

    Started with --block and stopped by signalling that process: `ray stop` would also kill
    every other Ray on the machine, the test session's own included.
    """
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    address = f"http://127.0.0.1:{dashboard}"
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
            # every port of its own, so it never collides with the test session's local Ray
            *(arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                               "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port",
                               "--object-manager-port") for arg in (flag, str(_free_port()))),
            "--temp-dir", temp_dir, "--disable-usage-stats",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, timeout=60).returncode:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the head node did not come up in 180 s"
            time.sleep(2)
        yield env, address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
