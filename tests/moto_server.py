"""moto's S3 server as a real process on loopback (the protocol s3fs and boto3 speak), for tests
that need an object store: started on a free port, its request log kept, stopped by its PID.

``start_moto(folder, preload=...)`` runs the same server (moto's ThreadedMotoServer, the
werkzeug app ``moto_server`` runs) from this file, after putting many objects straight into its
S3 backend: 20,000 keys take a second that way and over a minute as PUT requests. Everything
the test then does goes over HTTP, as against any S3.

    python tests/moto_server.py PORT PRELOAD_JSON   # {"bucket": [[key_format, count, body], ...]}
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

VENV_BIN = Path(sys.executable).parent

KEY = "AKIAAUTOLABELMOTO0001"
SECRET = "autolabel-moto-secret-not-real"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoS3:
    process: subprocess.Popen
    endpoint: str
    log: Path

    @property
    def options(self) -> dict:
        """fsspec/s3fs storage options for this server."""
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET}

    @property
    def env(self) -> dict:
        """The same, as a node's environment gives it (botocore reads AWS_ENDPOINT_URL)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                            region_name="us-east-1")

    def requests(self, method: str, path: str) -> int:
        """How many ``METHOD /path`` requests the server has logged (query strings included)."""
        needle = f'"{method} {path}'
        return sum(1 for line in self.log.read_text(errors="replace").splitlines() if needle in line)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_moto(folder: Path, preload: Optional[dict] = None) -> MotoS3:
    """``preload``: {bucket: [(key_format, count, body), ...]}, keys ``key_format.format(i)``."""
    port = free_port()
    log = folder / "moto.log"
    if preload:
        cmd = [sys.executable, __file__, str(port), json.dumps(preload)]
    else:
        cmd = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as fh:
        process = subprocess.Popen(cmd, stdout=fh, stderr=fh)
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return MotoS3(process, f"http://127.0.0.1:{port}", log)
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)


def _serve_preloaded(port: int, preload: dict) -> None:
    import signal

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for bucket, groups in preload.items():
        backend.create_bucket(bucket, "us-east-1")
        for key_format, count, body in groups:
            for i in range(count):
                backend.put_object(bucket, key_format.format(i), body.encode())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=True)
    server.start()  # the port answers only now, with every object in place
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


if __name__ == "__main__":
    signal_mask = __import__("signal")
    signal_mask.pthread_sigmask(signal_mask.SIG_BLOCK, {signal_mask.SIGTERM, signal_mask.SIGINT})
    _serve_preloaded(int(sys.argv[1]), json.loads(sys.argv[2]))
