"""Benchmark 6 (GPU only): full-size SDXL, random weights built from the real configs (no download).

Training: the SDXL UNet (2.6 B parameters, `bench.sdxl_configs.UNET`) under the real `Trainer` with ZeRO-2
and bf16, fed (a) by the real data path from an SDXL-shaped cache written with `CacheWriter` (latent
4x128x128, prompt embeds 77x2048, pooled 1280, bf16, default codec) and (b) by the same kind of
micro-batches already in GPU memory. Reports steps/s and samples/s of both, their ratio, the loader
share of step time and peak GPU memory.

Cache job: images/s of `latentforge.preprocess` (torchrun, one process per GPU) with the full-size SDXL
VAE and both text encoders built from their real configs with random weights, on the demo photos at
1024x1024 buckets (upscaled with Lanczos), steady state from the committed manifests.

`make bench` skips this where `torch.cuda.is_available()` is False. `--tiny` runs the same code on the CPU
with the small SDXL-shaped UNet and a small VAE, to check the script without a GPU:

    python -m bench.gpu_sdxl [--micro 4] [--steps 30] [--workers 4] [--no-grad-checkpointing] [--tiny]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    RESULTS_DIR,
    ROOT,
    SIZES,
    SampleSource,
    default_workdir,
    median,
    now_iso,
    row,
    save_json,
    sdxl_spec,
    write_cache,
)


def build_model_folder(workdir: Path, tiny: bool, device: str) -> Path:
    """Pipeline folder: SDXL UNet (real config, random init, saved in bf16) + the scheduler; tiny: small UNet."""
    import torch

    from . import models, sdxl_configs

    out = workdir / ("model-tiny" if tiny else "model-sdxl")
    if (out / "unet" / "config.json").exists():
        return out
    if tiny:
        unet = models.sdxl_shaped_unet()
    else:
        torch.manual_seed(0)
        unet = sdxl_configs.build("unet", device).to(torch.bfloat16)
    return models.pipeline_folder(workdir, out, unet_model=unet, keep_text=False)


def build_cache_pipeline(workdir: Path, tiny: bool, device: str) -> Path:
    """Pipeline folder for the cache job: SDXL VAE + both text encoders from the real configs (random
    weights; vocabulary and special tokens of the tiny CLIP tokenizers), saved in fp16 to save disk."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from . import models, sdxl_configs

    out = workdir / ("cache-model-tiny" if tiny else "cache-model-sdxl")
    if (out / "vae" / "config.json").exists():
        return out
    folder = models.pipeline_folder(workdir, out, unet_model=models.unet((16, 32), 96, 64))
    if tiny:
        models.vae(16).save_pretrained(folder / "vae")
        return folder
    torch.manual_seed(0)
    sdxl_configs.build("vae", device).to(torch.float16).save_pretrained(folder / "vae")
    for sub, tok_sub, base, cls in (("text_encoder", "tokenizer", sdxl_configs.TEXT_ENCODER, CLIPTextModel),
                                    ("text_encoder_2", "tokenizer_2", sdxl_configs.TEXT_ENCODER_2, CLIPTextModelWithProjection)):
        tok = CLIPTokenizer.from_pretrained(folder / tok_sub)
        cfg = CLIPTextConfig(**{**base, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                "pad_token_id": tok.pad_token_id})
        with torch.device(device):
            model = cls(cfg)
        model.to(torch.float16).save_pretrained(folder / sub)
        del model
    return folder


