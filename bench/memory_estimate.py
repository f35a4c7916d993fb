"""GPU (and CPU) memory per training configuration for the real SDXL UNet: what fits on 24, 48 and 80 GB.

An estimate from parameter and state sizes that needs no GPU; it is not a GPU measurement.
`bench.gpu_sdxl` measures peak memory on a GPU for one configuration (ZeRO-2, AdamW): the check of these
figures where a GPU is available.

What is counted, per rank, and where it lives:

- **Parameters** are counted exactly: the real SDXL UNet config is built on the meta device (shapes, no
  memory). LoRA counts the adapters peft adds for `train.lora` (rank 16 and 64, default targets).
- **Optimizer state** is measured, not assumed: each `train.optimizer` choice steps once over meta tensors
  of every distinct parameter shape (ZeRO 0 hands the optimizer the model's own tensors) and over one flat
  1-D tensor of the size of a rank's partition (ZeRO 1-3 hand it one flat fp32 tensor per rank), and the
  state tensors it allocated are summed (shared ones once). Prodigy reads values (`.item()`), so it steps
  on real CPU tensors and its per-element rule is applied. Cross-check: the same optimizers step on a real
  1M-element CPU tensor and must allocate the same state (`checks` in the result file).
- **Optimizer temporaries** (the step's scratch tensors, e.g. foreach AdamW's sqrt of the second moment)
  are measured the same way: the peak bytes of tensors a second `step()` allocates, tracked with a
  `TorchDispatchMode`. bitsandbytes' CUDA kernels update in place (fused), so they have none.
- **DeepSpeed's copies and buffers** (bf16 weights, fp32 master copy, gradients, reduce buckets) follow
  DeepSpeed 0.19.8's own code with `bf16.enabled: true` and no `data_types` section; every figure names
  the file and line it comes from (`SOURCES`).
- **Activations** are not a function of parameter sizes. They are estimated separately by counting the
  tensors autograd saves for backward in one forward pass of the real UNet on the meta device (bf16,
  1024x1024, attention as the flash kernel saves it), with and without gradient checkpointing. That is a
  lower bound of the activation peak: backward's own temporaries are not counted.

"Fits" on a card means: held states + activations of one 1024x1024 sample with gradient checkpointing +
`RESERVE_GIB` (an assumption: CUDA context, NCCL buffers, allocator fragmentation) <= the card, and the
optimizer step's peak + `RESERVE_GIB` <= the card.

This module is the command (configurations, table, result file); the bytes-per-parameter accounting is
`bench.memory_model`, the measurements (parameters, optimizer state and scratch, activations)
`bench.memory_measure`.

    python -m bench.memory_estimate [--size full|smoke] [--out FILE] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, SIZES, default_workdir, format_row, now_iso, row, save_json
from .memory_measure import (
    LORA_TARGETS,
    OptimizerBytes,
    build_unet,
    cross_check,
    describe,
    saved_for_backward,
    unet_config,
)
from .memory_model import (
    CARDS_GIB,
    DS,
    GIB,
    NOTES,
    OPTIMIZERS,
    RESERVE_GIB,
    SOURCES,
    Model,
    Setup,
    estimate,
    fits,
    totals,
)

LORA_RANKS = (16, 64)


# ---- the table --------------------------------------------------------------------------------------
def setups(optimizers: Iterable[str] = OPTIMIZERS) -> list[Setup]:
    """The configurations of the table, per optimizer."""
    out = []
    for o in optimizers:
        out += [Setup(o, 0, 1), Setup(o, 2, 1), Setup(o, 2, 2), Setup(o, 2, 8), Setup(o, 3, 8),
                Setup(o, 2, 1, True), Setup(o, 2, 8, True), Setup(o, 3, 1, True, True), Setup(o, 3, 8, True, True)]
    return out


def table_rows(models: dict[str, Model], activations: dict[str, float],
               probes: dict[str, OptimizerBytes]) -> list[dict[str, Any]]:
    """Every configuration's row: GiB per rank on GPU (held, step peak) and CPU, fits 24/48/80, notes."""
    plan = [("full", s) for s in setups()] + [(f"lora{r}", Setup("adamw", 0, 1)) for r in LORA_RANKS]
    rows = []
    for model_key, s in plan:
        model = models[model_key]
        parts, notes = estimate(model, s, probes[s.optimizer])
        act = activations["lora" if model_key.startswith("lora") else "full"]
        entry: dict[str, Any] = {"model": model.name, "optimizer": s.optimizer, "setup": s.label, "stage": s.stage,
                                 "gpus": s.gpus, "offload_optimizer": s.offload_optimizer,
                                 "offload_param": s.offload_param, "notes": notes}
        if not parts:
            entry.update(refused=True, fits={str(c): False for c in CARDS_GIB})
        else:
            t = totals(parts)
            entry.update(t, fits={str(c): fits(t, act, c) for c in CARDS_GIB},
                         headroom_gib={str(c): round(c - RESERVE_GIB - t["gpu_held_gib"], 2) for c in CARDS_GIB},
                         parts=[{"what": x.what, "gib": round(x.nbytes / GIB, 3), "device": x.device, "when": x.when,
                                 "source": x.source} for x in parts])
        rows.append(entry)
    return rows


