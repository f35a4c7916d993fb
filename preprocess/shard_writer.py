"""Writes the arrays of a cache group straight to their files, in the standard Zarr v3 format.

Why not zarr-python here: its per-array cost (a few ms to create an array and to append to it,
docs/benchmarks.md) was most of the cache job's write time on shards of a few images, where a group has
a dozen arrays per bucket. The bytes are the standard format, so zarr-python still reads them (the
conformance suite checks, and that they equal zarr-python's own bytes): each array's `zarr.json` is made
by zarr-python itself (a template per field shape, see `cache_writer.py`), and only the chunk
encoding is done here:

- `RowShardWriter` (big fields): one chunk per row inside shard files of `shard_rows` rows; a shard file
  is the encoded rows followed by the sharding index, (offset, nbytes) per row as little-endian uint64,
  then the index's crc32c, exactly what the sharding codec with `index_location: end` specifies.
- `ChunkWriter` (small fields): plain chunks of `shard_rows` rows, the last one padded with the fill value.

Every array has a Zarr v3 core data type (keys are zero-padded UTF-8 bytes, `cache_format.encode_keys`),
so the only array-to-bytes codec is `bytes`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from latentforge.shared.storage import Storage

_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


def _compressor(codec: dict[str, Any] | None) -> Callable[[bytes | np.ndarray], bytes]:
    """The bytes-to-bytes codec of a chain (blosc, zstd or none) as one function."""
    if codec is None:
        return bytes
    cfg = codec.get("configuration", {})
    if codec["name"] == "blosc":
        c = numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=_SHUFFLE[cfg["shuffle"]],
                            blocksize=cfg.get("blocksize", 0), typesize=cfg.get("typesize"))
    elif codec["name"] == "zstd":
        c = numcodecs.Zstd(level=cfg.get("level", 0), checksum=cfg.get("checksum", False))
    else:
        raise ValueError(f"unsupported codec {codec['name']}")
    return lambda data: bytes(c.encode(data))


def _encoder(codecs: list[dict[str, Any]]) -> Callable[[np.ndarray], bytes]:
    """A codec chain (bytes, then optionally blosc or zstd) as one function of an array."""
    names = [c["name"] for c in codecs]
    if names[0] != "bytes" or len(names) > 2:
        raise ValueError(f"unsupported codec chain {names}")
    compress = _compressor(codecs[1] if len(codecs) == 2 else None)
    return lambda chunk: compress(chunk.tobytes())


class _ArrayWriter:
    """What both writers share: the template, the row count and `zarr.json`."""

    def __init__(self, storage: Storage, rel: str, template: str) -> None:
        self.storage, self.rel = storage, rel
        self.meta = json.loads(template)
        self.chunk_rows = int(self.meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.row_shape = tuple(int(x) for x in self.meta["shape"][1:])
        self.dtype = np.dtype(self.meta["data_type"]).newbyteorder("<")
        self.rows = 0
        self._write_metadata()

    def _check(self, data: np.ndarray) -> np.ndarray:
        if tuple(data.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.rel}: rows of shape {tuple(data.shape[1:])}, expected {self.row_shape}")
        return np.ascontiguousarray(data, dtype=self.dtype)

    def _chunk_file(self, chunk: int) -> str:
        return f"{self.rel}/c/{chunk}" + "/0" * len(self.row_shape)

    def _write_metadata(self) -> None:
        self.meta["shape"] = [self.rows, *self.row_shape]
        self.storage.write_bytes(f"{self.rel}/zarr.json", json.dumps(self.meta, indent=2).encode())


class ChunkWriter(_ArrayWriter):
    """Appends rows to an unsharded array whose chunks hold `chunk_rows` rows (the small fields).

    The rows of the last, part-filled chunk stay in memory (small fields only: a few bytes a row) and the
    chunk is rewritten, padded with the fill value, whenever rows are added, as zarr-python does.
    """

    def __init__(self, storage: Storage, rel: str, template: str) -> None:
        super().__init__(storage, rel, template)
        if self.meta["codecs"][0]["name"] == "sharding_indexed":
            raise ValueError(f"{rel}: the template is sharded; use RowShardWriter")
        self.encode = _encoder(self.meta["codecs"])
        fill = self.meta["fill_value"]
        self._pad = np.full((self.chunk_rows, *self.row_shape), fill, dtype=self.dtype)
        self._tail = self._pad[:0]

    def append(self, data: np.ndarray) -> None:
        """Write `data` (rows, *row_shape) after the rows already written."""
        data = np.concatenate([self._tail, self._check(data)]) if len(self._tail) else self._check(data)
        first_chunk = self.rows // self.chunk_rows
        self.rows += len(data) - len(self._tail)
        for i, start in enumerate(range(0, len(data), self.chunk_rows)):
            part = data[start : start + self.chunk_rows]
            if len(part) < self.chunk_rows:
                part = np.concatenate([part, self._pad[len(part):]])
            self.storage.write_bytes(self._chunk_file(first_chunk + i), self.encode(part))
        held = self.rows % self.chunk_rows
        self._tail = data[len(data) - held:].copy() if held else self._pad[:0]
        self._write_metadata()


class RowShardWriter(_ArrayWriter):
    """Appends rows to one per-row-chunked sharded array at `rel` (a folder under `storage`).

    Full shards are written once. A shard left part-filled by a flush is written as it is (so the
    array is readable after every append) and read back and rewritten when more rows arrive, as
    zarr-python does, rather than kept in memory: a cache job holds many buckets at once.
    """

    def __init__(self, storage: Storage, rel: str, template: str) -> None:
        super().__init__(storage, rel, template)
        (sharding,) = self.meta["codecs"]
        if sharding["name"] != "sharding_indexed" or sharding["configuration"]["index_location"] != "end":
            raise ValueError(f"{rel}: the template is not a sharded array with its index at the end")
        self.shard_rows = self.chunk_rows
        self.encode = _encoder(sharding["configuration"]["codecs"])

    def append(self, data: np.ndarray) -> None:
        """Write `data` (rows, *row_shape) after the rows already written."""
        data = self._check(data)
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

    def _write_shard(self, shard: int, chunks: list[bytes]) -> None:
        """The shard file: each distinct chunk once, then the index. Rows whose encoded bytes are identical
        (the text embeddings of samples that share a caption) point at the same byte range: the sharding
        index is (offset, nbytes) per chunk, and nothing in the format says two chunks may not share one,
        so every Zarr v3 reader still returns every row as written."""
        index = np.full((self.shard_rows, 2), _EMPTY, dtype="<u8")
        stored: dict[bytes, int] = {}
        body: list[bytes] = []
        offset = 0
        for i, chunk in enumerate(chunks):
            at = stored.get(chunk)
            if at is None:
                at = stored[chunk] = offset
                body.append(chunk)
                offset += len(chunk)
            index[i] = (at, len(chunk))
        raw = index.tobytes()
        self.storage.write_bytes(self._chunk_file(shard),
                                 b"".join([*body, raw, google_crc32c.value(raw).to_bytes(4, "little")]))

    def _read_part_filled_shard(self) -> list[bytes]:
        held = self.rows % self.shard_rows
        if held == 0:
            return []
        blob = self.storage.read_bytes(self._chunk_file(self.rows // self.shard_rows))
        index = np.frombuffer(blob[-(16 * self.shard_rows + 4): -4], dtype="<u8").reshape(self.shard_rows, 2)
        return [blob[int(o): int(o) + int(n)] for o, n in index[:held]]
