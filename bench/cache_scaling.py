"""Benchmark 4: images/s of the cache job with 1 and 2 processes on the same input, through the real launcher:
`python -m torch.distributed.run --standalone --nproc_per_node N -m latentforge.preprocess --config
configs/demo.yaml ... --overwrite`, into a fresh cache folder each run.

Input: the demo photos written with 4 samples per shard (7 tars + a 28-image folder in 4-image virtual
shards): 14 shards, 56 images. Model: the tiny SDXL pipeline with a VAE of channels (16, 32, 64, 64), so
the VAE dominates as it does for SDXL. Threads: OMP_NUM_THREADS=1 in every process (the same per-process
setting for 1 and 2 processes: process scaling alone); with `all_cores_run`, also one process with
OMP_NUM_THREADS = cores (what `make cache` gives with NPROC=1). `cache.workers` (image preparation
threads) stays at its default. Both `cache.deterministic` settings are run: true (the default) disables
oneDNN so 1 and N processes give identical bits, false lets oneDNN pick its kernels.

Two figures per run: end-to-end (wall clock of the launcher: imports, model loading and the summary
included) and steady state (images / the span from the first shard's start to the last shard's commit,
from the committed manifests). The 2-vs-1 ratio of each is reported; the headline is steady state with
the default `cache.deterministic=true`. Each configuration runs twice, alternating, and the faster run
counts: this machine is shared, and the CPU other processes used during each run (from /proc/stat minus
our own rusage) is recorded beside it. A control runs the VAE's work alone (one thread, no I/O) in one
process and then in two at once: its ratio is the most two processes can get from this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import ROOT, cli, row

SIZES = {
    "full": {"copies": 1, "samples_per_shard": 4, "rounds": 2, "vae_width": 16, "deterministic": (True, False),
             "all_cores_run": False, "control_iterations": 15, "torchrun_for_one": True,
             "writer_arrays": 300, "prepare_processes": 1, "overlap_samples_per_shard": 28},
    "smoke": {"copies": 1, "samples_per_shard": 7, "rounds": 1, "vae_width": 8, "deterministic": (False,),
              "all_cores_run": False, "folder_only": True, "control_iterations": 0,
              "torchrun_for_one": False, "writer_arrays": 6, "prepare_processes": 1, "overlap_samples_per_shard": 7},
}


def one_run(nproc: int, threads: int, deterministic: bool, overrides: list[str], cache: Path,
            torchrun_for_one: bool = True) -> dict[str, Any]:
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), *overrides, f"cache.path={cache}",
            f"cache.deterministic={'true' if deterministic else 'false'}", "--overwrite"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "latentforge.preprocess", *args]
    busy0, ours0 = _machine_busy_s(), _children_cpu_s()
    t = time.perf_counter()
    if nproc == 1 and not torchrun_for_one:
        # Smoke runs only: one process in this one (the same `run_cache`, a world of one), no launch.
        import torch

        from latentforge.preprocess.job import run_cache
        from latentforge.shared.config import load_config

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            code = run_cache(load_config(args[1], args[2:-1]), overwrite=True)
        finally:
            torch.set_num_threads(before)
        cmd = ["(in process) latentforge.preprocess.job.run_cache", *args]
        if code != 0:
            raise RuntimeError(f"cache job failed in process: exit code {code}")
    else:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = CpuSampler(proc.pid)
        sampler.start()
        out, err = proc.communicate(timeout=900)
        sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"cache job failed ({nproc} processes): {' '.join(cmd)}\n{out[-2000:]}\n{err[-4000:]}")
    wall = time.perf_counter() - t
    ours = _children_cpu_s() - ours0
    others = max(0.0, (_machine_busy_s() - busy0) - ours) / wall
    summary = json.loads((cache / "summary.json").read_text())
    starts, ends, seen = [], [], 0
    for commit in (cache / "shards").glob("*/commit.json"):
        m = json.loads(commit.read_text())
        end = m["stats"]["finished_at"]
        starts.append(end - m["stats"]["seconds"]["total"])
        ends.append(end)
        seen += m["stats"]["seen"]
    span = max(ends) - min(starts)
    result = {"nproc": nproc, "deterministic": deterministic, "omp_threads": threads, "wall_s": wall,
              "images": seen, "span_s": span, "images_per_s_steady": seen / span, "images_per_s_end_to_end": seen / wall,
              "seconds_by_phase": summary["seconds_by_phase"], "other_processes_cores": others,
              "peak_host_mb_per_rank": summary.get("peak_host_mb_per_rank"),
              "command": " ".join(cmd[1:])}
    if nproc > 1 or torchrun_for_one:
        job_cpu, machine = sampler.between(min(starts), max(ends))
        result.update(steady_job_cores=job_cpu / span, steady_other_cores=max(0.0, machine - job_cpu) / span,
                      steady_cpu_s_per_image=job_cpu / seen)
    return result


class CpuSampler:
    """Samples, every 0.1 s, the CPU seconds used so far by a process tree (/proc/<pid>/stat of every
    descendant) and by the whole machine (/proc/stat), so CPU use over the steady-state window can be cut
    out afterwards: how many cores the job actually got, and how many other processes took."""

    def __init__(self, root: int) -> None:
        import threading

        self.root, self.samples, self._stop = root, [], threading.Event()
        self._cpu: dict[int, float] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        parent: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = [self.root], [self.root]
        while frontier:
            frontier = [p for p, pp in parent.items() if pp in frontier]
            tree += frontier
        return tree

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    self._cpu[pid] = max(self._cpu.get(pid, 0.0), (int(fields[11]) + int(fields[12])) / self._tick)
                except (OSError, IndexError, ValueError):
                    continue
            self.samples.append((time.time(), sum(self._cpu.values()), _machine_busy_s()))
            self._stop.wait(0.1)

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """(job CPU seconds, machine busy CPU seconds) between two time.time() instants (interpolated)."""
        import numpy as np

        t, job, machine = (np.array(c) for c in zip(*self.samples, strict=True))
        return (float(np.interp(t1, t, job) - np.interp(t0, t, job)),
                float(np.interp(t1, t, machine) - np.interp(t0, t, machine)))


def _machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (/proc/stat), to see what else ran meanwhile."""
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """CPU seconds of this process and of its children that have exited (the launched cache job)."""
    import resource

    kids, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return kids.ru_utime + kids.ru_stime + me.ru_utime + me.ru_stime


