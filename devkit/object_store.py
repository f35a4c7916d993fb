"""An S3-compatible server on loopback (moto) with the two things a real object store adds: latency per
request, and failures. For the object-store tests and the object-store read benchmark.

Each request waits `latency_s` before it is answered, on its own server thread, so concurrent requests
overlap as they do against a real store. `fail` decides, per GET, whether to answer with an error instead
(503 SlowDown, the throttling answer, or a 500); it sees the request path and how many GETs came before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

FailRule = Callable[[str, int], int | None]  # (path, GET number) -> HTTP status to fail with, or None

_ERRORS = {503: (b"SlowDown", b"Please reduce your request rate."),
           500: (b"InternalError", b"We encountered an internal error. Please try again.")}


@dataclass
class StoreStats:
    """What the server saw: GET requests (by path) and the most GETs in flight at once."""

    gets: list[str] = field(default_factory=list)
    failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Middleware:
    def __init__(self, app: Any, server: LoopbackS3) -> None:
        self.app, self.server = app, server

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        stats, get = self.server.stats, environ["REQUEST_METHOD"] == "GET"
        with stats.lock:
            n = len(stats.gets)
            if get:
                stats.gets.append(environ.get("PATH_INFO", ""))
                stats.in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if self.server.latency_s:
                time.sleep(self.server.latency_s)
            status = self.server.fail(environ.get("PATH_INFO", ""), n) if get and self.server.fail else None
            if status:
                with stats.lock:
                    stats.failed += 1
                code, message = _ERRORS.get(status, _ERRORS[500])
                start_response(f"{status} {code.decode()}", [("Content-Type", "application/xml")])
                return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + code + b"</Code><Message>" + message
                        + b"</Message></Error>"]
            return self.app(environ, start_response)
        finally:
            if get:
                with stats.lock:
                    stats.in_flight -= 1


class LoopbackS3:
    """A moto S3 server on 127.0.0.1 with injectable latency and failures; `endpoint` for fsspec."""

    def __init__(self) -> None:
        self.latency_s = 0.0
        self.fail: FailRule | None = None
        self.stats = StoreStats()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackS3:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = _Middleware(DomainDispatcherApplication(create_backend_app), self)
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reset_stats(self) -> StoreStats:
        """Start counting afresh; returns the old counts."""
        old, self.stats = self.stats, StoreStats()
        return old

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()


@contextmanager
def loopback_s3() -> Iterator[LoopbackS3]:
    """A started `LoopbackS3`, stopped on exit. Credentials are the caller's (moto accepts any)."""
    server = LoopbackS3().start()
    try:
        yield server
    finally:
        server.stop()


def upload_tree(endpoint: str, local: str, url: str) -> None:
    """Copy a local folder (a cache) to `url` (s3://bucket/prefix) on the loopback server."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(local.rstrip("/") + "/", url.removeprefix("s3://"), recursive=True)
