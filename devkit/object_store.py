"""An S3-compatible server on loopback (moto) with the two things a real object store adds: latency per
request, and failures. For the object-store tests and the object-store read benchmark.

Each request waits `latency_s` before it is answered, on its own server thread, so concurrent requests
overlap as they do against a real store. `fail` decides, per GET, whether to answer with an error instead
(503 SlowDown, the throttling answer, or a 500); it sees the request path and how many GETs came before.
`loopback_s3(process=True)` runs the server in a child process (`ProcessS3`, latency and counts through a
control path, no `fail` rules): the benchmarks use it so the store's CPU does not share the reader's
interpreter lock.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CONTROL = "/_lf/"  # the benchmark's controls of a server in another process: latency, stats
FailRule = Callable[[str, int], int | None]  # (path, GET number) -> HTTP status to fail with, or None

_ERRORS = {503: (b"SlowDown", b"Please reduce your request rate."),
           500: (b"InternalError", b"We encountered an internal error. Please try again.")}


@dataclass
class StoreStats:
    """What the server saw: GET requests (by path), the bytes of ranged answers and the most GETs in
    flight at once."""

    gets: list[str] = field(default_factory=list)
    range_bytes: int = 0
    failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Middleware:
    def __init__(self, app: Any, server: LoopbackS3) -> None:
        self.app, self.server = app, server

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "").startswith(_CONTROL):  # no S3 bucket name starts with "_"
            return self.server.control(environ["PATH_INFO"][len(_CONTROL):], start_response)
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
            if not status and get and environ.get("HTTP_RANGE"):
                ranged = _range_response(environ, start_response, self.server.objects)
                if ranged is not None:
                    with stats.lock:
                        stats.range_bytes += ranged[0]
                    return ranged[1]
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


def _range_response(environ: dict[str, Any], start_response: Any,
                    objects: _ObjectMemory) -> tuple[int, Iterable[bytes]] | None:
    """Answer `GET /bucket/key` with `Range: bytes=a-b` from the object's bytes held in memory.

    moto itself reads (and copies) the whole object from its spooled temporary file for every range
    request: 60 MB per request for a cache shard file, far more CPU than the request costs a real store,
    and it would measure moto rather than the reader (reading the range from that file still took a third
    of a request's time). A real store serves hot objects from memory; so does this one, keyed by the
    object's ETag, so an overwritten object is never served stale. The answer is the one S3 gives (206,
    Content-Range, ETag, Last-Modified). Anything else (a suffix range, an unknown key) is left to moto,
    which answers it, errors included. The bytes go from the object's memory straight to the socket
    (after the server has sent the headers): the WSGI server writes only `bytes`, and cutting a 32 MB
    range into new memory per request (page faults and a copy) cost this server more CPU than sending
    it, as a real store's sendfile does not. Returns (bytes answered, the response body)."""
    from urllib.parse import unquote

    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    unit, _, spec = environ["HTTP_RANGE"].partition("=")
    first, _, last = spec.partition("-")
    bucket, _, key = unquote(environ.get("PATH_INFO", "")).lstrip("/").partition("/")
    if unit != "bytes" or not first.isdigit() or not last.isdigit() or not key:
        return None
    try:
        obj = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(bucket, key)
    except Exception:  # noqa: BLE001 - moto's own answer (NoSuchKey...) is the right one
        return None
    if obj is None:
        return None
    begin, end = int(first), min(int(last), obj.size - 1)
    if begin > end:
        return None
    data = objects.slice(bucket, key, obj, begin, end + 1)
    start_response("206 Partial Content", [
        ("Content-Type", "binary/octet-stream"), ("Content-Length", str(len(data))), ("Accept-Ranges", "bytes"),
        ("Content-Range", f"bytes {begin}-{end}/{obj.size}"), ("ETag", obj.etag),
        ("Last-Modified", obj.last_modified_RFC1123)])
    sock = environ.get("werkzeug.socket")
    if sock is None:
        return len(data), [bytes(data)]

    def body() -> Iterator[bytes]:
        yield b""  # the server sends the status line and headers before it asks for more
        sock.sendall(data)

    return len(data), body()


class _ObjectMemory:
    """Stored objects' bytes by (bucket, key), read from moto once per ETag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[tuple[str, str], tuple[str, bytes]] = {}

    def slice(self, bucket: str, key: str, obj: Any, begin: int, end: int) -> memoryview:
        with self._lock:
            etag, blob = self._blobs.get((bucket, key), ("", b""))
            if etag != obj.etag:
                with obj.lock:
                    obj._value_buffer.seek(0)
                    blob = obj._value_buffer.read()
                self._blobs[(bucket, key)] = (obj.etag, blob)
        return memoryview(blob)[begin:end]


class LoopbackS3:
    """A moto S3 server on 127.0.0.1 with injectable latency and failures; `endpoint` for fsspec."""

    def __init__(self) -> None:
        self.latency_s = 0.0
        self.fail: FailRule | None = None
        self.stats = StoreStats()
        self.objects = _ObjectMemory()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackS3:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
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

    def control(self, what: str, start_response: Any) -> list[bytes]:
        """`latency/<seconds>` sets the latency; `stats` answers the counts as JSON and starts afresh."""
        if what.startswith("latency/"):
            self.latency_s = float(what.split("/", 1)[1])
            body = b"{}"
        else:
            old = self.reset_stats()
            body = json.dumps({"gets": old.gets, "failed": old.failed, "max_in_flight": old.max_in_flight,
                               "range_bytes": old.range_bytes}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()


class ProcessS3:
    """A `LoopbackS3` in a child process, driven like one (`endpoint`, `latency_s`, `reset_stats`; no
    `fail` rules): for benchmarks, so the store's CPU work (moto, the HTTP server) does not share the
    reader's interpreter lock, as a real store's never does."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self._proc = subprocess.Popen([sys.executable, "-m", "latentforge.devkit.object_store"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.endpoint = self._proc.stdout.readline().strip()
        if not self.endpoint.startswith("http://"):
            self.stop()
            raise RuntimeError("the loopback S3 server process did not start")
        self._latency = 0.0

    def _ask(self, what: str) -> bytes:
        from urllib.request import urlopen

        with urlopen(f"{self.endpoint}{_CONTROL}{what}", timeout=30) as answer:
            return answer.read()

    @property
    def latency_s(self) -> float:
        return self._latency

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self._ask(f"latency/{value}")
        self._latency = value

    def reset_stats(self) -> StoreStats:
        got = json.loads(self._ask("stats"))
        return StoreStats(gets=got["gets"], failed=got["failed"], max_in_flight=got["max_in_flight"],
                          range_bytes=got["range_bytes"])

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server process has used so far; None where /proc is missing."""
        try:
            fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()  # the child exits when its stdin closes
        try:
            self._proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a child that does not exit is killed
            self._proc.kill()


@contextmanager
def loopback_s3(process: bool = False) -> Iterator[LoopbackS3 | ProcessS3]:
    """A started `LoopbackS3` (in this process, or with `process` in a child process), stopped on exit.
    Credentials are the caller's (moto accepts any)."""
    server: LoopbackS3 | ProcessS3 = ProcessS3() if process else LoopbackS3().start()
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


if __name__ == "__main__":  # the child of `ProcessS3`: serve until stdin closes
    import sys

    child = LoopbackS3().start()
    print(child.endpoint, flush=True)
    sys.stdin.read()
    child.stop()
