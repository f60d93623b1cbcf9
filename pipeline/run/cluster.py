"""How the job uses a Ray cluster: connecting to it, and the actor plan.

The plan does not depend on what happens to be up when the job starts. On a GPU cluster the SAM
and detector pools are Ray Data autoscaling pools: they start with the GPUs free now (at least
one: on a shared cluster other jobs may hold some), ask Ray for more actors as their queues
fill, and so use GPUs that are freed or GPU nodes that join later (an autoscaler sees the
pending GPU demand and adds nodes); idle actors are let go. A cluster with no GPU yet is asked
for one and waited for (``ray.gpu_wait_s``), with a log line saying so, and the job fails
clearly if none comes; a cluster that loses every GPU mid-run is waited for as long, then the
job fails resumably (``GpuWatch``). SAM runs on CPUs only when asked (``sam.device=cpu``) or on
a local Ray started on a machine without GPUs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator, Optional

from pipeline.config import ConfigError, RunConfig

log = logging.getLogger("autolabel")

SAM_GPU_SHARE, DETECTOR_GPU_SHARE = 0.75, 0.25  # one SAM actor and one detector actor per GPU


def connect_ray(cfg: RunConfig) -> bool:
    """Join ``ray.address`` / ``RAY_ADDRESS``, or start Ray in this process. True when this
    process started it (its resources are this machine's: no autoscaler can add any)."""
    import ray

    if ray.is_initialized():
        return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def check_device(cfg: RunConfig) -> None:
    """``sam.device=cuda:N`` names one GPU of a machine; in a Ray job each actor sees only the
    GPU Ray gave it (as ``cuda``), so an index would point at nothing."""
    for key, device in (("sam.device", cfg.sam.device), ("detector.device", cfg.detector.device)):
        if device.startswith("cuda:"):
            raise ConfigError(f"{key}={device}: in a Ray job every actor gets its own GPU from Ray and sees it as "
                              f"'cuda'; use {key}=cuda (or auto). A GPU index only means something for `autolabel predict`.")


def actor_plan(cfg: RunConfig, local: bool) -> dict:
    """Pool sizes and per-actor resources.

    GPU: one SAM actor (0.75 GPU) and one detector actor (0.25 GPU) per GPU, pools from
    ``min_size`` (the GPUs free now, at least 1: the job must not wait for GPUs other jobs hold)
    up to ``max_size`` (``ray.gpus``, or None: as many as the cluster gets);
    ``ray.sam_actors`` / ``ray.detector_actors`` fix a size instead.
    CPU: fractional CPUs, so both actor pools and the read/sink tasks fit on a 2-core box (no
    deadlock), while SAM, by far the slowest stage there, runs torch on the node's cores.
    """
    import ray

    resources = ray.cluster_resources()
    gpus_now = int(resources.get("GPU", 0))
    gpus_free = int(ray.available_resources().get("GPU", 0))  # whole GPUs no other job holds
    cpus = resources.get("CPU", 1)
    on_cpu = cfg.sam.device.startswith("cpu") or (
        cfg.sam.device == "auto" and local and not gpus_now and cfg.ray.gpus == "auto")
    if on_cpu:
        per_actor = 0.5 if cpus <= 4 else max(1, int(cpus // 4))
        sam_actors = cfg.ray.sam_actors or 1
        return dict(
            mode="cpu", local=local, why="sam.device=cpu" if cfg.sam.device.startswith("cpu") else "no GPU on this machine",
            gpus=gpus_now, cpus=cpus, decode_threads=max(1, min(4, int(cpus // 2))),
            sam=_pool(sam_actors, sam_actors, num_gpus=0, num_cpus=per_actor, cpu_threads=max(1, int(cpus // sam_actors))),
            detector=_pool(cfg.ray.detector_actors or 1, cfg.ray.detector_actors or 1, num_gpus=0, num_cpus=per_actor),
        )
    cap: Optional[int] = None if cfg.ray.gpus == "auto" else int(cfg.ray.gpus)
    start = max(1, min(gpus_free, cap) if cap else gpus_free)
    sam = (cfg.ray.sam_actors, cfg.ray.sam_actors) if cfg.ray.sam_actors else (start, cap)
    # The detector pool starts with one actor and grows into the 0.25 GPU left beside each SAM
    # actor: Ray places fractional GPUs first fit, so a full detector pool started first would put
    # two detectors on one GPU and leave no GPU with 0.75 free for a SAM actor.
    detector = (cfg.ray.detector_actors, cfg.ray.detector_actors) if cfg.ray.detector_actors else (1, sam[1])
    return dict(
        mode="gpu", local=local, gpus=gpus_now, gpus_free=gpus_free, cpus=cpus, decode_threads=4,
        sam=_pool(*sam, num_gpus=SAM_GPU_SHARE, num_cpus=1),
        detector=_pool(*detector, num_gpus=DETECTOR_GPU_SHARE, num_cpus=1),
    )


def _pool(min_size: int, max_size: Optional[int], **resources) -> dict:
    return dict(min_size=min_size, max_size=max_size, **resources)


def describe(plan: dict, uses_detector: bool) -> str:
    """One log line: what each pool asks for, and from what."""
    def size(pool: dict) -> str:
        if pool["min_size"] == pool["max_size"]:
            return str(pool["min_size"])
        return f"{pool['min_size']}-{pool['max_size'] or 'any'}"

    detector = f"detector {size(plan['detector'])}, " if uses_detector else ""
    if plan["mode"] == "cpu":
        return f"actors: {detector}SAM {size(plan['sam'])} on CPUs ({plan['why']}; cluster: {plan['cpus']} CPUs)"
    return (f"actors: {detector}SAM {size(plan['sam'])} ('any': as many as GPUs join), {SAM_GPU_SHARE} GPU each "
            f"(cluster: {plan['cpus']} CPUs, {plan['gpus']} GPUs now, {plan['gpus_free']} of them free)")


def sam_device_type(cfg: RunConfig, plan: dict) -> str:
    """Where the SAM actors run: cuda on the GPU plan (unless sam.device says otherwise)."""
    if cfg.sam.device != "auto":
        return cfg.sam.device.split(":")[0]
    return "cuda" if plan["mode"] == "gpu" else "cpu"


def actors_timed_out(exc: BaseException) -> bool:
    """Ray Data's error when a pool's first actors could not start in time (no resources)."""
    text = f"{type(exc).__name__}: {exc}"
    return "Timed out while starting actors" in text


@contextlib.contextmanager
def run_data_context() -> Iterator:
    """Ray Data's settings for one run: a copy of this process's ``DataContext`` is current while
    the run builds and runs its dataset, and the process's own is put back after it (and the level
    of Ray Data's progress logger), so a Python API user's process keeps its settings."""
    import ray

    saved = ray.data.DataContext.get_current()
    progress_log = logging.getLogger("ray.data._internal.progress")
    level = progress_log.level
    ray.data.DataContext._set_current(saved.copy())
    try:
        yield ray.data.DataContext.get_current()
    finally:
        ray.data.DataContext._set_current(saved)
        progress_log.setLevel(level)


class GpusLost(RuntimeError):
    """The cluster had no GPU left for ``ray.gpu_wait_s`` while the job ran."""


class GpuWatch:
    """A Ray Data execution callback (``DataContext.custom_execution_callback_classes``) for a
    GPU plan. Ray restarts the actors of a lost node without limit and waits for resources for
    them, so a cluster that lost every GPU node would wait forever. This looks at the cluster's
    GPUs every few seconds from the executor's loop; after ``wait_s`` without any it fails the
    execution, and with it the run, which stays resumable."""

    def __init__(self, wait_s: float, every_s: float = 2.0):
        self.wait_s, self.every_s = wait_s, every_s
        self.checked = 0.0
        self.gone_since: Optional[float] = None

    def on_execution_step(self, executor) -> None:
        now = time.monotonic()
        if now - self.checked < self.every_s:
            return
        self.checked = now
        try:
            import ray

            gpus = ray.cluster_resources().get("GPU", 0)
        except Exception:  # noqa: BLE001 - the GCS busy or restarting: ask again at the next check
            return
        if gpus > 0:
            if self.gone_since is not None:
                log.warning("GPUs are back in the cluster (%g); the job goes on", gpus)
            self.gone_since = None
        elif self.gone_since is None:
            self.gone_since = now
            log.warning("the cluster has no GPU left (its GPU nodes are gone); waiting up to %d s (ray.gpu_wait_s) for "
                        "GPU nodes to come back", self.wait_s)
        elif now - self.gone_since >= self.wait_s:
            raise GpusLost(f"the cluster lost every GPU and none came back within ray.gpu_wait_s={self.wait_s} s "
                           "(once GPU nodes are back, the same command resumes the run)")

    def before_execution_starts(self, executor) -> None:
        pass

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error) -> None:
        pass
