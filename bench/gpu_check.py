"""`make gpu-check`: one script, at most 8 minutes on one H100/H200, real-size SDXL end to end.

Phases (each timed; a later phase that would not fit in what is left of `--budget-s` is skipped with the
reason recorded, and every launched command is ended at the budget):

1. model: an SDXL pipeline folder with random weights at the real sizes, built from the configs shipped in
   devkit/real-configs/sdxl/ directly on the GPU and saved (UNet and text encoders bf16, VAE fp32). The
   tokenizers are the devkit's code-built CLIP tokenizer (no real vocabulary is shipped, no internet).
2. cache: 256 images made from the demo photos (a quarter smaller than the bucket), then the real cache job
   (`latentforge cache`, or torchrun with one process per GPU) at 1024^2 buckets, VAE in fp32, Real-ESRGAN
   upscaling with a randomly initialised RealESRGAN_x4plus-sized RRDBNet loaded through spandrel.
3. train: 30 steps through the deepspeed launcher (NCCL, ZeRO-2, bf16, gradient checkpointing,
   micro-batch 4) from that cache.
4. in-loop: the same 30 steps with the VAE and both text encoders inside the loop (bench/gpu_check_inloop.py:
   plain torch AdamW + bf16 autocast + gradient checkpointing, images decoded from disk every step).
5. adamw_8bit (train.optimizer=adamw_8bit, ZeRO-0, 10 steps) and zero3 (ZeRO-3, bf16, EMA and validation
   off, 10 steps); then, on a GPU, a probe of bitsandbytes' AdamW8bit on one tensor as large as a ZeRO-2
   partition (see BNB_PROBE).
6. load_memory (GPU only): peak host memory while each SDXL encoder and the Real-ESRGAN file load onto
   cuda:0, `from_pretrained(...).to(device)` vs the cache job's loader, each in a fresh process (bench.load_memory).

The trainer's final checkpoint is skipped by default (~36 GB for ZeRO-2 SDXL; see gpu_check_runs), peak GPU
memory comes from the trainer's own log (`perf/max_memory_gib`) or, for the cache job, from a hook that
records `torch.cuda.max_memory_allocated()` at exit; every figure's source is in the JSON beside it.

Writes bench/results/gpu.json (--tiny: gpu-tiny.json). `--tiny` runs the same code paths on the CPU with the
devkit's tiny SDXL pipeline, 8 images at 256^2, 2-3 steps, gloo: a check of the script, not a measurement.
Run it where there is no GPU: the deepspeed launcher sets CUDA_VISIBLE_DEVICES itself, so on a GPU machine
the tiny training runs would land on the GPU.

    python -m bench.gpu_check [--tiny] [--workdir DIR] [--out FILE] [--budget-s 465] [--checkpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import gpu_check_assets as assets
from . import gpu_check_runs as runs
from . import load_memory
from .common import RESULTS_DIR, ROOT, default_workdir, machine_info, now_iso, save_json

RESERVE_S = 10.0  # kept back from every launched command for writing the results
INT32_MAX = 2**31 - 1
# bitsandbytes (0.50, backends/cuda/ops.py) passes a tensor's element count to its 8-bit CUDA kernels as
# ctypes.c_int32. ZeRO-1/2 hand the optimizer ONE flat fp32 partition per rank: on one GPU that is the whole
# SDXL UNet, 2.57 B elements, past int32. This probe steps AdamW8bit on a tensor of that size and says
# whether its first and last elements moved (in a child: a CUDA error there may end the process).
BNB_PROBE = """
import json, sys, torch, bitsandbytes as bnb
n, device = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cuda"
p = torch.zeros(n, device=device, requires_grad=True)
p.grad = torch.ones_like(p)
bnb.optim.AdamW8bit([p], lr=1e-3, weight_decay=0.0).step()
torch.cuda.synchronize() if device == "cuda" else None
print("PROBE " + json.dumps({"first_updated": p[0].item() != 0, "last_updated": p[-1].item() != 0}))
"""


@dataclass(frozen=True)
class Settings:
    """Sizes of one mode; `needs_s` is the time a phase is assumed to take before anything was measured."""

    images: int
    resolution: int
    micro: int
    steps: int
    steps_8bit: int
    steps_zero3: int
    shard_size: int
    bf16: bool
    loader_workers: int
    cache_workers: int
    min_resolution: int
    needs_s: dict[str, float]


FULL = Settings(images=256, resolution=1024, micro=4, steps=30, steps_8bit=10, steps_zero3=10, shard_size=16, bf16=True,
                loader_workers=2, cache_workers=4, min_resolution=512,
                needs_s={"cache": 60, "train_zero2": 80, "in_loop": 70, "adamw_8bit": 50, "zero3": 60, "load_memory": 60})
# CPU check: bf16 off (no fast bf16 arithmetic on CPUs), everything tiny.
TINY = Settings(images=8, resolution=256, micro=2, steps=3, steps_8bit=2, steps_zero3=2, shard_size=4, bf16=False,
                loader_workers=1, cache_workers=2, min_resolution=64,
                needs_s={"cache": 5, "train_zero2": 5, "in_loop": 5, "adamw_8bit": 5, "zero3": 5, "load_memory": 5})


class Budget:
    """Wall-clock budget of the whole check."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0 = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


