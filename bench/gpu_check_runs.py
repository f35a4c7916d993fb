"""The real commands `bench.gpu_check` launches, and the figures it reads back from what they write.

Commands (the ones `make cache` / `make train` run):
* cache: `latentforge cache --config FILE ...` for one process, `torchrun --standalone --nproc_per_node N
  -m latentforge.preprocess ...` for N GPUs;
* train: `deepspeed --num_gpus N --module latentforge.train --config FILE ...`.

Figures come from the files the jobs write anyway: the cache's `summary.json` and its group manifests
(`shards/*/commit.json`: when each shard started and finished), the trainer's `run_summary.json` (its last
logging window: samples/s, steps/s, data-wait share and, on CUDA, `torch.cuda.max_memory_allocated`, all
from `train/metrics.py`) and `train_log.jsonl` (the loss of every step).

Every child runs with a `sitecustomize.py` on PYTHONPATH (written by `write_hook`, nothing in the project
changes) that (1) records `torch.cuda.max_memory_allocated()` at exit, the peak of runs that log none (the
cache job), and (2) when asked, turns the trainer's final checkpoint into a no-op: a ZeRO-2 SDXL checkpoint
is ~36 GB (fp32 master weights and Adam moments) and writing three of them would not fit in 8 minutes or
comfortably on a 64 GB disk. `--checkpoint` keeps it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import ROOT

BIN = Path(sys.executable).parent
HOOK = '''"""Written by bench/gpu_check.py (gpu_check_runs.HOOK) for its child processes only."""
import atexit
import os
import sys


def _record_peak():
    torch, where = sys.modules.get("torch"), os.environ.get("LF_GPU_CHECK_PEAK_DIR")
    if torch is None or not where:
        return
    try:
        if not torch.cuda.is_initialized():
            return
        import json
        doc = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "argv": sys.argv[:4],
               "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
               "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        with open(os.path.join(where, "peak-%d.json" % os.getpid()), "w") as f:
            json.dump(doc, f)
    except Exception:  # a measurement must never change how a run ends
        pass


atexit.register(_record_peak)

if os.environ.get("LF_GPU_CHECK_SKIP_FINAL_SAVE") == "1":
    import importlib.abc
    import importlib.util

    class _SkipSave(importlib.abc.MetaPathFinder):
        """Once latentforge.train.trainer is executed, make Trainer.save a no-op (checkpoint_every is set
        beyond max_steps, so the final save is the only one)."""

        def find_spec(self, name, path=None, target=None):
            if name != "latentforge.train.trainer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)

                def save(self):
                    print("gpu_check: final checkpoint skipped (LF_GPU_CHECK_SKIP_FINAL_SAVE=1)", file=sys.stderr)

                module.Trainer.save = save

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _SkipSave())
'''


def write_hook(folder: Path) -> Path:
    """The folder holding the children's sitecustomize.py."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HOOK)
    return folder


def child_env(tiny: bool, hook_dir: Path, peak_dir: Path, skip_final_save: bool) -> dict[str, str]:
    """The children's environment: offline (no internet on the GPU machine; a hub lookup would only time
    out), no inherited launcher variables, the hook on PYTHONPATH; --tiny hides any GPU and runs DeepSpeed's
    CPU accelerator (gloo), as the tests do."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", LF_GPU_CHECK_PEAK_DIR=str(peak_dir))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), *filter(None, [env.get("PYTHONPATH")])])
    if skip_final_save:
        env["LF_GPU_CHECK_SKIP_FINAL_SAVE"] = "1"
    else:
        env.pop("LF_GPU_CHECK_SKIP_FINAL_SAVE", None)
    if tiny:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    peak_dir.mkdir(parents=True, exist_ok=True)
    return env


@dataclass
class RunResult:
    """How one launched command ended."""

    command: list[str]
    rc: int | None  # None: killed at its time limit
    wall_s: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def describe(self) -> dict[str, Any]:
        return {"command": " ".join(self.command), "rc": self.rc, "wall_s": round(self.wall_s, 2),
                "timed_out": self.rc is None, "log": str(self.log)}


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout_s: float) -> RunResult:
    """Run `cmd` from the repository root, output to `log`; past `timeout_s`, end it and every process it
    started (launchers put their workers in sessions of their own, so by process tree, not group)."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            tree = [psutil.Process(proc.pid)]
            try:
                tree += tree[0].children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            for p in tree:
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(tree, timeout=15)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait(30)
            rc = None
    return RunResult(cmd, rc, time.perf_counter() - t, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cache_command(config: Path, nproc: int, overrides: list[str]) -> list[str]:
    """What `make cache` runs: the CLI for one process, torchrun with one process per GPU otherwise."""
    if nproc <= 1:
        return [str(BIN / "latentforge"), "cache", "--config", str(config), *overrides]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "latentforge.preprocess",
            "--config", str(config), *overrides]


