"""Surviving worker crashes: a ledger that finds the image which keeps killing its worker.

Ray restarts a dead actor and retries its task (and re-runs a dead task), which is right for a
lost node but loops forever on an image that crashes the process every time (a codec segfault,
a kernel that brings the CUDA context down). Before each image a stage tells the ledger "I am
starting image X", and after the batch "done". An image found still in flight when it is
started again was being processed when a worker died; after ``ray.max_image_crashes`` such
deaths it is not tried again but becomes an error row of class ``worker_crash``.

The ledger is one tiny actor per run (no CPU, in memory): a resumed run starts a fresh count.

Also here, and only for tests: ``AUTOLABEL_TEST_FAULTS``, a JSON object read by the stages to
cause faults that cannot be caused on demand otherwise (see ``InjectedFaults``). Never set it in
production.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from pipeline.errors import ImageError

log = logging.getLogger(__name__)

WORKER_CRASH = "worker_crash"
TEST_FAULTS_ENV = "AUTOLABEL_TEST_FAULTS"


class CrashLedger:
    """Which images are in flight, and how many times a worker died holding each one."""

    def __init__(self):
        self.in_flight: set[str] = set()
        self.crashes: Counter = Counter()

    def begin(self, keys: list[str], finished: list[str] = ()) -> list[int]:
        """Mark ``keys`` in flight (and ``finished`` done); return how often each crashed a worker."""
        self.in_flight.difference_update(finished)
        for key in keys:
            if key in self.in_flight:
                self.crashes[key] += 1
            self.in_flight.add(key)
        return [self.crashes[key] for key in keys]

    def end(self, keys: list[str]) -> None:
        self.in_flight.difference_update(keys)

    def crashed(self) -> dict[str, int]:
        """``stage:uri`` -> worker deaths with that image in flight (batch keys left out)."""
        return {key: n for key, n in self.crashes.items() if ":batch-" not in key}


def start_ledger():
    """The run's ledger actor: no CPU (it must never wait for one), restarted if its node dies."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(CrashLedger).remote()


class CrashGuard:
    """A stage's view of the ledger, one call per batch: ``start_batch`` before a batch (True:
    process it as a whole), and only when a worker already died on that very batch, ``start``
    before each of its images, one at a time, so the image responsible is found; ``done`` after
    (not waited for: the ledger executes one caller's calls in order)."""

    def __init__(self, ledger, stage: str, max_crashes: int):
        self.ledger = ledger
        self.stage = stage
        self.max_crashes = max_crashes
        self.current: list[str] = []

    def _begin(self, uris: list[str]) -> list[int]:
        if self.ledger is None:
            return [0] * len(uris)
        import ray

        keys = [f"{self.stage}:{u}" for u in uris]
        # Synchronous on purpose: the note must reach the ledger before the image can kill us.
        crashes = ray.get(self.ledger.begin.remote(keys, self.current))
        self.current = keys
        for uri, n in zip(uris, crashes):
            if uri.startswith("batch-"):
                if n:
                    log.warning("%s: a worker died on this batch before; processing it one image at a time", self.stage)
            elif n >= self.max_crashes:
                log.error("%s: %s crashed its worker %d times; recording it as a %s error row", self.stage, uri, n, WORKER_CRASH)
            elif n:
                log.warning("%s: retrying %s after %d worker crash(es) while it was in flight", self.stage, uri, n)
        return crashes

    def start_batch(self, uris: list[str]) -> bool:
        """Before processing ``uris`` together: True if they may go as one batch; False if a
        worker already died on this very batch (then call ``start`` before each image). A batch
        of one image is that image (its deaths count for it at once)."""
        import hashlib

        if len(uris) == 1:
            return False
        digest = hashlib.sha1("\n".join(sorted(uris)).encode()).hexdigest()
        return self._begin([f"batch-{digest}"])[0] == 0

    def start(self, uri: str) -> bool:
        """One image at a time (after ``start_batch`` said no): False when ``uri`` must not be
        tried again."""
        return self._begin([uri])[0] < self.max_crashes

    def done(self) -> None:
        if self.ledger is not None and self.current:
            self.ledger.end.remote(self.current)
        self.current = []

    def crash_error(self) -> ImageError:
        """What the images row says about an image that was not tried again."""
        return ImageError(WORKER_CRASH, f"the {self.stage} worker died {self.max_crashes} times while processing this image")


@dataclass
class InjectedFaults:
    """Test-only fault injection, from the ``AUTOLABEL_TEST_FAULTS`` environment variable.

    - ``kill``: ``{stage: text}``; that stage (``decode``, ``detect`` or ``segment``) SIGKILLs its
      own process when it starts an image whose URI contains the text: a poison image; ``track``
      when it has tracked a video frame whose URI (``VIDEO#frame=N``) contains it. The process
      death is real; only its trigger is artificial.
    - ``oom_uri``: the SAM decoder raises CUDA out-of-memory on every call for that image.
    - ``oom_over_prompts``: the SAM decoder raises CUDA out-of-memory when asked for more than
      this many prompts at once (a GPU running short of memory; CPUs cannot run out on demand).
    """

    kill: dict[str, str] = field(default_factory=dict)
    oom_uri: Optional[str] = None
    oom_over_prompts: Optional[int] = None

    @classmethod
    def from_env(cls) -> Optional["InjectedFaults"]:
        raw = os.environ.get(TEST_FAULTS_ENV)
        if not raw:
            return None
        faults = cls(**json.loads(raw))
        log.warning("TEST FAULT INJECTION ACTIVE (%s=%s)", TEST_FAULTS_ENV, raw)
        return faults

    def maybe_kill(self, stage: str, uri: str) -> None:
        if stage in self.kill and self.kill[stage] in uri:
            log.warning("test fault: SIGKILL of this %s worker (pid %d) on %s", stage, os.getpid(), uri)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_oom(self, uris: list, num_prompts: int) -> None:
        """Before a decoder call on prompts of the images ``uris``."""
        import torch

        if (self.oom_uri and any(u and self.oom_uri in u for u in uris)) or (
            self.oom_over_prompts is not None and num_prompts > self.oom_over_prompts
        ):
            raise torch.OutOfMemoryError(f"test fault: CUDA out of memory ({num_prompts} prompts at once)")