class Check:
    """One run of the check: settings, folders, the result document, and the phases in order."""

    def __init__(self, args: argparse.Namespace, settings: Settings, device: str, nproc: int) -> None:
        self.args, self.s, self.device, self.nproc = args, settings, device, nproc
        self.tiny: bool = args.tiny
        self.work: Path = args.workdir
        self.budget = Budget(args.budget_s)
        self.hook = runs.write_hook(self.work / "hook")
        self.doc: dict[str, Any] = {"name": "gpu_check", "tiny": self.tiny, "date": now_iso(), "budget_s": args.budget_s,
                                    "phases": {}, "notes": []}
        self.model: Path | None = None
        self.images: Path | None = None
        self.config: Path | None = None

    # ---- phase bookkeeping ----------------------------------------------------------------------------
    def phase(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float = 0.0, needs: tuple[str, ...] = ()) -> None:
        """Run `fn` unless a phase it depends on did not succeed or it would not fit in the budget."""
        rec: dict[str, Any]
        missing = [n for n in needs if self.doc["phases"].get(n, {}).get("status") != "ok"]
        left = self.budget.left()
        if missing:
            rec = {"status": "skipped", "reason": f"needs phase(s) {', '.join(missing)}, which did not succeed"}
        elif left - RESERVE_S < need_s:
            rec = {"status": "skipped", "reason": f"estimated {need_s:.0f} s, {left:.0f} s left of the "
                                                  f"{self.budget.seconds:.0f} s budget"}
        else:
            t = time.perf_counter()
            try:
                rec = {"status": "ok", **fn()}
            except Exception as exc:  # noqa: BLE001 - a failed phase is a result; later phases may still run
                rec = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-4000:]}
            rec["wall_s"] = round(time.perf_counter() - t, 2)
        self.doc["phases"][name] = rec
        print(f"gpu_check: {name}: {rec['status']}" + (f" in {rec['wall_s']} s" if "wall_s" in rec else "")
              + (f" ({rec['reason']})" if "reason" in rec else ""), flush=True)
        if "error" in rec:
            print(rec["error"], flush=True)  # the launched command and the tail of its log

    def timeout(self) -> float:
        return max(1.0, self.budget.left() - RESERVE_S)

    def launch(self, name: str, cmd: list[str], skip_final_save: bool = False) -> tuple[runs.RunResult, Path]:
        """Run one command with the hook; a failure raises with the tail of its log."""
        peaks = self.work / "peaks" / name
        shutil.rmtree(peaks, ignore_errors=True)
        env = runs.child_env(self.tiny, self.hook, peaks, skip_final_save)
        result = runs.run_logged(cmd, self.work / "logs" / f"{name}.log", env, self.timeout())
        if not result.ok:
            why = "killed at the time budget" if result.rc is None else f"exit code {result.rc}"
            raise RuntimeError(f"{why}: {' '.join(cmd)}\n--- log tail ({result.log}) ---\n{result.tail()}")
        return result, peaks

    # ---- the phases -----------------------------------------------------------------------------------
    def build_model(self) -> dict[str, Any]:
        self.model, info = assets.build_model_folder(self.work, self.tiny, self.device)
        self.doc["notes"].append(info["tokenizers"])
        return {"folder": str(self.model), **info}

    def prepare_cache_inputs(self) -> dict[str, Any]:
        self.images, made = assets.make_images(self.work, self.s.images, self.s.resolution)
        esrgan, esr = assets.write_esrgan(self.work, self.tiny)
        self.config = self.write_config(esrgan)
        self.doc["notes"].append(f"upscaling: Real-ESRGAN path through spandrel ({esr['architecture']}); "
                                 "no GFPGAN face model (none on disk)")
        return {"images": made, "esrgan": esr, "config": str(self.config)}

    def write_config(self, esrgan: Path) -> Path:
        """configs/sdxl-finetune.yaml with this check's model, data, sizes and the brief's settings."""
        import yaml

        from latentforge.shared.config import load_config

        s = self.s
        cfg = yaml.safe_load((ROOT / "configs" / "sdxl-finetune.yaml").read_text())
        cfg["model"] = {"pretrained": str(self.model), "family": "sdxl"}  # the hub VAE it names is not reachable
        # The trainer matches cached groups to data.sources, so both stages read this one file.
        cfg["data"] = {"sources": [{"type": "folder", "path": str(self.images), "caption_field": "txt",
                                    "shard_size": s.shard_size}], "validation_prompts": cfg["data"]["validation_prompts"]}
        cfg["buckets"].update(resolutions=[s.resolution], min_resolution=s.min_resolution)
        cfg["upscale"] = {"enabled": True, "model_path": str(esrgan)}
        cfg["cache"].update(path=str(self.work / "cache"), vae_dtype="float32", workers=s.cache_workers)
        cfg["train"].update(output_dir=str(self.work / "runs" / "unset"), max_steps=s.steps, micro_batch_size=s.micro,
                            gradient_accumulation_steps=1, gradient_checkpointing=True, validation_every=0,
                            held_out_fraction=0.0, ema={"enabled": False}, checkpoint_every=10**9,
                            log_every=max(1, s.steps // 3), num_workers=s.loader_workers)
        cfg["deepspeed"] = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": s.bf16}}
        path = self.work / "gpu_check.yaml"
        path.write_text("# Written by bench/gpu_check.py from configs/sdxl-finetune.yaml\n" + yaml.safe_dump(cfg, sort_keys=False))
        load_config(path, [])  # a config mistake fails here, not in a launched job
        return path

    def cache(self) -> dict[str, Any]:
        assert self.config is not None
        cache = self.work / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # a fresh cache: committed shards would be skipped, not timed
        result, peaks = self.launch("cache", runs.cache_command(self.config, self.nproc, []))
        return {**runs.cache_figures(cache, result), "peak_gpu_memory": runs.read_peak(peaks), "run": result.describe()}

    def train(self, name: str, steps: int, extra: list[str]) -> dict[str, Any]:
        assert self.config is not None
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        window = max(1, steps // 3)
        overrides = [f"train.output_dir={out}", f"train.max_steps={steps}", f"train.log_every={window}", *extra]
        result, peaks = self.launch(name, runs.train_command(self.config, self.nproc, overrides),
                                    skip_final_save=not self.args.checkpoint)
        figs = runs.train_figures(out, result)
        if not self.args.keep_runs:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # up to ~36 GB each on a 64 GB disk
        return {**figs, "window_steps": window, "overrides": extra, "peak_gpu_memory_at_exit": runs.read_peak(peaks),
                "final_checkpoint": "written" if self.args.checkpoint else "skipped (gpu_check hook; --checkpoint keeps it)",
                "run": result.describe()}

    def in_loop(self) -> dict[str, Any]:
        assert self.model is not None and self.images is not None
        out = self.work / "in_loop.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.gpu_check_inloop", "--model", str(self.model), "--images", str(self.images),
               "--out", str(out), "--steps", str(self.s.steps), "--micro", str(self.s.micro),
               "--resolution", str(self.s.resolution), "--window", str(max(1, self.s.steps // 3))]
        result, peaks = self.launch("in_loop", cmd)
        return {**json.loads(out.read_text()), "run": result.describe()}

    def load_memory(self) -> dict[str, Any]:
        """Peak host memory while the SDXL encoders and Real-ESRGAN load, the old way and ours (bench.load_memory)."""
        assert self.model is not None
        esrgan, _ = assets.write_esrgan(self.work, self.tiny)
        return load_memory.gpu_check_phase(self.model, esrgan, "cuda:0" if self.device == "cuda" else "cpu", self.timeout())

    def bnb_probe(self) -> dict[str, Any]:
        """Does bitsandbytes' AdamW8bit update every element of a tensor as large as this run's ZeRO-2
        partition? Recorded as a finding, whatever the answer."""
        z2 = self.doc["phases"].get("train_zero2", {})
        params = z2.get("trainable_parameters") or 2_567_463_684  # the SDXL UNet (real config)
        numel = -(-params // self.nproc)
        if numel <= INT32_MAX:
            return {"numel": numel, "result": "not needed: the flat partition fits in int32"}
        env = runs.child_env(self.tiny, self.hook, self.work / "peaks" / "bnb_probe", False)
        run = runs.run_logged([sys.executable, "-c", BNB_PROBE, str(numel)], self.work / "logs" / "bnb_probe.log",
                              env, min(120.0, self.timeout()))
        found = [line[6:] for line in run.tail(20000).splitlines() if line.startswith("PROBE ")]
        if not run.ok or not found:
            return {"numel": numel, "result": f"AdamW8bit step failed on {numel:,} elements (exit code {run.rc})",
                    "log_tail": run.tail(2000), "run": run.describe()}
        moved = json.loads(found[-1])
        ok = moved["first_updated"] and moved["last_updated"]
        return {"numel": numel, **moved, "run": run.describe(),
                "result": "every element updated" if ok else f"AdamW8bit left elements of a {numel:,}-element tensor "
                "unchanged: the adamw_8bit figures on this many GPUs measure a broken optimizer step"}

    def estimate(self, steps: int, step_factor: float, startup_factor: float, default: float) -> float:
        """Seconds a later run should take, from the ZeRO-2 run's start-up and step time once measured."""
        z2 = self.doc["phases"].get("train_zero2", {})
        if z2.get("status") != "ok" or not z2.get("steps_per_s") or z2.get("startup_and_exit_s") is None:
            return default
        return z2["startup_and_exit_s"] * startup_factor + steps * step_factor / z2["steps_per_s"]

    def run(self) -> dict[str, Any]:
        s, needs = self.s, self.s.needs_s
        zero = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": s.bf16}}
        self.phase("model", self.build_model)
        self.phase("cache_inputs", self.prepare_cache_inputs, needs=("model",))
        self.phase("cache", self.cache, needs["cache"], needs=("cache_inputs",))
        self.phase("train_zero2", lambda: self.train("train_zero2", s.steps, []), needs["train_zero2"], needs=("cache",))
        self.phase("in_loop", self.in_loop, self.estimate(s.steps, 1.5, 1.0, needs["in_loop"]), needs=("cache_inputs",))
        # ZeRO 0: under ZeRO >= 1 one GPU's flat partition of the SDXL UNet passes bitsandbytes' 32-bit element
        # count, which latentforge refuses (train/optimizers.py); per-parameter tensors stay within it.
        zero0 = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": s.bf16}}
        self.phase("adamw_8bit", lambda: self.train("adamw_8bit", s.steps_8bit, ["train.optimizer=adamw_8bit",
                                                                                 "deepspeed=" + json.dumps(zero0)]),
                   self.estimate(s.steps_8bit, 1.1, 1.1, needs["adamw_8bit"]), needs=("cache",))
        self.phase("zero3", lambda: self.train("zero3", s.steps_zero3, ["train.ema.enabled=false", "train.validation_every=0",
                                                                       "deepspeed=" + json.dumps(zero)]),
                   self.estimate(s.steps_zero3, 1.5, 1.3, needs["zero3"]), needs=("cache",))
        if self.device == "cuda":  # host memory while the encoders load onto the GPU; on a CPU: bench.load_memory
            self.phase("load_memory", self.load_memory, needs["load_memory"], needs=("model",))
        if self.tiny:
            self.doc["phases"]["bnb_probe"] = {"status": "skipped", "reason": "GPU only (bitsandbytes' CUDA kernels)"}
        else:
            self.phase("bnb_probe", self.bnb_probe, 30.0)
        self.doc["figures"] = headline(self.doc["phases"])
        return self.doc


def headline(phases: dict[str, Any]) -> dict[str, Any]:
    """The figures asked for, flat; None where a phase did not run."""
    def get(phase: str, key: str) -> Any:
        rec = phases.get(phase, {})
        return rec.get(key) if rec.get("status") == "ok" else None

    def peak(phase: str) -> float | None:
        rec = phases.get(phase, {})
        if rec.get("status") != "ok":
            return None
        for key in ("peak_gpu_memory_gib_logged", "peak_gpu_memory_gib"):
            if rec.get(key) is not None:
                return round(rec[key], 2)
        hook = rec.get("peak_gpu_memory_at_exit") or rec.get("peak_gpu_memory")
        return hook["max_allocated_gib"] if hook else None

    cached, inloop = get("train_zero2", "steps_per_s"), get("in_loop", "steps_per_s")
    sec = get("in_loop", "seconds_per_step") or {}
    # Per GPU: the in-loop baseline runs on one GPU; with N GPUs a cached step trains N micro-batches.
    per_gpu = (get("train_zero2", "images_per_s") or 0) / (get("train_zero2", "world_size") or 1)
    figs = {
        "cache_images_per_s_steady": get("cache", "images_per_s_steady"),
        "cache_images_per_s_end_to_end": get("cache", "images_per_s_end_to_end"),
        "train_images_per_s_cached": get("train_zero2", "images_per_s"),
        "steps_per_s_cached": cached, "steps_per_s_in_loop": inloop,
        "cached_vs_in_loop": per_gpu / get("in_loop", "images_per_s") if per_gpu and inloop else None,
        # The same DeepSpeed step plus what the encoders and decoding cost per step in the in-loop run:
        # the speed-up with the engine difference (DeepSpeed vs plain torch) taken out.
        "cached_vs_in_loop_same_engine": (1 + (sec["encode_s"] + sec["decode_wait_s"]) * cached) if cached and sec else None,
        "loader_share_cached": get("train_zero2", "loader_share"),
        "in_loop_encoder_share": get("in_loop", "encode_share"),
        "peak_gpu_memory_gib": {p: peak(p) for p in ("cache", "train_zero2", "in_loop", "adamw_8bit", "zero3")},
        "steps_per_s": {p: get(p, "steps_per_s") for p in ("train_zero2", "in_loop", "adamw_8bit", "zero3")},
        "phase_wall_s": {p: r.get("wall_s") for p, r in phases.items()},
        "bnb_8bit_large_tensor": phases.get("bnb_probe", {}).get("result"),
        "host_peak_mb_loading": load_memory.headline(phases.get("load_memory", {})),
    }
    return figs


def report(doc: dict[str, Any]) -> str:
    """A few human lines: every headline figure and each phase's status."""
    f = doc["figures"]

    def num(v: Any, fmt: str = "{:.3g}") -> str:
        return "n/a" if v is None else fmt.format(v)

    lines = [f"gpu_check on {doc['device']} ({doc['gpus']} process(es)){' [--tiny: checks the script, figures mean nothing]' if doc['tiny'] else ''}",
             f"  cache job: {num(f['cache_images_per_s_steady'])} images/s steady, {num(f['cache_images_per_s_end_to_end'])} end to end",
             f"  train from the cache (ZeRO-2): {num(f['steps_per_s_cached'])} steps/s, {num(f['train_images_per_s_cached'])} images/s, "
             f"loader share {num(f['loader_share_cached'] and 100 * f['loader_share_cached'], '{:.2f}')} %",
             f"  in-loop encoders: {num(f['steps_per_s_in_loop'])} steps/s (encoders {num(f['in_loop_encoder_share'] and 100 * f['in_loop_encoder_share'], '{:.0f}')} % of a step); "
             f"cached/in-loop per GPU {num(f['cached_vs_in_loop'])}x, same engine {num(f['cached_vs_in_loop_same_engine'])}x",
             "  peak GPU memory (GiB): " + ", ".join(f"{k} {num(v, '{:.1f}')}" for k, v in f["peak_gpu_memory_gib"].items()),
             "  steps/s: " + ", ".join(f"{k} {num(v)}" for k, v in f["steps_per_s"].items()),
             "  phases: " + ", ".join(f"{k} {r['status']}" + (f" {r['wall_s']:.0f}s" if "wall_s" in r else "")
                                      for k, r in doc["phases"].items())]
    for name, rec in doc["phases"].items():
        if rec["status"] != "ok":
            lines.append(f"  {name} {rec['status']}: " + (rec.get("reason") or rec.get("error", "").split("\n", 1)[0]))
    lines += load_memory.headline_lines(f.get("host_peak_mb_loading"))
    if doc["phases"].get("bnb_probe", {}).get("result"):
        lines.append(f"  bitsandbytes AdamW8bit on one {doc['phases']['bnb_probe']['numel']:,}-element tensor: "
                     f"{doc['phases']['bnb_probe']['result']}")
    lines += [f"  note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny SDXL on the CPU: checks the script in a few minutes")
    p.add_argument("--workdir", type=Path, default=None, help="scratch space (default .cache/bench/gpu_check)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/gpu.json, --tiny gpu-tiny.json)")
    p.add_argument("--budget-s", type=float, default=465.0,
                   help="wall-clock budget of the phases (8 minutes less start-up and writing the results)")
    p.add_argument("--steps", type=int, default=None, help="steps of the ZeRO-2 and in-loop runs")
    p.add_argument("--images", type=int, default=None, help="images made and cached")
    p.add_argument("--checkpoint", action="store_true", help="let the trainer write its final checkpoint (~36 GB)")
    p.add_argument("--keep-runs", action="store_true", help="keep the runs' checkpoints in the workdir")
    args = p.parse_args(argv)
    import torch

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")  # nothing is downloaded; a hub lookup would only wait for a timeout
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("gpu_check: no GPU (torch.cuda.is_available() is False); --tiny checks the script on the CPU")
        return 2
    settings = TINY if args.tiny else FULL
    settings = replace(settings, steps=args.steps or settings.steps, images=args.images or settings.images)
    args.workdir = (args.workdir or default_workdir() / "gpu_check").absolute()
    args.workdir.mkdir(parents=True, exist_ok=True)
    nproc = torch.cuda.device_count() if cuda else 1
    check = Check(args, settings, "cuda" if cuda else "cpu", nproc)
    check.doc.update(device=torch.cuda.get_device_name(0) if cuda else "cpu", gpus=nproc,
                     backend="nccl" if cuda else "gloo", machine=machine_info(args.workdir),
                     settings={k: v for k, v in vars(settings).items() if k != "needs_s"})
    t = time.perf_counter()
    doc = check.run()
    doc["wall_s"] = round(time.perf_counter() - t, 1)
    out = args.out or RESULTS_DIR / ("gpu-tiny.json" if args.tiny else "gpu.json")
    save_json(doc, out)
    print(report(doc))
    print(f"gpu_check: {doc['wall_s']} s; results in {out}")
    failed = [n for n, r in doc["phases"].items() if r["status"] == "failed"]
    return 1 if failed or doc["phases"].get("train_zero2", {}).get("status") != "ok" else 0


if __name__ == "__main__":
    raise SystemExit(main())