def train_command(config: Path, nproc: int, overrides: list[str]) -> list[str]:
    """What `make train NPROC=N` runs: the deepspeed launcher (here for N = 1 too)."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(max(1, nproc)), "--master_port", str(free_port()),
            "--module", "latentforge.train", "--config", str(config), *overrides]


def read_peak(peak_dir: Path) -> dict[str, float] | None:
    """Largest per-process peak the hook recorded (each process owns one GPU), or None (CPU, or killed)."""
    docs = []
    for p in peak_dir.glob("peak-*.json"):
        try:
            docs.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    if not docs:
        return None
    return {"max_allocated_gib": round(max(d["max_allocated_gib"] for d in docs), 2),
            "max_reserved_gib": round(max(d["max_reserved_gib"] for d in docs), 2), "processes": len(docs)}


def cache_figures(cache: Path, run: RunResult) -> dict[str, Any]:
    """Images/s of the cache job: steady state (images / first shard start -> last shard commit, from the
    manifests), the job's own (its summary: model loading included) and end to end (launcher wall clock)."""
    summary = json.loads((cache / "summary.json").read_text())
    starts, ends, seen = [], [], 0
    for commit in (cache / "shards").glob("*/commit.json"):
        stats = json.loads(commit.read_text()).get("stats") or {}
        if "finished_at" in stats and "total" in stats.get("seconds", {}):
            ends.append(stats["finished_at"])
            starts.append(stats["finished_at"] - stats["seconds"]["total"])
            seen += int(stats.get("seen", 0))
    span = max(ends) - min(starts) if ends else None
    out = {"images": summary["samples_seen"], "cached_samples": summary["samples"], "skipped": summary["skipped_total"],
           "skip_reasons": summary["skip_reasons"], "buckets": len(summary["buckets"]), "resize_paths": summary["upscale"],
           "images_per_s_steady": round(seen / span, 2) if span else None, "steady_span_s": round(span, 2) if span else None,
           "images_per_s_job": summary["images_per_second"], "job_wall_s": summary["wall_seconds"],
           "images_per_s_end_to_end": round(summary["samples_seen"] / run.wall_s, 2),
           "seconds_by_phase_summed_over_shards": summary["seconds_by_phase"],
           "bytes_per_sample": summary["bytes_per_sample"], "processes": summary["processes"]}
    return out


def train_figures(out_dir: Path, run: RunResult) -> dict[str, Any]:
    """Steady-state figures of a training run: the trainer's last logging window (`train.log_every` steps)."""
    summary = json.loads((out_dir / "run_summary.json").read_text())
    window = summary.get("last_window") or {}
    losses = [json.loads(line)["loss"] for line in (out_dir / "train_log.jsonl").read_text().splitlines() if line]
    steps_per_s = window.get("perf/steps_per_s")
    loop_s = summary.get("seconds")
    return {
        "steps": summary["steps"], "global_batch": summary["global_batch"], "world_size": summary["world_size"],
        "trainable_parameters": summary["trainable_parameters"],
        "steps_per_s": steps_per_s, "images_per_s": window.get("perf/samples_per_s"),
        "loader_share": window.get("perf/data_wait_share"),
        "peak_gpu_memory_gib_logged": window.get("perf/max_memory_gib"),
        "loop_s": loop_s, "startup_and_exit_s": round(run.wall_s - loop_s, 2) if loop_s is not None else None,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
    }