def train_part(args: argparse.Namespace, workdir: Path, device: str) -> dict[str, Any]:
    import torch

    from latentforge.shared.config import load_config
    from latentforge.train.trainer import Trainer

    from .loader_share import loader_segment

    cache = workdir / "train-cache"
    if not (cache / "cache.json").exists():
        write_cache(cache, sdxl_spec("blosc-lz4"), SampleSource("random"), args.samples, rows_per_group=1024)
    model = build_model_folder(workdir, args.tiny, device)
    out = workdir / "run"
    shutil.rmtree(out, ignore_errors=True)
    bf16 = "true" if device == "cuda" else "false"  # this CPU-side check runs fp32 (no fast bf16 on CPUs)
    config = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={model}", f"cache.path={cache}", f"train.output_dir={out}",
        f"train.micro_batch_size={args.micro}", "train.gradient_accumulation_steps=1",
        f"train.num_workers={args.workers}", "train.prefetch_factor=4", "train.validation_every=0",
        "train.held_out_fraction=0", "train.ema.enabled=false", "train.max_steps=1000000",
        "train.checkpoint_every=1000000", "train.log_every=1000000",
        f"train.gradient_checkpointing={'true' if args.grad_checkpointing else 'false'}",
        f"deepspeed={{zero_optimization: {{stage: 2}}, bf16: {{enabled: {bf16}}}}}",
    ])
    trainer = Trainer(config)
    cfg = {"micro": args.micro, "warmup": args.warmup, "steps": args.steps}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def in_memory() -> list[float]:
        from latentforge.train.data import CachedBatches
        from latentforge.train.sampler import MicroBatchSampler

        dataset = CachedBatches(str(cache), {}, trainer.samples.train_rows)
        sampler = MicroBatchSampler(trainer.schedule, trainer.state, 0, 1, args.micro)
        ready = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in dataset[mb].items()}
                 for mb in itertools.islice(iter(sampler), args.warmup + args.steps)]
        sync()
        totals = []
        for i, batch in enumerate(ready):
            t0 = time.perf_counter()
            trainer.train_step(batch)  # float(loss) inside synchronises
            trainer.state = trainer.schedule.advance(trainer.state)
            if i >= args.warmup:
                totals.append(time.perf_counter() - t0)
        return totals

    loader_t, loader_w, memory_t = [], [], []
    for _ in range(args.rounds):
        sync()
        seg = loader_segment(trainer, str(cache), cfg)
        loader_t += seg["totals"]
        loader_w += seg["waits"]
        memory_t += in_memory()
    figs = {
        "steps_per_s_from_cache": 1 / median(loader_t), "steps_per_s_in_memory": 1 / median(memory_t),
        "samples_per_s_from_cache": args.micro / median(loader_t), "loader_share": sum(loader_w) / sum(loader_t),
        "cache_vs_in_memory": median(memory_t) / median(loader_t),
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "unet_params": sum(p.numel() for p in trainer.engine.module.parameters()),
    }
    return {"figures": figs, "raw": {"loader_totals": loader_t, "loader_waits": loader_w, "memory_totals": memory_t}}


