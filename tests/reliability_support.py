"""Helpers shared by the tests/test_reliability_*.py suites: real processes, real SIGKILLs, a reader that
watches a cache while a job writes it, and exact comparisons of caches and loss trajectories."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
CLI = Path(sys.executable).parent / "latentforge"
FP32_ZERO2 = "deepspeed={zero_optimization: {stage: 2}, bf16: {enabled: false}}"


# Skipped unless `-m soak` selects it: a plain `pytest` never builds a soak test's fixtures.
SOAK_ONLY = pytest.mark.skipif("'soak' not in (config.option.markexpr or '')", reason="soak test: run `make soak`")


def soak(test):
    """@soak: a long fault-injection test, run by `make soak` (`pytest -m soak`) only, never by a plain
    `pytest` (skipped before its fixtures are built) nor by `make test` (deselected)."""
    return pytest.mark.soak(SOAK_ONLY(test))


def soak_param(*values: object) -> object:
    """One parametrized case of a test as a soak test (`soak` for a single case): `make soak` runs it."""
    return pytest.param(*values, marks=[pytest.mark.soak, SOAK_ONLY])


def seeded_rng(name: str) -> tuple[random.Random, int]:
    """Randomness for kill points: LATENTFORGE_RELIABILITY_SEED replays a failing run; the seed is in
    every assertion message."""
    seed = int(os.environ.get("LATENTFORGE_RELIABILITY_SEED") or random.SystemRandom().randrange(1 << 30))
    return random.Random(f"{seed}:{name}"), seed


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
           "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LATENTFORGE_FAULT_KILL_AT",
                "LATENTFORGE_FAULT_KILL_AFTER_COMMITS"):
        env.pop(key, None)
    env.update(extra)
    return env


def cache_command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [str(CLI), "cache", "--config", str(DEMO), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "latentforge.preprocess", "--config", str(DEMO), *args]


def train_command(args: list[str]) -> list[str]:
    return [str(CLI), "train", "--config", str(DEMO), *args]


class Job:
    """A child process (and its whole tree: torchrun puts workers in their own sessions), output to files."""

    def __init__(self, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, env=env or child_env(),
                                     start_new_session=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill_tree(self) -> None:
        """SIGKILL the process and every descendant at once (stopped first, so none reacts to the
        others' deaths): what a power cut or a pre-empted node looks like to the files."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        procs: list[Any] = []
        for _ in range(2):  # a second pass catches a child spawned while the first was collected
            try:
                found = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                found = []
            for p in found:
                if p.pid not in {q.pid for q in procs}:
                    procs.append(p)
                    try:
                        p.send_signal(signal.SIGSTOP)
                    except psutil.NoSuchProcess:
                        pass
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.wait(30)  # our child: reaped by Popen (psutil would reap it first and lose the status)
        psutil.wait_procs([p for p in procs if p.pid != self.proc.pid], timeout=30)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


def run_cli(args: list[str], log_dir: Path, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str, str]:
    job = Job([str(CLI), *args], log_dir, env)
    rc = job.wait(timeout)
    return rc, job.stdout, job.stderr


def write_tar(path: Path, members: list[tuple[str, bytes]], *, gz: bool = False) -> Path:
    """A reproducible tar (USTAR, mtime 0) of (name, bytes) members, gzipped when asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0) if gz else buf.getvalue())
    return path


def wait_until(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def committed_groups(cache: Path) -> list[str]:
    shards = cache / "shards"
    if not shards.is_dir():
        return []
    return sorted(p.name for p in shards.iterdir() if not p.name.startswith(".") and (p / "commit.json").is_file())


def cache_files(cache: Path) -> set[str]:
    """Every file of a cache, relative (what a crashed-and-resumed cache must match, litter included)."""
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def snapshot(cache: Path | str, storage_options: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every committed sample of a cache, keyed by sample key: its fields as numpy arrays (bf16 as bits)."""
    from latentforge.shared.cache_reader import CacheReader

    reader = CacheReader(str(cache), storage_options)
    out: dict[str, dict[str, np.ndarray]] = {}
    for bucket, n in reader.bucket_counts().items():
        rows = reader.read_rows(bucket, range(n))
        for i, key in enumerate(rows["key"]):
            assert key not in out, f"duplicate key {key}"
            out[key] = {k: (v[i].view(torch.uint16).numpy() if v.dtype == torch.bfloat16 else v[i].numpy())
                        for k, v in rows.items() if k != "key"}
    reader.close()
    return out


def assert_same_cache(got: dict, want: dict, context: str = "") -> None:
    assert got.keys() == want.keys(), f"{context}: missing {sorted(want.keys() - got.keys())}, " \
                                      f"extra {sorted(got.keys() - want.keys())}"
    for key, fields in want.items():
        assert fields.keys() == got[key].keys(), (context, key)
        for name, value in fields.items():
            assert np.array_equal(value, got[key][name]), f"{context}: {key}.{name} differs"


SUMMARY_FIELDS = ("groups", "samples", "samples_seen", "skipped_total", "buckets", "skip_reasons", "upscale")


def summary_facts(cache: Path) -> dict[str, Any]:
    doc = json.loads((cache / "summary.json").read_text())
    return {k: doc[k] for k in SUMMARY_FIELDS}


class CacheWatcher(threading.Thread):
    """Opens the cache again and again while a job writes it, and checks that everything a reader can
    see is complete: every visible group passes `verify(checksums=True)`, every row of every bucket
    reads, no key appears twice, committed prompts read. Any exception is a finding."""

    def __init__(self, cache: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.cache, self.interval = cache, interval
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.observations = 0
        self.group_counts: set[int] = set()

    def run(self) -> None:
        from latentforge.shared.cache_format import CacheFormatError
        from latentforge.shared.cache_reader import CacheReader

        while not self.stop_event.is_set():
            try:
                if (self.cache / "cache.json").is_file():
                    reader = CacheReader(str(self.cache))
                    try:
                        problems = reader.verify(checksums=True)
                        assert not problems, problems
                        keys: set[str] = set()
                        for bucket, n in reader.bucket_counts().items():
                            rows = reader.read_rows(bucket, range(n))
                            assert len(rows["key"]) == n and rows["latent_mean"].shape[0] == n
                            assert keys.isdisjoint(rows["key"]), "a key is visible twice"
                            keys.update(rows["key"])
                        assert len(keys) == reader.num_samples
                        if (self.cache / "prompts" / "commit.json").is_file():
                            reader.prompts()
                        self.group_counts.add(len(reader.groups))
                        self.observations += 1
                    finally:
                        reader.close()
            except CacheFormatError as exc:
                if "cache.json" not in str(exc):  # cache.json replaced between is_file and open: benign
                    self.errors.append(traceback.format_exc())
            except Exception:
                self.errors.append(traceback.format_exc())
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)


def logged_losses(out: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it (a resumed run appends, so a step can appear more than once)."""
    result: dict[int, list[float]] = {}
    path = out / "train_log.jsonl"
    if not path.exists():
        return result
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the last line of a killed run may be cut short
            continue
        result.setdefault(int(row["step"]), []).append(float(row["loss"]))
    return result
