"""What every benchmark shares: SDXL-shaped data, cache writing, timing helpers, page-cache control,
the machine description and the result files.

Data kinds (both are synthetic; no real SDXL latents exist offline):
- `random`: i.i.d. standard-normal bfloat16 values in every field. Nothing compresses except the
  exponent byte, so this is the pessimistic case for bytes on disk and decode cost.
- `structured`: a proxy with the structure real tensors have: latents are a smooth field (4x32x32 noise
  upsampled to 128x128, plus fine noise) at the VAE's unscaled std (~7.7); prompt embeddings have 8-40
  caption tokens followed by padding tokens that repeat one per-sample vector with small per-position
  changes, and a few large outlier dimensions shared by all samples. It is the optimistic bracket: real
  figures lie between the two kinds.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
SIZES = ("smoke", "full")

SDXL_BUCKET = (1024, 1024)
# Per-sample shapes of the big SDXL fields at 1024x1024 (VAE factor 8, CLIP-L 768 + bigG 1280, pooled 1280).
SDXL_SHAPES: dict[str, tuple[int, ...]] = {
    "latent_mean": (4, 128, 128),
    "prompt_embeds": (77, 2048),
    "pooled_prompt_embeds": (1280,),
}
RAW_BYTES = sum(int(np.prod(s)) * 2 for s in SDXL_SHAPES.values())  # 449,024: the fp16/bf16 tensor bytes
VAE_STD = 1 / 0.13025  # SDXL latents are stored unscaled: std ~ 1 / scaling_factor


def default_workdir() -> Path:
    """Scratch space for caches and layouts (git-ignored; `make clean` removes .cache)."""
    return Path(os.environ.get("LATENTFORGE_BENCH_DIR", ROOT / ".cache" / "bench")).absolute()


# ---- data ----------------------------------------------------------------------------------------
def _bf16_bits(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.uint16).numpy()


class SampleSource:
    """Deterministic SDXL-shaped samples as bfloat16 bits (uint16): sample i is the same in every layout."""

    def __init__(self, kind: str = "random", shapes: Mapping[str, tuple[int, ...]] = SDXL_SHAPES, seed: int = 0) -> None:
        if kind not in ("random", "structured"):
            raise ValueError(f"data kind {kind!r}: expected random or structured")
        self.kind, self.shapes, self.seed = kind, dict(shapes), seed
        rng = np.random.default_rng(seed)
        if kind == "random":
            # One pool of normal values; each sample's field is a window at its own offset. Codecs see
            # one chunk at a time, so shared windows across samples change nothing they can exploit.
            self._pool = _bf16_bits(rng.standard_normal(1 << 23, dtype=np.float32))
        else:
            width = shapes["prompt_embeds"][-1]
            self._mean = rng.standard_normal(width, dtype=np.float32) * 0.5
            outliers = rng.choice(width, size=max(1, width // 256), replace=False)
            self._mean[outliers] = rng.standard_normal(len(outliers)).astype(np.float32) * 30

    def memoized(self, n: int) -> SampleSource:
        """Keep samples 0..n-1 in memory once made (structured samples cost ~10 ms each to make)."""
        self._memo: dict[int, dict[str, np.ndarray]] = {}
        self._memo_n = n
        return self

    def sample(self, i: int) -> dict[str, np.ndarray]:
        memo = getattr(self, "_memo", None)
        if memo is not None and i < self._memo_n:
            if i not in memo:
                memo[i] = self._make(i)
            return memo[i]
        return self._make(i)

    def _make(self, i: int) -> dict[str, np.ndarray]:
        if self.kind == "random":
            out = {}
            pool = self._pool
            for k, (name, shape) in enumerate(self.shapes.items()):
                n = int(np.prod(shape))
                off = (i * 2654435761 + k * 40503) % (len(pool) - n)
                out[name] = pool[off: off + n].reshape(shape)
            return out
        return self._structured(i)

    def _structured(self, i: int) -> dict[str, np.ndarray]:
        import torch

        rng = np.random.default_rng([self.seed, i])
        out: dict[str, np.ndarray] = {}
        c, h, w = self.shapes["latent_mean"]
        coarse = torch.from_numpy(rng.standard_normal((1, c, max(1, h // 4), max(1, w // 4)), dtype=np.float32))
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].numpy()
        latent = (smooth + 0.25 * rng.standard_normal((c, h, w), dtype=np.float32)) * VAE_STD
        out["latent_mean"] = _bf16_bits(latent)
        tokens, width = self.shapes["prompt_embeds"]
        caption = int(rng.integers(min(8, tokens), min(40, tokens) + 1))
        emb = np.empty((tokens, width), np.float32)
        emb[:caption] = self._mean + rng.standard_normal((caption, width), dtype=np.float32)
        pad = self._mean + rng.standard_normal(width, dtype=np.float32)
        emb[caption:] = pad + 0.02 * rng.standard_normal((tokens - caption, width), dtype=np.float32)
        out["prompt_embeds"] = _bf16_bits(emb)
        if "pooled_prompt_embeds" in self.shapes:
            out["pooled_prompt_embeds"] = _bf16_bits(rng.standard_normal(self.shapes["pooled_prompt_embeds"], dtype=np.float32))
        return out

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        rows = [self.sample(i) for i in range(start, stop)]
        return {name: np.stack([r[name] for r in rows]) for name in self.shapes}


def sdxl_spec(codec: str = "blosc-lz4", shard_rows: int = 256, bucket: tuple[int, int] = SDXL_BUCKET,
              pooled_dim: int = 1280, text_dim: int = 2048, latent_channels: int = 4) -> Any:
    """A CacheSpec for SDXL-shaped bf16 rows (what the cache job writes for a real SDXL model)."""
    from latentforge.shared.cache_fingerprint import compute_fingerprint
    from latentforge.shared.cache_format import CacheSpec
    from latentforge.shared.families import cached_fields

    fields = cached_fields("sdxl", latent_channels=latent_channels, latent_mode="mean", store_dtype="bfloat16",
                           text_tokens=77, text_dim=text_dim, pooled_dim=pooled_dim)
    inputs = {"bench": True, "codec": codec, "bucket": list(bucket)}
    return CacheSpec(family="sdxl", fingerprint=compute_fingerprint(inputs), fields=fields, buckets=(tuple(bucket),),
                     latent_channels=latent_channels, vae_downsample=8, scaling_factor=0.13025, codec=codec,
                     shard_rows=shard_rows, fingerprint_inputs=inputs)


def write_cache(url: Path, spec: Any, source: SampleSource, n: int, rows_per_group: int = 1000,
                batch: int = 64, prompts: bool = True) -> float:
    """Write `n` samples of one bucket with `CacheWriter` (groups of `rows_per_group`); return seconds.

    The seconds cover `add` + `commit` only (the writer's work), not generating the samples.
    """
    from latentforge.preprocess.cache_writer import CacheWriter

    bucket = spec.buckets[0]
    writer = CacheWriter(str(url), spec)
    seconds = 0.0
    for g0 in range(0, n, rows_per_group):
        g1 = min(n, g0 + rows_per_group)
        t = time.perf_counter()
        group = writer.group(f"s0-g{g0 // rows_per_group:05d}", {"url": "bench"}, "bench")
        seconds += time.perf_counter() - t
        for b0 in range(g0, g1, batch):
            b1 = min(g1, b0 + batch)
            rows: dict[str, Any] = dict(source.batch(b0, b1))
            m = b1 - b0
            rows["original_size"] = np.tile(np.array(bucket, np.int32), (m, 1))
            rows["crop_top_left"] = np.zeros((m, 2), np.int32)
            rows["target_size"] = np.tile(np.array(bucket, np.int32), (m, 1))
            rows["content_hash"] = np.zeros((m, 16), np.uint8)
            rows["upscale_method"] = np.zeros(m, np.uint8)
            rows["key"] = [f"{i:08d}" for i in range(b0, b1)]
            t = time.perf_counter()
            group.add(bucket, rows)
            seconds += time.perf_counter() - t
        t = time.perf_counter()
        group.commit()
        seconds += time.perf_counter() - t
    if prompts:
        text = {k: v for k, v in source.batch(0, 3).items() if k != "latent_mean"}
        writer.write_prompts({k: v[:1] for k, v in text.items()}, ["a", "b"], {k: v[1:] for k, v in text.items()})
    return seconds


# ---- timing ---------------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def files_under(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return [Path(d) / f for d, _, fs in os.walk(path) for f in fs]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def drop_page_cache(paths: Iterable[Path]) -> bool:
    """Evict these files from the page cache (fsync + POSIX_FADV_DONTNEED): no root, nothing else evicted.

    Returns False where the platform has no fadvise. On a virtual machine the host may still cache the
    disk image, so 'cold' means 'not in this kernel's page cache', not necessarily 'from the platter'.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# ---- machine and results --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    have = set(flags.group(1).split()) if flags else set()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
    virt = " (virtual machine)" if "hypervisor" in have else ""
    return f"{m.group(1).strip() if m else 'unknown CPU'}{virt}, {'/'.join(simd) or 'no avx2'}"


def _mem_gib() -> float:
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(m.group(1)) / 2**20 if m else 0.0
    except OSError:
        return 0.0


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-PT", str(path)], capture_output=True, text=True, timeout=10).stdout.splitlines()
        dev, fstype, size = out[1].split()[:3]
        return f"{fstype} on {dev} ({int(size) / 2**20:.0f} GiB)"
    except Exception:  # noqa: BLE001 - descriptive only
        return "unknown filesystem"


def machine_info(workdir: Path | None = None) -> dict[str, Any]:
    import numcodecs
    import torch
    import zarr

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gib": round(_mem_gib(), 1),
        "disk": _filesystem(workdir or ROOT),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    info["line"] = (f"{info['cpu']}; {cores} cores; {info['memory_gib']} GiB RAM; {info['disk']}; {info['os']}; "
                    f"Python {info['python']}, torch {info['torch']}, zarr {info['zarr']}, numcodecs {info['numcodecs']}; "
                    f"GPU: {info['gpu'] or 'none'}")
    return info


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def save_json(doc: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def row(figure: str, value: float | None, unit: str, goal: str = "", met: bool | None = None, detail: str = "") -> dict:
    """One line of the printed table: a figure, its value, its goal and whether the goal is met."""
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "met": met, "detail": detail}


def cli(run: Callable[[str, Path], dict], name: str, argv: list[str] | None = None) -> int:
    """`python -m bench.<name> [--size smoke|full] [--workdir DIR] [--out FILE]`: run one benchmark."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default bench/results/{name}.json)")
    args = p.parse_args(argv)
    workdir = (args.workdir or default_workdir()).absolute() / name
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    doc = run(args.size, workdir)
    doc.setdefault("name", name)
    doc["size"] = args.size
    doc["seconds"] = round(time.perf_counter() - t, 1)
    doc["date"] = now_iso()
    save_json(doc, args.out or RESULTS_DIR / f"{name}.json")
    for r in doc.get("table", []):
        print(format_row(r), r.get("detail", ""))
    sys.stdout.flush()
    return 0


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value:.2f} %"
    if unit == "x":
        return f"{value:.3f}x"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def format_row(r: Mapping[str, Any]) -> str:
    met = {True: "met", False: "MISSED", None: ""}[r.get("met")]
    return f"{r['figure']:<58} {format_value(r['value'], r['unit']):>16}  {r.get('goal', ''):<14} {met}"
