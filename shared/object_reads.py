"""Byte ranges of S3 objects read through obstore (Rust's `object_store`) instead of s3fs.

The trainer's reads from a cache on an object store are large (whole shard files in 32 MB parts) and
many (a micro-batch's rows): through s3fs each byte crosses aiobotocore, aiohttp and several Python-level
copies, which measured 430-480 MB/s per process on loopback against 1,000 MB/s for obstore on the same
server (docs/benchmarks.md); the client's CPU is the DataLoader worker's, which it needs for decoding.
obstore receives into Rust buffers without the GIL and hands them over without a copy.

Only reads come here (`range_reads.read_spans`); listing, writing and commits stay with fsspec. Used when
every `storage_options` key is one this module understands (others: the fsspec path, which reads any
store fsspec does). Credentials come from boto3's chain (environment, `~/.aws/credentials`, profiles,
SSO, instance roles), as for s3fs: never from the config. obstore's own retries are off: the reader's
loop (`range_reads`) is the one retry policy, so a failing store reports the same one line either way.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

# storage_options keys with a meaning here; `config_kwargs` keys that only tune botocore's client
# (its pool and retries) are moot for obstore, which pools connections itself and retries nothing.
_KNOWN = {"endpoint_url", "client_kwargs", "config_kwargs", "anon", "requester_pays"}
_MOOT_CONFIG = {"max_pool_connections", "retries"}
_PROTOCOLS = ("s3", "s3a")


class ObjectReads:
    """Concurrent range reads of the objects under one `s3://bucket/prefix` root."""

    def __init__(self, store: Any, prefix: str) -> None:
        self.store, self.prefix = store, prefix.strip("/")

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def cat_ranges(self, rels: Sequence[str], starts: Sequence[int], ends: Sequence[int],
                   in_flight: int) -> list[memoryview | BaseException]:
        """The bytes `[start, end)` of each object (relative to the root), at most `in_flight` requests
        at once; a failed request is its exception in the list (fsspec's `on_error="return"`)."""
        return asyncio.run(self._gather(rels, starts, ends, in_flight))

    async def _gather(self, rels: Sequence[str], starts: Sequence[int], ends: Sequence[int],
                      in_flight: int) -> list[memoryview | BaseException]:
        import obstore

        gate = asyncio.Semaphore(max(1, in_flight))

        async def one(rel: str, start: int, end: int) -> memoryview:
            async with gate:
                try:
                    return memoryview(await obstore.get_range_async(self.store, self.key(rel), start=start, end=end))
                except Exception as exc:  # noqa: BLE001 - re-raised as the built-in the retry loop knows
                    raise _builtin(exc) from exc

        tasks = [one(r, s, e) for r, s, e in zip(rels, starts, ends, strict=True)]
        return list(await asyncio.gather(*tasks, return_exceptions=True))


def object_reads(url: str, options: Mapping[str, Any]) -> ObjectReads | None:
    """An `ObjectReads` for `url` (a folder on S3) with fsspec-style `options`, or None where obstore is
    missing, the URL is not S3, or an option has no obstore equivalent (the fsspec path reads it)."""
    protocol, _, rest = url.partition("://")
    if protocol not in _PROTOCOLS or not rest or not _understood(options):
        return None
    try:
        from obstore.store import S3Store
    except ImportError:
        return None
    bucket, _, prefix = rest.partition("/")
    client = dict(options.get("client_kwargs") or {})
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    config: dict[str, Any] = {}
    if endpoint:
        config["endpoint"] = endpoint
    if options.get("requester_pays"):
        config["request_payer"] = True
    region = client.get("region_name")
    client_options: dict[str, Any] = {"allow_http": bool(endpoint and str(endpoint).startswith("http://"))}
    provider, session_region = (None, None) if options.get("anon") else _credentials()
    if options.get("anon"):
        config["skip_signature"] = True
    if not region and not endpoint:
        # AWS answers a request in the wrong region with a redirect obstore does not follow (s3fs looks the
        # region up): ask the bucket, once per reader, unless the config names it.
        region = bucket_region(bucket, anon=bool(options.get("anon")))
    config["region"] = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                        or session_region or "us-east-1")
    store = S3Store(bucket, config=config, client_options=client_options, retry_config={"max_retries": 0},
                    credential_provider=provider)
    return ObjectReads(store, prefix)


def bucket_region(bucket: str, *, endpoint: str | None = None, anon: bool = False) -> str | None:
    """The region S3 reports for `bucket` (the `x-amz-bucket-region` header of a HEAD, present on errors
    too), or None when it cannot be asked."""
    import boto3
    import botocore
    from botocore.exceptions import BotoCoreError, ClientError

    config = botocore.config.Config(retries={"total_max_attempts": 2}, connect_timeout=5, read_timeout=10,
                                    **({"signature_version": botocore.UNSIGNED} if anon else {}))
    client = boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint, config=config)
    try:
        meta = client.head_bucket(Bucket=bucket)["ResponseMetadata"]
    except ClientError as exc:
        meta = exc.response.get("ResponseMetadata", {})
    except BotoCoreError:
        return None
    return (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region")


def _understood(options: Mapping[str, Any]) -> bool:
    if set(options) - _KNOWN:
        return False
    client = options.get("client_kwargs") or {}
    return set(client) <= {"endpoint_url", "region_name"} and set(options.get("config_kwargs") or {}) <= _MOOT_CONFIG


def _credentials() -> tuple[Any, str | None]:
    """boto3's credential chain as an obstore provider (None when it finds nothing: obstore then reads
    the environment itself and a request fails naming the missing credentials), and the session's region."""
    import boto3
    from obstore.auth.boto3 import Boto3CredentialProvider

    session = boto3.Session()
    if session.get_credentials() is None:
        return None, session.region_name
    return Boto3CredentialProvider(session), session.region_name


def _builtin(exc: BaseException) -> BaseException:
    """obstore's errors as the built-ins `range_reads` sorts into retried and permanent ones."""
    from obstore import exceptions as errors

    first = _reason(str(exc))
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(first)
    if isinstance(exc, PermissionError | ValueError):
        return exc
    if isinstance(exc, errors.PermissionDeniedError | errors.UnauthenticatedError):
        return PermissionError(first)
    if isinstance(exc, errors.InvalidPathError | errors.UnknownConfigurationKeyError | errors.NotSupportedError):
        return ValueError(first)
    return OSError(first)


def _reason(text: str) -> str:
    """One short line from object_store's error text: the HTTP status and the store's own code and message
    (`SlowDown: Please reduce your request rate.`) where it answered with S3's XML error, else the first line."""
    status = re.search(r"status code: (\d{3}[^:<]*)", text)
    code, message = re.search(r"<Code>([^<]*)</Code>", text), re.search(r"<Message>([^<]*)</Message>", text)
    if status and code:
        return f"HTTP {status.group(1).strip()}, {code.group(1)}" + (f": {message.group(1)}" if message else "")
    return (text.strip().splitlines() or [""])[0][:200]
