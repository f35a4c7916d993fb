"""The layouts the reader benchmark (`reader_throughput.py`) compares: how each writes and reads samples.

- `Cache`: our cache, read through `CacheReader.read_rows(bucket, rows, fields)` with the fields the
  trainer reads;
- `Raw`: one `.npy` memmap per field, rows copied out with numpy fancy indexing (the page-cache copy limit);
- `Npz` (kohya sd-scripts style) and `Pt` (SimpleTuner style): one file per sample, stacked into a batch.

Every layout has `write(source, n) -> seconds`, `open()`, `read(rows) -> batch` and `files()` (what a cold
read evicts from the page cache).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import SDXL_BUCKET, SDXL_SHAPES, SampleSource, du, files_under, sdxl_spec, write_cache

FIELDS = tuple(SDXL_SHAPES)
SHARD_ROWS = 256


class Raw:
    name = "raw .npy memmap"

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, source: SampleSource, n: int) -> float:
        self.root.mkdir(parents=True, exist_ok=True)
        mms = {k: np.lib.format.open_memmap(self.root / f"{k}.npy", mode="w+", dtype=np.uint16, shape=(n, *s))
               for k, s in SDXL_SHAPES.items()}
        seconds = 0.0
        for s0 in range(0, n, 256):
            batch = source.batch(s0, min(n, s0 + 256))
            t = time.perf_counter()
            for k, mm in mms.items():
                mm[s0: s0 + len(batch[k])] = batch[k]
            seconds += time.perf_counter() - t
        t = time.perf_counter()
        for mm in mms.values():
            mm.flush()
        del mms
        return seconds + time.perf_counter() - t

    def open(self) -> None:
        self.mm = {k: np.load(self.root / f"{k}.npy", mmap_mode="r") for k in SDXL_SHAPES}

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(self.mm[k][rows]).view(torch.bfloat16) for k in FIELDS}

    def files(self) -> list[Path]:
        return files_under(self.root)


class PerFile:
    """One file per sample, read one by one and stacked into a batch, as the peers' caches do."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, sample: dict[str, np.ndarray], path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> dict[str, Any]:
        raise NotImplementedError

    def write(self, source: SampleSource, n: int) -> float:
        self.root.mkdir(parents=True, exist_ok=True)
        seconds = 0.0
        for i in range(n):
            s = source.sample(i)
            t = time.perf_counter()
            self.save(s, self.root / f"{i}.{self.suffix}")
            seconds += time.perf_counter() - t
        return seconds

    def open(self) -> None:
        pass

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        loaded = [self.load(self.root / f"{int(i)}.{self.suffix}") for i in rows]
        return {k: torch.stack([torch.as_tensor(d[k]) for d in loaded]).view(torch.bfloat16) for k in FIELDS}

    def files(self) -> list[Path]:
        return files_under(self.root)


class Npz(PerFile):
    name, suffix = ".npz per sample (kohya)", "npz"

    def save(self, sample: dict[str, np.ndarray], path: Path) -> None:
        np.savez(path, **sample)

    def load(self, path: Path) -> dict[str, Any]:
        with np.load(path) as z:
            return {k: z[k] for k in FIELDS}


class Pt(PerFile):
    name, suffix = ".pt per sample (SimpleTuner)", "pt"

    def save(self, sample: dict[str, np.ndarray], path: Path) -> None:
        # Saved as bf16 tensors, as SimpleTuner stores them.
        torch.save({k: torch.from_numpy(v).view(torch.bfloat16) for k, v in sample.items()}, path)

    def load(self, path: Path) -> dict[str, Any]:
        return {k: v.view(torch.uint16) for k, v in torch.load(path, weights_only=True).items()}


class Cache:
    def __init__(self, root: Path, codec: str, kind: str = "random") -> None:
        self.root, self.codec, self.kind = root, codec, kind
        self.name = f"latentforge cache, {codec}" + ("" if kind == "random" else f" ({kind} data)")

    def write(self, source: SampleSource, n: int) -> float:
        if self.root.exists():
            shutil.rmtree(self.root)
        return write_cache(self.root, sdxl_spec(self.codec, SHARD_ROWS), source, n, prompts=False)

    def open(self) -> None:
        from latentforge.shared.cache_reader import CacheReader
        from latentforge.train.data import TRAIN_FIELDS

        self.reader = CacheReader(str(self.root))
        self.fields = [f.name for f in self.reader.spec.fields if f.name in TRAIN_FIELDS]
        self.read(np.arange(1))  # small fields are read once per (group, bucket): not part of the timing

    def read(self, rows: np.ndarray) -> dict[str, Any]:
        return self.reader.read_rows(SDXL_BUCKET, rows, fields=self.fields)

    def files(self) -> list[Path]:
        return [p for p in files_under(self.root / "shards")]

    def bytes_per_sample(self, n: int) -> float:
        return du(self.root) / n
