"""`make bench`: run every benchmark, print one table, write bench/results/<name>.json and summary.json.

Each benchmark runs in its own Python process (`python -m bench.<name>`), so one's threads, DeepSpeed
process group or memory never leak into the next; `--in-process` runs them in this process instead (the
smoke test uses it to pay for the imports once). The GPU benchmark is skipped, with a line saying so,
where `torch.cuda.is_available()` is False.

    python -m bench.run_all [--size full|smoke] [--only a,b] [--results DIR] [--workdir DIR]
                            [--in-process] [--docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, ROOT, SIZES, default_workdir, format_row, machine_info, now_iso, save_json

# Cheapest first; the GPU one last. memory_estimate is arithmetic on meta tensors (seconds, no summary key).
BENCHMARKS = ("memory_estimate", "bytes_per_sample", "reader_throughput", "objstore_read", "loader_share",
              "caching_speedup", "cache_scaling", "gpu_sdxl")
SUMMARY_KEYS = ("loader_share", "loader_vs_raw", "loader_vs_npz", "loader_vs_pt", "caching_speedup",
                "cache_scaling_2v1", "bytes_vs_raw", "loader_vs_codec", "objstore_vs_local_20ms",
                "objstore_read_through_vs_local_20ms", "loader_share_objstore_20ms", "bytes_dedup_vs_raw", "cache_overlap")
# Goal of each summary figure (issue 5): (comparison, threshold, what it is).
GOALS = {
    "loader_share": ("<=", 0.02, "share of step time waiting for data"),
    "loader_vs_raw": (">=", 0.5, "cached reader vs raw memmap, warm"),
    "loader_vs_npz": (">=", 1.0, "cached reader vs .npz per sample, warm"),
    "loader_vs_pt": (">=", 1.0, "cached reader vs .pt per sample, warm"),
    "caching_speedup": (">=", 1.5, "steps/s from the cache vs encoders in the loop"),
    "cache_scaling_2v1": (">=", 1.7, "cache job, 2 vs 1 processes"),
    "bytes_vs_raw": ("<=", 0.9, "bytes on disk per sample vs raw fp16"),
    "loader_vs_codec": (">=", 0.9, "cached reader vs single-thread decompression of the same chunks"),
    "objstore_vs_local_20ms": (">=", 0.5, "one worker reading an object store at 20 ms/request (shard-window order) vs local disk"),
    "objstore_read_through_vs_local_20ms": (">=", 0.5, "same, shard files copied by train.read_through_dir"),
    "loader_share_objstore_20ms": ("<=", 0.02, "share of step time waiting for data, cache on the store"),
    "bytes_dedup_vs_raw": ("<=", 0.9, "bytes per sample vs raw, each caption shared by 8 samples"),
    "cache_overlap": (">=", 0.85, "cache job images/s / its encoders' images/s on the same batches"),
}
DOCS_START, DOCS_END = "<!-- bench:table:start -->", "<!-- bench:table:end -->"


def _run_subprocess(name: str, size: str, workdir: Path, out: Path) -> None:
    log = workdir / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", f"bench.{name}", "--size", size, "--workdir", str(workdir), "--out", str(out)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log {log}:\n" + "\n".join(tail))


def _run_in_process(name: str, size: str, workdir: Path, out: Path) -> None:
    module = importlib.import_module(f"bench.{name}")
    module_workdir = workdir / name
    module_workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    doc = module.run(size, module_workdir)
    doc.update(name=name, size=size, seconds=round(time.perf_counter() - t, 1), date=now_iso())
    save_json(doc, out)


def _machine_busy_s() -> float:
    """CPU seconds every process on the machine has used so far (/proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the benchmarks and what they launched)."""
    import resource

    kids, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return kids.ru_utime + kids.ru_stime + me.ru_utime + me.ru_stime


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def render_table(docs: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'figure':<58} {'value':>16}  {'goal':<14} status  (detail)"]
    for doc in docs:
        if doc.get("skipped"):
            lines.append(f"{doc['name']}: skipped: {doc['skipped']}")
            continue
        if doc.get("error"):
            lines.append(f"{doc['name']}: FAILED: {doc['error'].splitlines()[0]}")
            continue
        for r in doc.get("table", []):
            lines.append(format_row(r) + (f"  ({r['detail']})" if r.get("detail") else ""))
    return lines


def goal_met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, threshold, _ = GOALS[key]
    return value <= threshold if op == "<=" else value >= threshold


def summary_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for key, (op, threshold, what) in GOALS.items():
        v = summary.get(key)
        shown = "n/a" if v is None else (f"{100 * v:.2f} %" if key.startswith("loader_share") else f"{v:.3f}x")
        goal = f"{op} {100 * threshold:.0f} %" if key.startswith("loader_share") else f"{op} {threshold}x"
        met = {True: "met", False: "MISSED", None: ""}[goal_met(key, v)]
        out.append(f"{key:<18} {shown:>9}  goal {goal:<9} {met:<7} {what}")
    return out


def markdown_summary(summary: dict[str, Any]) -> str:
    out = ["| summary.json | value | goal | met | what |", "|---|---|---|---|---|"]
    for key in GOALS:
        v = summary.get(key)
        shown = "n/a" if v is None else (f"{100 * v:.2f} %" if key.startswith("loader_share") else f"{v:.3f}x")
        op, threshold, what = GOALS[key]
        goal = f"{op} {100 * threshold:.0f} %" if key.startswith("loader_share") else f"{op} {threshold}x"
        met = {True: "yes", False: "**no**", None: ""}[goal_met(key, v)]
        out.append(f"| `{key}` | {shown} | {goal} | {met} | {what} |")
    return "\n".join(out)


def markdown_table(docs: list[dict[str, Any]]) -> str:
    from .common import format_value

    out = ["| figure | value | goal | met | detail |", "|---|---|---|---|---|"]
    for doc in docs:
        if doc.get("skipped") or doc.get("error"):
            out.append(f"| {doc['name']} | {'skipped' if doc.get('skipped') else 'failed'} | | | "
                       f"{(doc.get('skipped') or doc.get('error', '')).splitlines()[0]} |")
            continue
        for i, r in enumerate(doc.get("table", [])):
            met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
            fig = r["figure"].strip()
            fig = f"&nbsp;&nbsp;{fig}" if r["figure"].startswith("  ") else f"**{fig}**"
            detail = r.get("detail", "")
            if i == 0 and doc.get("other_processes_cores") is not None:
                detail += f" [other processes: {doc['other_processes_cores']:.2f} cores busy during this benchmark]"
            out.append(f"| {fig} | {format_value(r['value'], r['unit'])} | {r.get('goal', '')} | {met} | {detail} |")
    return "\n".join(out)


def update_docs(path: Path, docs: list[dict[str, Any]], summary: dict[str, Any], command: str, wall_s: float) -> None:
    """Replace the table between the bench markers in `path` with this run's."""
    text = path.read_text()
    if DOCS_START not in text or DOCS_END not in text:
        raise SystemExit(f"{path}: no {DOCS_START} ... {DOCS_END} markers to replace")
    block = "\n".join([
        DOCS_START,
        f"Machine: {summary['machine']}  ",
        f"Date: {summary['date']}  ",
        f"Command: `{command}` (about {wall_s / 60:.0f} min)",
        "",
        markdown_summary(summary),
        "",
        "Every figure:",
        "",
        markdown_table(docs),
        DOCS_END,
    ])
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(head + block + tail)