def cache_part(args: argparse.Namespace, workdir: Path, device: str) -> dict[str, Any]:
    import torch

    from latentforge.devkit.demo_data import write_demo_data

    from .cache_scaling import one_run

    model = build_cache_pipeline(workdir, args.tiny, device)
    demo = write_demo_data(workdir / "data", samples_per_shard=4)
    one = (f"{{type: webdataset, path: '{demo.root}/webdataset/{{00000..{len(demo.shards) - 1:05d}}}.tar'}}, "
           f"{{type: folder, path: '{demo.root}/folder', shard_size: 4}}")
    resolution = 256 if args.tiny else 1024
    overrides = [f"model.pretrained={model}", "data.sources=[" + ", ".join([one] * args.cache_copies) + "]",
                 f"buckets.resolutions=[{resolution}]", f"cache.batch_size={args.cache_batch}",
                 f"train.output_dir={workdir / 'unused'}"]
    gpus = max(1, torch.cuda.device_count()) if device == "cuda" else 1
    result = one_run(gpus, 4 if device == "cuda" else 1, args.deterministic, overrides, workdir / "cache-job")
    shutil.rmtree(workdir / "cache-job", ignore_errors=True)
    return {"figures": {"images_per_s_steady": result["images_per_s_steady"], "processes": gpus,
                        "images_per_s_per_gpu": result["images_per_s_steady"] / gpus,
                        "images_per_s_end_to_end": result["images_per_s_end_to_end"], "images": result["images"],
                        "resolution": resolution},
            "run": result}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench.gpu_sdxl", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="full", help="smoke: --tiny at toy sizes (run_all's smoke test)")
    p.add_argument("--tiny", action="store_true", help="small models on whatever device there is (checks the script)")
    p.add_argument("--micro", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--samples", type=int, default=2048, help="samples in the SDXL-shaped training cache")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cache-copies", type=int, default=4, help="times the demo sources are listed (56 images each)")
    p.add_argument("--cache-batch", type=int, default=8)
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.size == "smoke":
        args = p.parse_args([*(argv if argv is not None else sys.argv[1:]), "--tiny", "--steps", "2", "--warmup", "1",
                             "--rounds", "1", "--samples", "16", "--micro", "2", "--workers", "1", "--cache-copies", "1"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("gpu_sdxl: no GPU (torch.cuda.is_available() is False); use --tiny to check the script on the CPU")
        return 2
    workdir = (args.workdir or default_workdir()).absolute() / "gpu_sdxl"
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    doc: dict[str, Any] = {"name": "gpu_sdxl", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                           "tiny": args.tiny, "args": {k: str(v) for k, v in vars(args).items()}}
    table = []
    if not args.skip_train:
        tr = train_part(args, workdir, device)
        doc["train"] = tr
        f = tr["figures"]
        table += [
            row("SDXL training from the cache: loader share of step time", 100 * f["loader_share"], "%", "<= 2 %",
                f["loader_share"] <= 0.02, f"{f['samples_per_s_from_cache']:.2f} samples/s, micro-batch {args.micro}"),
            row("  steps/s from the cache vs batches already in GPU memory", f["cache_vs_in_memory"], "x", "", None,
                f"{f['steps_per_s_from_cache']:.3f} vs {f['steps_per_s_in_memory']:.3f} steps/s; peak "
                f"{f['max_memory_gib'] or 0:.1f} GiB; {f['unet_params'] / 1e9:.2f} B parameters"),
        ]
    if not args.skip_cache:
        cp = cache_part(args, workdir, device)
        doc["cache_job"] = cp
        f = cp["figures"]
        table.append(row(f"cache job images/s per GPU at {f['resolution']}^2 (full-size VAE + text encoders)",
                         f["images_per_s_per_gpu"], "images/s", "", None,
                         f"{f['images']} images, {f['processes']} process(es), steady state"))
    if "train" in doc and "cache_job" in doc and not args.tiny:
        # Caching removes the encoders' cost: per sample, 1 / (cache job images/s per GPU) is an upper bound on
        # what VAE + text encoders (+ image decoding and writing) cost inside a loop on this GPU.
        train_sps = doc["train"]["figures"]["samples_per_s_from_cache"]
        enc_ips = doc["cache_job"]["figures"]["images_per_s_per_gpu"]
        implied = 1 + train_sps / enc_ips
        doc["implied_caching_speedup"] = implied
        table.append(row("  implied caching speedup on this GPU (1 + train samples/s / cache images/s)", implied, "x",
                         ">= 1.5x", implied >= 1.5, "encoder cost per sample taken from the cache job (an upper bound: "
                         "it includes decoding, resizing and writing)"))
    doc["table"] = table
    doc["seconds"] = round(time.perf_counter() - t, 1)
    doc["date"] = now_iso()
    save_json(doc, args.out or RESULTS_DIR / "gpu_sdxl.json")
    from .common import format_row

    for r in table:
        print(format_row(r), r["detail"])
    sys.stdout.flush()
    return 0


def run(size: str, workdir: Path) -> dict[str, Any]:
    """`run_all --in-process` entry; only reached where a GPU exists."""
    import json

    out = workdir / "gpu_sdxl.json"
    main(["--size", size, "--workdir", str(workdir.parent), "--out", str(out)])
    return json.loads(out.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
