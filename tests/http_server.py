"""A real HTTP server on loopback for tests: serves a folder (GET, HEAD, byte ranges, as object
stores and fsspec's HTTP filesystem use them), optionally only with basic auth and only with a
signed-looking query parameter, and logs every request path it received.

    with FolderServer(folder, user="u", password="p", signature="SIG") as server:
        server.url("data/m.jsonl")   # http://127.0.0.1:PORT/data/m.jsonl
"""
from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit


class FolderServer:
    def __init__(self, folder: Path, user: Optional[str] = None, password: Optional[str] = None,
                 signature: Optional[str] = None):
        self.folder = Path(folder)
        self.requests: list[tuple[str, str, int]] = []  # (method, path as received, status)
        wanted = None if user is None else "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                parts = urlsplit(self.path)
                target = (owner.folder / unquote(parts.path).lstrip("/")).resolve()
                if wanted is not None and self.headers.get("Authorization") != wanted:
                    status = 401
                elif signature is not None and signature not in parts.query:
                    status = 403
                elif not target.is_file() or owner.folder.resolve() not in target.parents:
                    status = 404
                else:
                    status = 200
                owner.requests.append((self.command, self.path, status))
                if status != 200:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = target.read_bytes()
                start, end = 0, len(data) - 1
                ranged = self.headers.get("Range", "").removeprefix("bytes=")
                if ranged:
                    first, _, last = ranged.partition("-")
                    start, end = int(first or 0), min(int(last) if last else end, end)
                self.send_response(206 if ranged else 200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end + 1])

            def do_GET(self):
                self._answer(True)

            def do_HEAD(self):
                self._answer(False)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def url(self, path: str = "") -> str:
        return f"http://{self.host}/{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FolderServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
