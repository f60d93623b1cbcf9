"""The processes a test session started, found by a marker they all inherit.

conftest.py puts ``AUTOLABEL_TEST_SESSION=<this session's temporary folder>`` in the environment
before any test runs; every process started from then on inherits it: subprocesses, a local Ray's
raylet and workers, ``ray start`` nodes (cluster_harness passes the environment on) and the jobs
they run. A process is this session's when its initial environment (``/proc/PID/environ``) holds
that exact line, so processes of other sessions on the same machine are never seen.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

SESSION_ENV = "AUTOLABEL_TEST_SESSION"


def started_by(session: str) -> list[int]:
    """Live processes (zombies are dead) whose environment marks them as ``session``'s, but this one."""
    needle = f"{SESSION_ENV}={session}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if alive(int(entry)):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def using(folder: str) -> list[int]:
    """Processes whose working folder, stdout or stderr lies under ``folder``: for a Ray node's
    own ``--temp-dir``, its raylet and workers (their output goes to the session's log files) and
    the jobs it runs (their working_dir is unpacked there), whichever session they are in."""
    root = os.path.realpath(folder)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for link in ("cwd", "fd/1", "fd/2"):
            try:
                target = os.readlink(f"/proc/{entry}/{link}")
            except OSError:
                continue
            if (target == root or target.startswith(root + os.sep)) and alive(int(entry)):
                found.append(int(entry))
                break
    return found


def describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return f"pid {pid} (gone)"
    return f"pid {pid}: {command[:200]} (cwd {cwd})"


def left_behind(session: str, grace_s: float = 30.0) -> list[str]:
    """The session's processes still alive after ``grace_s`` seconds (what was stopped may take a
    moment to exit), described, then killed: each is proven ours by its marker."""
    deadline = time.time() + grace_s
    while (pids := started_by(session)) and time.time() < deadline:
        time.sleep(0.5)
    described = [describe(pid) for pid in pids]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return described