def _mark(r: dict[str, Any]) -> str:
    keys = {"flat": "a", "int32": "b", "prodigy_d": "p", "refused": "r"}
    return "".join(keys[n] for n in r["notes"])


def render(rows: list[dict[str, Any]], markdown: bool = False) -> list[str]:
    """The table as text (or markdown): one line per configuration."""
    head = ("model", "optimizer", "configuration", "GPU held", "GPU step peak", "CPU peak", "24", "48", "80", "notes")
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(f"{head[0]:<16}{head[1]:<11}{head[2]:<30}{head[3]:>9}{head[4]:>14}{head[5]:>9}  "
                     f"{head[6]:>3} {head[7]:>3} {head[8]:>3}  {head[9]}")
    for r in rows:
        if r.get("refused"):
            cells = (r["model"], r["optimizer"], r["setup"], "refused", "", "", "-", "-", "-", _mark(r))
        else:
            yes = ["yes" if r["fits"][str(c)] else "no" for c in CARDS_GIB]
            cells = (r["model"], r["optimizer"], r["setup"], f"{r['gpu_held_gib']:.1f}", f"{r['gpu_step_peak_gib']:.1f}",
                     f"{r['cpu_step_peak_gib']:.1f}", *yes, _mark(r))
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append(f"{cells[0]:<16}{cells[1]:<11}{cells[2]:<30}{cells[3]:>9}{cells[4]:>14}{cells[5]:>9}  "
                         f"{cells[6]:>3} {cells[7]:>3} {cells[8]:>3}  {cells[9]}")
    return lines


