"""Ranged GETs from S3 over plain HTTP connections, received straight into reused buffers.

Why not s3fs's `cat_ranges` for the reads themselves: reading from the store is CPU-bound on the reader's
side, and s3fs (aiobotocore on aiohttp) spends 1.3 CPU-s per GB received (chunks read into new bytes
objects, then joined), this 0.3 (the socket copy into a reused buffer): measured on loopback, 16 MB ranges
(docs/benchmarks.md, "Object store"). Not obstore: its Rust runtime hangs in a forked child once the
parent has used it, and DataLoader workers are forked. Here every thing that holds state is made again
in a child: threads and connections are per process.

s3fs still does what it does well: it signs. Each object gets a presigned GET URL from s3fs (`fs.url`:
the same credentials, region, endpoint and addressing style the rest of the cache uses), kept for half
its lifetime and made again on a 403 (temporary credentials can expire before the URL does). A presigned
URL carries a signature, so it is never put into an error, a log line or anything returned: errors name
the status and the store's own code and message only. Where s3fs was set up in a way a bare URL cannot
carry (a proxy, server-side encryption with customer keys, requester pays), `usable` says no and the
caller keeps s3fs for the reads.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from .recv_buffers import BufferPool, process_pool

URL_LIFETIME_S = 3600
TIMEOUT_S = 60.0  # connect and per-read timeout, as botocore's defaults
THREADS = 32  # requests in flight per process at most (each call may ask for fewer)
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{1,200})</Message>")


def usable(fs: Any) -> bool:
    """Whether `fs` (an s3fs filesystem) can hand its reads to `S3Ranges`: no proxy for its endpoint, no
    request headers a presigned URL would not carry."""
    if getattr(fs, "s3_additional_kwargs", None) or getattr(fs, "req_kw", None):
        return False  # SSE-C keys or requester pays: headers on every request
    if (getattr(fs, "config_kwargs", None) or {}).get("proxies"):
        return False
    endpoint = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    host = urlsplit(endpoint).hostname if endpoint else "s3.amazonaws.com"
    proxies = urllib.request.getproxies()
    return not (proxies.get("https") or proxies.get("http")) or bool(host and urllib.request.proxy_bypass(host))


class S3Ranges:
    """`cat_ranges` for an s3fs filesystem: concurrent ranged GETs over kept-alive connections."""

    def __init__(self, fs: Any, pool: BufferPool | None = None) -> None:
        self.fs = fs
        self.pool = pool
        self._urls: dict[str, tuple[float, str, str]] = {}  # path -> (made at, "scheme://host:port", target)
        self._urls_lock = threading.Lock()
        self._pid = -1
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None

    def cat_ranges(self, paths: Sequence[str], starts: Sequence[int], ends: Sequence[int],
                   in_flight: int = THREADS) -> list[memoryview | BaseException]:
        """Bytes `[start, end)` of each object (an s3fs path), or the exception that request ended with:
        an OSError for what may pass (5xx, throttling, a dropped connection), FileNotFoundError,
        PermissionError or ValueError for what will not."""
        executor = self._threads()
        gate = threading.BoundedSemaphore(max(1, in_flight))

        def one(i: int) -> memoryview | BaseException:
            with gate:
                try:
                    return self._get(paths[i], starts[i], ends[i])
                except Exception as exc:  # noqa: BLE001 - returned per request, as fsspec's on_error="return"
                    return exc

        return list(executor.map(one, range(len(paths))))

    def _threads(self) -> ThreadPoolExecutor:
        # Threads and connections do not survive a fork; a child (a DataLoader worker) makes its own.
        if self._pid != os.getpid() or self._executor is None:
            self._pid = os.getpid()
            self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="lf-s3-range")
            self._local = threading.local()
        return self._executor

    def _get(self, path: str, start: int, end: int) -> memoryview:
        renewed = False
        while True:
            origin, target = self._signed(path, renew=renewed)
            status, reason, body = self._request(origin, target, start, end)
            if status in (200, 206) and isinstance(body, memoryview):
                return body
            if status == 403 and not renewed:  # the URL (or the credentials it was signed with) expired
                renewed = True
                continue
            raise _error(status, reason, body if isinstance(body, bytes) else b"")

    def _signed(self, path: str, renew: bool) -> tuple[str, str]:
        now = time.monotonic()
        with self._urls_lock:
            kept = self._urls.get(path)
        if kept is None or renew or now - kept[0] > URL_LIFETIME_S / 2:
            parts = urlsplit(self.fs.url(path, expires=URL_LIFETIME_S))
            port = parts.port or (443 if parts.scheme == "https" else 80)
            kept = (now, f"{parts.scheme}://{parts.hostname}:{port}",
                    parts.path + (f"?{parts.query}" if parts.query else ""))
            with self._urls_lock:
                self._urls[path] = kept
        return kept[1], kept[2]

    def _request(self, origin: str, target: str, start: int, end: int) -> tuple[int, str, memoryview | bytes]:
        """One GET of `bytes=start-(end-1)`; a kept-alive connection the server has closed meanwhile is
        replaced once at no cost to the caller's retries (nothing was received on it)."""
        for fresh in (False, True):
            conn, reused = self._connection(origin, fresh)
            try:
                conn.request("GET", target, headers={"Range": f"bytes={start}-{end - 1}"})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(origin)
                if reused and not fresh:
                    continue
                raise ConnectionError(f"request failed ({type(exc).__name__})") from None
            try:
                if response.status not in (200, 206):
                    return response.status, response.reason, response.read(64 << 10)
                return response.status, response.reason, self._receive(response, end - start)
            except (OSError, http.client.HTTPException) as exc:
                self._drop(origin)
                raise ConnectionError(f"connection dropped while receiving ({type(exc).__name__})") from None
            finally:
                if response.will_close or not response.isclosed():
                    self._drop(origin)
        raise AssertionError("unreachable")

    def _receive(self, response: http.client.HTTPResponse, want: int) -> memoryview:
        length = response.getheader("Content-Length")
        nbytes = int(length) if length is not None and length.isdigit() else want
        view = (self.pool or process_pool()).take(min(nbytes, want))
        got = 0
        while got < len(view):
            n = response.readinto(view[got:])
            if not n:
                break
            got += n
        return view[:got]  # short: the caller sees the length and retries

    def _connection(self, origin: str, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        conn = None if fresh else conns.get(origin)
        if conn is not None:
            return conn, True
        scheme, _, hostport = origin.partition("://")
        host, _, port = hostport.rpartition(":")
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT_S, context=self._tls())
        else:
            conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
        conns[origin] = conn
        return conn, False

    def _drop(self, origin: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(origin, None)
        if conn is not None:
            conn.close()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = (getattr(self.fs, "client_kwargs", None) or {}).get("verify")
            if verify is False:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            else:
                cafile = verify if isinstance(verify, str) else os.environ.get("AWS_CA_BUNDLE") or _certifi()
                ctx = ssl.create_default_context(cafile=cafile)
            self._ssl = ctx
        return self._ssl

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_urls={}, _urls_lock=None, _pid=-1, _executor=None, _local=None, _ssl=None, pool=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._urls_lock, self._local = threading.Lock(), threading.local()


def _certifi() -> str | None:
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _error(status: int, reason: str, body: bytes) -> Exception:
    """The exception for an S3 error answer, with the store's code and message (never the URL)."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    text = f"HTTP {status} " + (code.group(1).decode("ascii", "replace") if code else reason)
    if message:
        text += ": " + message.group(1).decode("utf-8", "replace")
    if status == 404:
        return FileNotFoundError(text)
    if status == 403:
        return PermissionError(text)
    if status in (400, 405, 411, 412, 416):
        return ValueError(text)  # a request the store will refuse however often it is sent
    return OSError(text)  # 5xx, 429 and the rest: may pass