def render_saved(args: argparse.Namespace) -> int:
    """Table (and docs) from the result files of an earlier run."""
    results = args.results.absolute()
    summary = json.loads((results / "summary.json").read_text())
    docs = [json.loads((results / f"{n}.json").read_text()) for n in BENCHMARKS if (results / f"{n}.json").exists()]
    wall = sum(float(d.get("seconds", 0)) for d in docs)
    for line in render_table(docs):
        print(line)
    for line in summary_lines(summary):
        print(line)
    if args.docs:
        update_docs(args.docs, docs, summary, "make bench", wall)
        print(f"table written to {args.docs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--workdir", type=Path, default=None, help="scratch space (default .cache/bench)")
    p.add_argument("--in-process", action="store_true", help="run the benchmarks in this process")
    p.add_argument("--docs", type=Path, default=None, help="also rewrite the results table in this markdown file")
    p.add_argument("--from-results", action="store_true",
                   help="run nothing: print the table of the result files in --results (and write --docs)")
    args = p.parse_args(argv)
    if args.from_results:
        return render_saved(args)
    names = [n for n in BENCHMARKS if not args.only or n in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    workdir = (args.workdir or default_workdir()).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    results = args.results.absolute()
    results.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.run_all", *(sys.argv[1:] if argv is None else argv)])
    info = machine_info(workdir)
    print(f"machine: {info['line']}", flush=True)
    print(f"date: {now_iso()}; size: {args.size}; scratch: {workdir}; results: {results}", flush=True)
    t_all = time.perf_counter()
    docs: list[dict[str, Any]] = []
    failed = False
    for name in names:
        out = results / f"{name}.json"
        if name == "gpu_sdxl" and not gpu_available():
            reason = ("torch.cuda.is_available() is False: no GPU here. On a GPU machine run "
                      "`python -m bench.gpu_sdxl` (full-size SDXL UNet, VAE and text encoders from their real configs)")
            print(f"[{name}] skipped: {reason}", flush=True)
            doc = {"name": name, "skipped": reason, "date": now_iso()}
            save_json(doc, out)
            docs.append(doc)
            continue
        print(f"[{name}] running ({args.size}) ...", flush=True)
        t = time.perf_counter()
        busy0, ours0 = _machine_busy_s(), _own_cpu_s()
        try:
            (_run_in_process if args.in_process else _run_subprocess)(name, args.size, workdir, out)
            doc = json.loads(out.read_text())
            seconds = time.perf_counter() - t
            # What else ran on the machine meanwhile (other users' jobs): average cores they used.
            doc["other_processes_cores"] = round(max(0.0, (_machine_busy_s() - busy0) - (_own_cpu_s() - ours0)) / seconds, 2)
            save_json(doc, out)
        except Exception as exc:  # noqa: BLE001 - one benchmark failing must not hide the others
            failed = True
            doc = {"name": name, "error": f"{type(exc).__name__}: {exc}", "date": now_iso()}
            save_json(doc, out)
            print(f"[{name}] FAILED: {doc['error']}", flush=True)
        else:
            print(f"[{name}] done in {time.perf_counter() - t:.0f} s; other processes used "
                  f"{doc['other_processes_cores']:.2f} of {info['cores']} cores meanwhile", flush=True)
            for line in render_table([doc]):
                print("    " + line, flush=True)
        docs.append(doc)
    wall = time.perf_counter() - t_all

    summary: dict[str, Any] = {key: None for key in SUMMARY_KEYS}
    for doc in docs:
        for key, value in (doc.get("summary") or {}).items():
            if key in summary:
                summary[key] = None if value is None or not math.isfinite(value) else float(value)
    previous = results / "summary.json"
    if args.only and previous.exists():  # a partial run keeps the other figures of the last full one
        old = json.loads(previous.read_text())
        for key in SUMMARY_KEYS:
            if summary[key] is None and old.get(key) is not None:
                summary[key] = old[key]
    summary["machine"] = info["line"]
    summary["date"] = now_iso()
    save_json(summary, results / "summary.json")

    print("\n" + "=" * 110)
    print(f"latentforge benchmarks ({args.size}), {summary['date']}, {wall / 60:.1f} min")
    print(f"machine: {summary['machine']}")
    print("=" * 110)
    for line in render_table(docs):
        print(line)
    print("-" * 110)
    for line in summary_lines(summary):
        print(line)
    if args.docs:
        update_docs(args.docs, docs, summary, command, wall)
        print(f"table written to {args.docs}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