def run(size: str, workdir: Path | None = None) -> dict[str, Any]:
    """The whole estimate at `size` (full: the real SDXL UNet; smoke: a toy UNet), as a result document."""
    del workdir  # nothing touches the disk but the result file
    t0 = time.perf_counter()
    cfg = unet_config(size)
    full = describe(build_unet(cfg), "SDXL UNet" if size == "full" else "toy UNet")
    models = {"full": full}
    for r in LORA_RANKS:
        models[f"lora{r}"] = describe(build_unet(cfg, r), f"LoRA r{r}")
    act_full = saved_for_backward(cfg, 1)
    act_lora = saved_for_backward(cfg, 1, LORA_RANKS[0])
    activations = {"full": act_full["checkpointing"], "lora": act_lora["checkpointing"]}
    probes = {o: OptimizerBytes(o) for o in OPTIMIZERS}
    rows = table_rows(models, activations, probes)
    state_per_param = {o: {"zero0_model_shapes": probes[o].state(full.trainable) / full.n_trainable,
                           "flat_1d": probes[o].state({(full.n_trainable,): 1}) / full.n_trainable,
                           "temporaries_flat_1d": probes[o].temporary({(full.n_trainable,): 1}) / full.n_trainable}
                       for o in OPTIMIZERS}
    checks = cross_check(1 << 20 if size == "full" else 1 << 12)

    by = {(r["model"], r["optimizer"], r["setup"]): r for r in rows}
    table = [row(f"{full.name} parameters", full.n_trainable / 1e9, "B", detail=(
        f"{full.n_trainable:,}; LoRA r16 adapters {models['lora16'].n_trainable:,}, r64 "
        f"{models['lora64'].n_trainable:,} on {', '.join(LORA_TARGETS)}"))]
    for o in OPTIMIZERS:
        z0 = by[(full.name, o, "ZeRO-0 x1")]
        z2 = by[(full.name, o, "ZeRO-2 x8")]
        z3 = by[(full.name, o, "ZeRO-3 x1 + offload opt+param")]
        off = "refused" if z3.get("refused") else f"{z3['gpu_step_peak_gib']:.1f} GPU + {z3['cpu_step_peak_gib']:.1f} CPU"
        table.append(row(f"  {o}: GPU GiB per rank, ZeRO-0 on 1 GPU (step peak)", z0["gpu_step_peak_gib"], "GiB",
                         detail=f"held {z0['gpu_held_gib']:.1f}; ZeRO-2 x8 {z2['gpu_step_peak_gib']:.1f}; "
                                f"ZeRO-3 x1 offload opt+param {off}; state {state_per_param[o]['zero0_model_shapes']:.3g}"
                                f" B/param (ZeRO 0), {state_per_param[o]['flat_1d']:.3g} (ZeRO >= 1)"))
    for key, act in (("full", act_full), ("lora", act_lora)):
        table.append(row(f"  activations, 1 sample {cfg['sample_size'] * 8}px, {key}, gradient checkpointing",
                         act["checkpointing"], "GiB", detail=f"without checkpointing {act['no_checkpointing']:.1f} GiB; "
                         "saved-for-backward tensors on the meta device (a lower bound)"))
    return {"name": "memory_estimate", "table": table, "rows": rows,
            "models": {k: {"name": m.name, "trainable": m.n_trainable, "frozen": m.frozen,
                           "largest_module": m.largest_module, "small_params": m.small} for k, m in models.items()},
            "optimizer_bytes_per_param": state_per_param, "checks": checks,
            "activations_gib": {"full": act_full, "lora_r16": act_lora, "batch": 1,
                                "resolution": cfg["sample_size"] * 8},
            "assumptions": {"reserve_gib": RESERVE_GIB, "cards_gib": list(CARDS_GIB),
                            "fits": "max(gpu_held + activations(1 sample, checkpointing), gpu_step_peak) + reserve <= card",
                            "ema": SOURCES["ema"] + f": +{4 * full.n_trainable / GIB:.1f} GiB on rank 0 (full fine-tune)",
                            "gradient_accumulation": "ZeRO-2 + offload_optimizer with gradient_accumulation_steps > 1 "
                                                     "adds a bf16 CPU buffer per parameter of the rank's partition "
                                                     f"(~2 B/param/N; {DS}runtime/zero/stage_1_and_2.py:1822-1825)"},
            "sources": SOURCES, "notes": NOTES, "build_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.memory_estimate`: print the table, write bench/results/memory_estimate.json."""
    p = argparse.ArgumentParser(prog="python -m bench.memory_estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="full", help="smoke: a toy UNet (for tests)")
    p.add_argument("--workdir", type=Path, default=None, help="unused; accepted like every benchmark's")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/memory_estimate.json)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (for docs/benchmarks.md)")
    args = p.parse_args(argv)
    t = time.perf_counter()
    doc = run(args.size, args.workdir or default_workdir())
    doc.update(size=args.size, seconds=round(time.perf_counter() - t, 1), date=now_iso())
    save_json(doc, args.out or RESULTS_DIR / "memory_estimate.json")
    for line in render(doc["rows"], args.markdown):
        print(line)
    print()
    for r in doc["table"]:
        print(format_row(r), r.get("detail", ""))
    marks = {"flat": "a", "int32": "b", "prodigy_d": "p", "refused": "r"}
    for key, text in NOTES.items():
        print(f"{marks[key]}: {text}")
    print(f"GiB = 2^30 bytes; fits = {doc['assumptions']['fits']}, reserve {RESERVE_GIB} GiB (an assumption); "
          f"{doc['seconds']} s")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
