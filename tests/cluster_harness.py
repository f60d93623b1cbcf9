"""A real multi-node Ray cluster on loopback, for tests: ``ray start`` processes, one per node.

Each node has its own ports and ``--temp-dir``; worker nodes may declare GPUs they do not have
(``--num-gpus 2``): Ray schedules on declared resources and sets ``CUDA_VISIBLE_DEVICES``, torch
sees no CUDA, so the models run on the CPU. Workers are started one at a time (a raylet must
register within 30 s, hard to meet on 2 busy cores when several start at once). Token auth is
set on every node and handed to the drivers (``env``), as ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``
must be in the environment before ``import ray``.

A killed node is declared dead after ``health_check_failure_threshold`` (5) failed health checks
of the GCS in a row; a dead raylet fails each at once, so the wait is 5 periods. The period is
1 s here instead of Ray's 3 s (``HEALTH_CHECK_PERIOD_MS``): tests that kill a node wait about
5 s instead of 15 s for Ray to notice. A raylet that is only slow still has 5 checks of Ray's
10 s timeout each to answer, as by default.

Each node is ``ray start --block`` in a session of its own; the cluster is stopped by signalling
those processes, then killing whatever is left in their sessions: never ``ray stop`` (it kills
every Ray on the machine), never ``ray.cluster_utils`` (its shutdown runs ``ray stop --force``,
and it registers itself as the machine's default cluster).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from session_processes import alive, using

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 300_000_000  # per node (Ray's default is 30% of the machine's memory, per node)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an http_proxy
HEALTH_CHECK_PERIOD_MS = 1000  # how often the GCS checks each node (Ray's default: 3000); see above

# Ports every node opens; each node gets its own free ones (the head also its GCS and dashboard).
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
                   "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Node:
    name: str
    process: subprocess.Popen  # `ray start --block`, leader of its own session
    node_manager_port: int
    temp_dir: str
    log: Path
    num_cpus: int
    num_gpus: int
    node_id: Optional[str] = None  # Ray's id, once it registered

    def pids(self) -> list[int]:
        """Every process of this node: the ones `ray start` started and their workers (its
        session), and anything else that works in or logs to its temp dir (a job's driver runs
        in a session of its own)."""
        return sorted(p for p in set(_session_pids(self.process.pid)) | set(using(self.temp_dir)) if alive(p))

    def raylet_pid(self) -> int:
        (pid,) = [p for p in self.pids() if _process_name(p) == "raylet"]
        return pid


@dataclass
class LoopbackCluster:
    root: Path
    env: dict = field(default_factory=dict)  # for drivers and `ray` commands: token auth included
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    node_env: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The GCS address, for ``ray.address`` / ``ray.init``."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard address, for ``ray job submit`` and ``ray list``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(cls, root: Path, head_cpus: int = 2, workers: tuple[tuple[int, int], ...] = ((4, 2), (4, 2)),
              env: Optional[dict] = None, node_env: Optional[dict[str, dict]] = None, timeout_s: float = 120,
              gcs_port: Optional[int] = None, head_args: tuple[str, ...] = ()) -> "LoopbackCluster":
        """A head (``head_cpus`` CPUs, no GPU) and one worker node per ``(cpus, gpus)``, named
        head, worker1, worker2 ...; ``env`` for every node and driver, ``node_env`` for one node
        (by name) only, as each machine of a real cluster has its own environment. ``gcs_port``
        and ``head_args`` (e.g. an ``--autoscaling-config`` that must name the port): for the head."""
        root.mkdir(parents=True, exist_ok=True)
        cluster = cls(root)
        cluster.node_env = node_env or {}
        merged = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                  "RAY_USAGE_STATS_ENABLED": "0",
                  "RAY_health_check_period_ms": str(HEALTH_CHECK_PERIOD_MS)}
        cluster.env = {k: v for k, v in merged.items() if v is not None}  # None in ``env``: unset
        try:
            cluster.gcs_port, cluster.dashboard_port = gcs_port or free_port(), free_port()
            cluster._start_node("head", head_cpus, 0, ["--head", "--port", str(cluster.gcs_port), "--dashboard-host", "127.0.0.1",
                                                       "--dashboard-port", str(cluster.dashboard_port),
                                                       "--ray-client-server-port", str(free_port()), *head_args], timeout_s)
            for i, (cpus, gpus) in enumerate(workers, 1):
                cluster.add_worker(cpus, gpus, f"worker{i}", timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def add_worker(self, cpus: int, gpus: int, name: Optional[str] = None, timeout_s: float = 120) -> Node:
        return self._start_node(name or f"worker{len(self.nodes)}", cpus, gpus, ["--address", self.address], timeout_s)

    def _start_node(self, name: str, cpus: int, gpus: int, role_args: list[str], timeout_s: float) -> Node:
        temp_dir = tempfile.mkdtemp(prefix=f"ray-{name[:8]}-", dir="/tmp")  # short: Ray's unix sockets live under it
        log = self.root / f"{name}.log"
        nm_port = free_port()
        # A resource named after the node tells the nodes apart in Ray's listings (all share one IP).
        cmd = [RAY, "start", "--block", *role_args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
               "--num-gpus", str(gpus), "--resources", json.dumps({self.tag(name): 1}),
               "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", temp_dir, "--disable-usage-stats",
               *(a for flag in NODE_PORT_FLAGS for a in (flag, str(nm_port if flag == "--node-manager-port" else free_port())))]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env={**self.env, **self.node_env.get(name, {})}, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = Node(name, proc, nm_port, temp_dir, log, cpus, gpus)
        self.nodes.append(node)
        deadline = time.time() + timeout_s
        while True:
            assert proc.poll() is None, f"ray start for {name} exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"{name} did not join in {timeout_s:.0f} s: {log.read_text()[-3000:]}"
            alive = [n for n in self.list_nodes() if n["state"] == "ALIVE" and self.tag(name) in n["resources_total"]]
            if alive:
                node.node_id = alive[0]["node_id"]
                return node
            time.sleep(0.25)

    @staticmethod
    def tag(name: str) -> str:
        return f"loopback_node_{name}"

    def name_of(self, node_id: str) -> Optional[str]:
        return next((n.name for n in self.nodes if n.node_id == node_id), None)

    def _dashboard_up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.dashboard_port), timeout=1).close()
            return True
        except OSError:
            return False

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def state_api(self, resource: str, limit: int) -> list[dict]:
        """What ``ray list RESOURCE --detail --format json`` prints, made in this process: the
        dashboard's state API (``/api/v0/``, the endpoint that command reads) asked over HTTP with
        the cluster's token, each row through Ray's own schema as the command does (typed values,
        then ``humanify``). The command itself starts a Python that imports Ray: 2-3 s of a busy
        core per call, which polling a node as it joins takes from that node."""
        from ray.util.state.common import StateResource, dict_to_state, resource_to_schema

        query = urllib.parse.urlencode({"limit": limit, "detail": 1, "timeout": 30})
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{resource}?{query}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with _NO_PROXY.open(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["result"], answer.get("msg")
        kind = StateResource(resource)
        schema = resource_to_schema(kind)
        return json.loads(json.dumps([schema.humanify(dict_to_state(row, kind).asdict()) for row in answer["data"]["result"]["result"]]))

    def list_nodes(self) -> list[dict]:
        """Every node the cluster knows, alive or dead (Ray's state API); [] while it cannot answer."""
        if not self._dashboard_up():
            return []
        try:
            return self.state_api("nodes", 1000)
        except (OSError, AssertionError, ValueError, KeyError):  # the dashboard still starting, or the head registering
            return []

    def list_actors(self) -> list[dict]:
        """Every actor of the cluster (dead ones too, as the GCS keeps them): class, node, state."""
        return self.state_api("actors", 10000)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill_raylet(self, name: str) -> int:
        """SIGKILL a node's raylet (the node's scheduler and object store; its workers die with it)."""
        pid = self.node(name).raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        """Workers first, then the head: SIGTERM to each `ray start --block` (it stops what it
        started), then SIGKILL to anything of that node still there (``Node.pids``), until none
        is left: a raylet still alive during one pass may start a worker the pass did not see."""
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.time() + 5  # then whatever is left is killed
        for node in reversed(self.nodes):
            try:
                node.process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            for _ in range(40):
                node.process.poll()  # reaps it once it died
                pids = node.pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.25)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
