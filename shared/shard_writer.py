"""Writes one big field of a cache group (one chunk per row, Zarr v3 sharding) straight to its files.

Why not zarr-python here: its per-array cost (about 2.3 ms to create an array and 1.9 ms per append,
docs/benchmarks.md) was a third of the cache job's shard time on shards of a few images. The bytes are
the standard format, so zarr-python still reads them (the conformance suite checks): `zarr.json` is
made by zarr-python itself (a template per field shape, see `CacheWriter`), and each shard file is the
encoded rows followed by the sharding index — (offset, nbytes) per row as little-endian uint64, then
the index's crc32c — exactly what the sharding codec with `index_location: end` specifies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from .storage import Storage

_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


def _encoder(inner_codecs: list[dict[str, Any]]) -> Callable[[np.ndarray], bytes]:
    """The inner codec chain of the template (bytes, then optionally blosc or zstd) as one function."""
    names = [c["name"] for c in inner_codecs]
    if names[0] != "bytes" or len(names) > 2:
        raise ValueError(f"unsupported inner codec chain {names}")
    if len(names) == 1:
        return lambda row: row.tobytes()
    cfg = inner_codecs[1].get("configuration", {})
    if names[1] == "blosc":
        codec = numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=_SHUFFLE[cfg["shuffle"]],
                                blocksize=cfg.get("blocksize", 0), typesize=cfg.get("typesize"))
    elif names[1] == "zstd":
        codec = numcodecs.Zstd(level=cfg.get("level", 0), checksum=cfg.get("checksum", False))
    else:
        raise ValueError(f"unsupported inner codec {names[1]}")
    return lambda row: bytes(codec.encode(row))


class RowShardWriter:
    """Appends rows to one per-row-chunked sharded array at `rel` (a folder under `storage`).

    Full shards are written once. A shard left part-filled by a flush is written as it is (so the
    array is readable after every append) and read back and rewritten when more rows arrive, as
    zarr-python does, rather than kept in memory: a cache job holds many buckets at once.
    """

    def __init__(self, storage: Storage, rel: str, template: str) -> None:
        self.storage, self.rel = storage, rel
        self.meta = json.loads(template)
        (sharding,) = self.meta["codecs"]
        if sharding["name"] != "sharding_indexed" or sharding["configuration"]["index_location"] != "end":
            raise ValueError(f"{rel}: the template is not a sharded array with its index at the end")
        self.shard_rows = int(self.meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.row_shape = tuple(int(x) for x in self.meta["shape"][1:])
        self.dtype = np.dtype(self.meta["data_type"]).newbyteorder("<")
        self.encode = _encoder(sharding["configuration"]["codecs"])
        self.rows = 0
        self._write_metadata()

    def append(self, data: np.ndarray) -> None:
        """Write `data` (rows, *row_shape) after the rows already written."""
        if tuple(data.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.rel}: rows of shape {tuple(data.shape[1:])}, expected {self.row_shape}")
        data = np.ascontiguousarray(data, dtype=self.dtype)
        chunks = self._read_part_filled_shard()
        for row in data:
            chunks.append(self.encode(row))
            self.rows += 1
            if len(chunks) == self.shard_rows:
                self._write_shard((self.rows - 1) // self.shard_rows, chunks)
                chunks = []
        if chunks:
            self._write_shard((self.rows - 1) // self.shard_rows, chunks)
        self._write_metadata()

    def _shard_file(self, shard: int) -> str:
        return f"{self.rel}/c/{shard}" + "/0" * len(self.row_shape)

    def _write_shard(self, shard: int, chunks: list[bytes]) -> None:
        index = np.full((self.shard_rows, 2), _EMPTY, dtype="<u8")
        sizes = np.fromiter((len(c) for c in chunks), dtype=np.uint64, count=len(chunks))
        index[: len(chunks), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
        index[: len(chunks), 1] = sizes
        raw = index.tobytes()
        self.storage.write_bytes(self._shard_file(shard),
                                 b"".join([*chunks, raw, google_crc32c.value(raw).to_bytes(4, "little")]))

    def _read_part_filled_shard(self) -> list[bytes]:
        held = self.rows % self.shard_rows
        if held == 0:
            return []
        blob = self.storage.read_bytes(self._shard_file(self.rows // self.shard_rows))
        index = np.frombuffer(blob[-(16 * self.shard_rows + 4): -4], dtype="<u8").reshape(self.shard_rows, 2)
        return [blob[int(o): int(o) + int(n)] for o, n in index[:held]]

    def _write_metadata(self) -> None:
        self.meta["shape"] = [self.rows, *self.row_shape]
        self.storage.write_bytes(f"{self.rel}/zarr.json", json.dumps(self.meta, indent=2).encode())
