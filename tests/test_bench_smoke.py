"""`make bench` at toy sizes: every benchmark runs end to end and the summary has exactly its keys
(memory_estimate, which has no summary key, in tests/test_memory_estimate.py).

The figures themselves mean nothing at these sizes (seconds of work, 1-2 steps); only that each benchmark
runs, writes its result file and produces finite numbers. One process runs them all (`--in-process`),
so the imports are paid once; the cache-scaling benchmark still launches the cache job with torchrun.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("bytes_per_sample", "reader_throughput", "objstore_read", "loader_share", "caching_speedup",
              "cache_scaling", "gpu_sdxl")
SUMMARY_KEYS = {"loader_share", "loader_vs_raw", "loader_vs_npz", "loader_vs_pt", "caching_speedup",
                "cache_scaling_2v1", "bytes_vs_raw", "loader_vs_codec", "objstore_vs_local_20ms",
                "objstore_read_through_vs_local_20ms", "loader_share_objstore_20ms", "bytes_dedup_vs_raw", "cache_overlap",
                "machine", "date"}


@pytest.mark.slow
def test_every_benchmark_runs_at_toy_size(tmp_path, tiny_sdxl):
    results, work = tmp_path / "results", tmp_path / "work"
    env = dict(os.environ, LATENTFORGE_BENCH_TINY_SDXL=str(tiny_sdxl))  # the session's build: no second one
    # memory_estimate's smoke run is tests/test_memory_estimate.py::test_smoke_run_writes_the_table (no summary key).
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--size", "smoke", "--in-process", "--results", str(results),
         "--workdir", str(work), "--only", ",".join(BENCHMARKS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((results / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    for key in SUMMARY_KEYS - {"machine", "date"}:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, (key, summary[key])
    assert summary["machine"] and summary["date"]

    for name in BENCHMARKS:
        doc = json.loads((results / f"{name}.json").read_text())
        assert doc["name"] == name and "error" not in doc, doc.get("error")
        if name == "gpu_sdxl" and doc.get("skipped"):
            assert "torch.cuda.is_available() is False" in doc["skipped"]
            continue
        assert doc["table"], name
        for r in doc["table"]:
            assert r["value"] is None or math.isfinite(r["value"]), (name, r)
    assert "latentforge benchmarks (smoke)" in proc.stdout