# The control: the VAE's convolutions alone, on one thread, in fresh processes (no I/O, no Python loop work).
_CONTROL = """
import sys, time, torch
torch.set_num_threads(1)
torch.backends.mkldnn.enabled = sys.argv[3] == "onednn"
from bench.models import vae
model, x = vae(int(sys.argv[1])), torch.rand(2, 3, 256, 256) * 2 - 1
with torch.inference_mode():
    model.encode(x)
    t = time.perf_counter()
    for _ in range(int(sys.argv[2])):
        model.encode(x)
print(time.perf_counter() - t)
"""


def machine_ceiling(width: int, iterations: int, cores: int, deterministic: bool) -> dict[str, float]:
    """What two processes can get out of this machine at best: the same single-threaded VAE work (oneDNN
    off when `deterministic`, as the cache job does) run in one process alone, then in two processes at
    once; aggregate speed-up = 2 x alone / together."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    mode = "native" if deterministic else "onednn"

    def launch(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", _CONTROL, str(width), str(iterations), mode], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
        return [float(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]

    alone, together = [], []
    for _ in range(2):  # best of two: other processes on a shared machine only ever slow a run down
        alone.append(launch(1)[0])
        together.append(max(launch(min(2, cores))))
    return {"alone_s": min(alone), "two_at_once_s": min(together),
            "speedup_2v1": min(2, cores) * min(alone) / min(together), "all_s": {"alone": alone, "together": together}}


def writer_array_cost(workdir: Path, arrays: int) -> dict[str, float]:
    """ms to create one array of a group and append 4 rows: zarr-python vs the cache writer's own.

    The cache job on small shards creates hundreds of arrays (every field, every bucket, every group);
    this is the cost the direct writers of `shared/shard_writer.py` remove. Same rows (every field of the
    demo's 256x256 bucket at tiny-model widths), same storage, alternated 3 times, median per array.
    """
    import zarr

    from latentforge.preprocess.cache_writer import _array_template, _create_array, to_storage
    from latentforge.preprocess.shard_writer import ChunkWriter, RowShardWriter
    from latentforge.shared.storage import Storage

    from .common import median, sdxl_spec

    bucket = (256, 256)
    spec = sdxl_spec(shard_rows=4, bucket=bucket, pooled_dim=64, text_dim=96)
    fields = [(f, tuple(f.row_shape(bucket, spec.vae_downsample)), f.per_row(bucket, spec.vae_downsample))
              for f in spec.fields]
    rng = np.random.default_rng(0)
    data = {f.name: to_storage(f, [f"k{i}" for i in range(4)] if f.is_text
                               else rng.standard_normal((4, *shape), dtype=np.float32) * 100)
            for f, shape, _ in fields}
    groups = max(1, arrays // len(fields))

    def with_zarr(root: Path) -> None:
        group = zarr.open_group(str(root), mode="w", zarr_format=3)
        for i in range(groups):
            sub = group.create_group(f"b{i}")
            for f, shape, per_row in fields:
                _create_array(sub, f, shape, per_row, spec).append(data[f.name])

    def direct(root: Path) -> None:
        storage = Storage(str(root))
        for i in range(groups):
            for f, shape, per_row in fields:
                writer = RowShardWriter if per_row else ChunkWriter
                writer(storage, f"b{i}/{f.name}", _array_template(f, shape, per_row, spec)).append(data[f.name])

    times: dict[str, list[float]] = {"zarr_python_ms": [], "direct_ms": []}
    for _ in range(3):
        for key, fn in (("zarr_python_ms", with_zarr), ("direct_ms", direct)):
            root = workdir / "writer_cost"
            shutil.rmtree(root, ignore_errors=True)
            t = time.perf_counter()
            fn(root)
            times[key].append((time.perf_counter() - t) * 1e3 / (groups * len(fields)))
    shutil.rmtree(workdir / "writer_cost", ignore_errors=True)
    return {k: median(v) for k, v in times.items()}


def run(size: str, workdir: Path) -> dict[str, Any]:
    from latentforge.devkit.demo_data import write_demo_data

    from . import models

    cfg = SIZES[size]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    demo = write_demo_data(workdir / "data", samples_per_shard=cfg["samples_per_shard"])
    model = models.pipeline_folder(workdir, workdir / "model", unet_model=models.unet((16, 32), 96, 64),
                                   vae_model=models.vae(cfg["vae_width"]))
    def sources(demo: Any, per_shard: int) -> str:
        one = f"{{type: folder, path: '{demo.root}/folder', shard_size: {per_shard}}}"
        if not cfg.get("folder_only"):
            one = f"{{type: webdataset, path: '{demo.root}/webdataset/{{00000..{len(demo.shards) - 1:05d}}}.tar'}}, " + one
        return "data.sources=[" + ", ".join([one] * cfg["copies"]) + "]"

    common = [f"model.pretrained={model}", f"train.output_dir={workdir / 'unused'}"]
    overrides = [*common, sources(demo, cfg["samples_per_shard"])]
    # (processes, OMP threads per process): 1 thread each is the consistent setting (process scaling
    # alone); one process with every core is what `make cache` with NPROC=1 gives, shown beside it.
    layouts = [(1, 1), (2, max(1, cores // 2))] + ([(1, cores)] if cfg["all_cores_run"] and cores > 1 else [])
    runs: list[dict[str, Any]] = []
    for _ in range(cfg["rounds"]):
        for det in cfg["deterministic"]:
            for n, threads in layouts:
                runs.append(one_run(n, threads, det, overrides, workdir / "cache", cfg["torchrun_for_one"]))
    # cache_overlap runs: 1 process x 1 thread (the encoder), preparation in `prepare_processes` worker
    # processes (the other core) or on threads, writes on the write thread; the same photos in shards of
    # `overlap_samples_per_shard` (a shard's first batch is prepared while the encoder waits, so 4-image
    # shards measure that drain, not the steady state; real shards hold thousands).
    per_shard = cfg["overlap_samples_per_shard"]
    big = write_demo_data(workdir / f"data-{per_shard}", samples_per_shard=per_shard)
    overlap_runs: dict[int, list[dict[str, Any]]] = {0: [], cfg["prepare_processes"]: []}
    for _ in range(cfg["rounds"]):
        for procs in overlap_runs:
            overlap_runs[procs].append(one_run(1, 1, cfg["deterministic"][0], [*common, sources(big, per_shard),
                                               f"cache.prepare_processes={procs}"], workdir / "cache", cfg["torchrun_for_one"]))
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    ceiling = {f"deterministic={str(det).lower()}": machine_ceiling(cfg["vae_width"], cfg["control_iterations"], cores, det)
               for det in cfg["deterministic"] if cfg["control_iterations"]}

    def fig(det: bool, n: int, threads: int, key: str) -> float:
        """Best round (fastest run: other processes on a shared machine only ever slow a run down)."""
        sel = [r for r in runs if r["deterministic"] == det and r["nproc"] == n and r["omp_threads"] == threads]
        return max(sel, key=lambda r: r["images_per_s_steady"])[key]

    ratios: dict[str, dict[str, float]] = {}
    table = []
    two = max(1, cores // 2)
    for det in cfg["deterministic"]:
        d = f"deterministic={str(det).lower()}"
        one1, two_ = fig(det, 1, 1, "images_per_s_steady"), fig(det, 2, two, "images_per_s_steady")
        steady = two_ / one1
        e2e = fig(det, 2, two, "images_per_s_end_to_end") / fig(det, 1, 1, "images_per_s_end_to_end")
        ratios[d] = {"steady": steady, "end_to_end": e2e}
        head = det == cfg["deterministic"][0]
        table.append(row(f"{'' if head else '  '}cache job 2 vs 1 processes, 1 thread each, steady ({d})",
                         steady, "x", ">= 1.7x" if head else "", (steady >= 1.7) if head else None,
                         f"{one1:.2f} -> {two_:.2f} images/s, {int(fig(det, 1, 1, 'images'))} images; best of "
                         f"{cfg['rounds']}; other processes used {fig(det, 1, 1, 'other_processes_cores'):.2f} / "
                         f"{fig(det, 2, two, 'other_processes_cores'):.2f} cores meanwhile"))
        r1 = max((r for r in runs if r["deterministic"] == det and r["nproc"] == 1 and r["omp_threads"] == 1),
                 key=lambda r: r["images_per_s_steady"])
        r2 = max((r for r in runs if r["deterministic"] == det and r["nproc"] == 2), key=lambda r: r["images_per_s_steady"])
        if "steady_cpu_s_per_image" in r1 and "steady_cpu_s_per_image" in r2:
            eff = r1["steady_cpu_s_per_image"] / r2["steady_cpu_s_per_image"]
            ratios[d].update(cpu_efficiency=eff, cores_1=r1["steady_job_cores"], cores_2=r2["steady_job_cores"])
            table.append(row(f"  CPU per image, 1 vs 2 processes ({d})", eff, "x", "", None,
                             f"{r1['steady_cpu_s_per_image'] * 1e3:.0f} vs {r2['steady_cpu_s_per_image'] * 1e3:.0f} ms; "
                             f"the job got {r1['steady_job_cores']:.2f} vs {r2['steady_job_cores']:.2f} cores, other "
                             f"processes took {r1['steady_other_cores']:.2f} / {r2['steady_other_cores']:.2f}; 2 x this "
                             f"= the 2v1 figure with two free cores"))
        if (1, cores) in layouts:
            one_all = fig(det, 1, cores, "images_per_s_steady")
            ratios[d]["steady_vs_one_process_all_cores"] = two_ / one_all
            table.append(row(f"  2 processes x {two} thread vs 1 process x {cores} threads, steady ({d})", two_ / one_all,
                             "x", "", None, f"{one_all:.2f} -> {two_:.2f} images/s"))
        table.append(row(f"  2 vs 1 processes (1 thread each), end to end incl. start-up ({d})", e2e, "x", "", None,
                         f"{fig(det, 1, 1, 'wall_s'):.1f} s -> {fig(det, 2, two, 'wall_s'):.1f} s wall"))
    for d, c in ceiling.items():
        table.append(row(f"  control: the VAE's convolutions alone, 2 vs 1 processes, 1 thread each ({d})", c["speedup_2v1"],
                         "x", "", None, "what the machine gave two processes at that moment (no I/O, no Python): the ceiling"))
    if True in cfg["deterministic"] and False in cfg["deterministic"]:
        slow = fig(False, 1, 1, "images_per_s_steady") / fig(True, 1, 1, "images_per_s_steady")
        table.append(row("  deterministic=false vs true, 1 process x 1 thread, steady", slow, "x", "", None,
                         "oneDNN on vs off (bitwise reproducibility across process counts costs this)"))
    writer = writer_array_cost(workdir, cfg["writer_arrays"])
    table.append(row("  array write (create + 4 rows), zarr-python vs the cache writer",
                     writer["zarr_python_ms"] / writer["direct_ms"], "x", "", None,
                     f"{writer['zarr_python_ms']:.2f} vs {writer['direct_ms']:.2f} ms per array, median of 3; "
                     f"the cache writer writes shard files + zarr.json itself (shared/shard_writer.py)"))
    headline = ratios[f"deterministic={str(cfg['deterministic'][0]).lower()}"]["steady"]
    # cache_overlap: images/s of the whole job / images/s of its encoders alone on the same batches
    # = encoder seconds / shard seconds, from the fastest 1-process, 1-thread run with preparation in
    # worker processes (writes on the write thread, the encoder on the job's thread); beside it the same
    # from the fastest run with preparation on threads (the layout runs above).
    def overlap_of(r: dict[str, Any]) -> tuple[float | None, float, dict[str, float]]:
        phases = r["seconds_by_phase"]
        encoders = phases.get("vae", 0.0) + phases.get("text", 0.0)
        return (encoders / phases["total"] if phases.get("total") else None), encoders, phases

    best_small = max((r for r in runs if r["nproc"] == 1 and r["omp_threads"] == 1), key=lambda r: r["images_per_s_steady"])
    best_threads = max(overlap_runs[0], key=lambda r: r["images_per_s_steady"])
    best_procs = max(overlap_runs[cfg["prepare_processes"]], key=lambda r: r["images_per_s_steady"])
    overlap_threads, overlap_small = overlap_of(best_threads)[0], overlap_of(best_small)[0]
    overlap, encoders, phases = overlap_of(best_procs)
    if overlap is not None:
        table.insert(1, row(f"cache_overlap: job images/s / encoders-alone images/s, 1 process x 1 thread, "
                            f"{cfg['prepare_processes']} preparation process, {per_shard} images per shard", overlap, "x", ">= 0.85x", overlap >= 0.85,
                            f"encoders {encoders:.2f} s of {phases['total']:.2f} s; prepare {phases.get('prepare', 0):.2f} s "
                            f"in worker processes, write {phases.get('write', 0):.2f} s on the write thread, the encoder "
                            f"waited {phases.get('write_wait', 0):.2f} s for writes, {phases.get('prepare_wait', 0):.2f} s "
                            f"for preparation and {max(0.0, phases['total'] - encoders - phases.get('write_wait', 0) - phases.get('prepare_wait', 0)):.2f} s "
                            "for everything else (reading, flush, commit); "
                            f"peak host memory {best_procs['peak_host_mb_per_rank'] or 0:.0f} MB per rank (workers included)"))
        table.insert(2, row("  same with preparation on threads (cache.prepare_processes=0)", overlap_threads, "x", "", None,
                            f"peak host memory {best_threads['peak_host_mb_per_rank'] or 0:.0f} MB per rank; waited "
                            f"{best_threads['seconds_by_phase'].get('prepare_wait', 0):.2f} s for preparation"))
        table.insert(3, row(f"  threads, {cfg['samples_per_shard']} images per shard (the 2-vs-1 runs)", overlap_small, "x",
                            "", None, "every shard's first batch prepared while the encoder waits"))
    return {"name": "cache_scaling", "table": table, "summary": {"cache_scaling_2v1": headline, "cache_overlap": overlap},
            "config": {**cfg, "cores": cores, "images": runs[0]["images"] if runs else 0,
                       "layouts": [{"processes": n, "omp_threads": t} for n, t in layouts]},
            "ratios": ratios, "control": ceiling, "writer": writer, "runs": runs, "overlap_runs": overlap_runs,
            "cache_overlap_threads": overlap_threads, "cache_overlap_small_shards": overlap_small}


if __name__ == "__main__":
    raise SystemExit(cli(run, "cache_scaling"))
