"""The trainer: reads only cached tensors, trains the denoiser under DeepSpeed. Reads top to bottom.

No VAE encoder, no text encoder, no tokenizer and no image decoding here: latents and embeddings come
from the cache, caption dropout uses the cached empty-prompt embedding. `Trainer.train_step` is the
one function that turns a micro-batch into a gradient; its forward pass and loss (`step.forward_loss`)
are also what held-out validation measures. What a checkpoint saves and restores is `self.train_state`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import Config, config_to_dict
from latentforge.shared.preflight import check_model_paths

from . import objective as obj
from .checkpoint import TrainState, find_checkpoint, load_checkpoint, save_checkpoint
from .checkpoint_weights import read_trainer_state
from .controlnet import controlnet_adapter, validation_controls
from .data import (
    CachedBatches,
    CachedSamples,
    build_loader,
    resolve_shuffle,
    shard_window_for,
    shard_window_reads,
)
from .distributed import build_engine, deepspeed_config, init_distributed, lost_peer
from .ema import build_ema
from .evaluation import check_evaluation
from .families import adapter_for
from .loss_curve import write_loss_curve
from .metrics import open_metrics
from .mixing import SourceCounter, build_schedule, check_resume_weights, source_report
from .sampler import MicroBatchSampler, SamplerState
from .step import StepSetup, build_objective, forward_loss, source_loss_weights
from .universal import prepare_resume, zero_stage
from .validation import VALIDATION_SEED, ValidationData, base_row, validate

log = logging.getLogger("latentforge.train")


class Trainer:
    """Setup in `__init__`, the loop in `train()`, one micro-batch's work in `train_step()`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        t = config.train
        # Config mistakes the schema cannot see end here, one line, before a process group or a file exists.
        check_model_paths(config)
        deepspeed_config(config, int(os.environ.get("WORLD_SIZE", "1")))
        self.dist = init_distributed()
        check_evaluation(config, self.dist.is_main)  # missing metric weights: one line now, not mid-run
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)

        # The checkpoint to resume, found before the model loads: one written by another number of ranks
        # under ZeRO >= 1 is converted to DeepSpeed's universal format (rank 0, while no model takes its
        # memory), and the engine must be told so when it is built (`universal.py`).
        self.ds_config = deepspeed_config(config, self.dist.world)
        ckpt = find_checkpoint(t.output_dir, t.resume)
        universal = None
        if ckpt is not None:
            self.ds_config, universal = prepare_resume(config, self.ds_config, ckpt, self.dist.world, self.dist.rank)

        # Data: the cache must fit the model before anything trains.
        self.cache = CacheReader(config.cache.path, dict(config.cache.storage_options))
        self.adapter = adapter_for(config.model.family)
        if t.controlnet.enabled:  # a ControlNet in front of the frozen UNet, fed the cached control images
            self.adapter = controlnet_adapter(self.adapter, config, self.cache.spec, config.cache.path)
        model = self.adapter.load(config)
        self.cache.check_compatible(**self.adapter.expected_cache(model))
        self.cache.check_model_files(config.model.pretrained, config.model.vae, config.model.revision)
        self.samples = CachedSamples(self.cache, config)
        self.global_batch = t.micro_batch_size * t.gradient_accumulation_steps * self.dist.world
        self.order = resolve_shuffle(config, remote=not self.cache.storage.is_local)
        window = (shard_window_for(self.cache, self.samples.train_rows, t.shuffle_window_shards)
                  if self.order == "shard_window" else None)
        self.schedule = build_schedule(self.samples.item_sources, self.samples.bucket_sizes,
                                       [s.weight for s in config.data.sources], self.global_batch, t.seed, window)
        for s, b in getattr(self.schedule, "unreached", ()) if self.dist.is_main else ():
            log.warning("data.sources.%d has samples in bucket %sx%s but its weight gives them no slot per epoch: "
                        "raise its weight or repeats", s, b[0], b[1])
        for bucket, n in (self.schedule.starved_buckets.items() if self.dist.is_main else ()):
            log.warning("bucket %sx%s has %d samples, fewer than one global batch (%d): they are never trained",
                        bucket[0], bucket[1], n, self.global_batch)
        empty, prompts, embeds = self.cache.prompts()
        controls = (validation_controls(self.cache, self.samples.val_rows, len(prompts), self.cache.spec.conditioning or "",
                                        t.controlnet.degrade_factor, VALIDATION_SEED) if t.controlnet.enabled else None)
        self.validation = ValidationData(self.cache, self.samples.val_rows, prompts, embeds, controls)

        # Objective: the noise schedule comes from the model's own scheduler config.
        self.objective = build_objective(config, self.adapter, self.dist.device)

        # Engine, EMA, metrics.
        self.engine, self.optimizer, self.lr_scheduler = build_engine(
            model, config, self.ds_config,
            lambda step: obj.lr_lambda(step, t.warmup_steps, t.max_steps, t.lr_scheduler))
        self.dtype = next(self.engine.module.parameters()).dtype
        self.setup = StepSetup(self.adapter, self.objective, config, {k: v.to(self.dist.device) for k, v in empty.items()},
                               self.cache.spec.scaling_factor, self.cache.spec.shift_factor, self.dist.device, self.dtype,
                               source_loss_weights(config))
        self.sharded = zero_stage(self.ds_config) == 3  # ZeRO-3: every rank holds a slice of every weight
        self.ema = build_ema(self.engine.module, t.ema, sharded=self.sharded, is_main=self.dist.is_main)
        self.output = Path(t.output_dir)
        self.metrics = open_metrics(config, self.output, self.dist.is_main)
        self.output.mkdir(parents=True, exist_ok=True)

        # Resume: engine, RNGs, step, the global sample order and the EMA, restored into one TrainState.
        self.train_state = TrainState(
            engine=self.engine, schedule=self.schedule, sampler=self.schedule.initial_state(), rank=self.dist.rank,
            world=self.dist.world, ema=self.ema, trainable_only=t.lora.enabled or t.controlnet.enabled,
            snapshot={"cache_fingerprint": self.cache.spec.fingerprint, "config": config_to_dict(config),
                      "cache_conditioning": self.cache.spec.conditioning})
        self.history: list[float] = []  # mean loss of every optimizer step this process ran
        self.base_row: np.ndarray | None = None  # the validation grid's base row (`validation.base_row`)
        self._base_checked = False
        self.last_eval: dict[str, Any] | None = None  # the latest evaluation's figures (run_summary.json)
        if ckpt is not None:
            check_resume_weights(read_trainer_state(ckpt)["config"]["data"]["sources"], config.data.sources)
            load_checkpoint(self.train_state, ckpt, engine_path=universal)
            log.info("resumed from %s at step %d%s", ckpt, self.step,
                     f" (written by another world size; engine state from {universal.name})" if universal else "")
        # Samples per source, counted from the global order on the main rank (replayed up to a resumed step).
        self.source_counts = SourceCounter(self.schedule, self.samples.item_sources, self.samples.num_sources)
        if self.dist.is_main:
            self.source_counts.advance(self.step)

    # `step` and `state` read and write the TrainState, so it stays the one record of where the run is
    # (bench/ drives the loop by hand through them).
    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.train_state.step

    @step.setter
    def step(self, value: int) -> None:
        self.train_state.step = value

    @property
    def state(self) -> SamplerState:
        """Position in the global sample order."""
        return self.train_state.sampler

    @state.setter
    def state(self, value: SamplerState) -> None:
        self.train_state.sampler = value

    # ---- one micro-batch ------------------------------------------------------------------------
    def batch_generator(self, batch: dict[str, Any]) -> torch.Generator:
        """Randomness of a micro-batch = f(seed, step, its position in the global batch).

        So the same samples get the same noise, timesteps and dropout whatever the number of ranks or
        accumulation steps, and a resumed run redraws exactly what the uninterrupted one drew.
        """
        t = self.config.train
        offset = (int(batch["accum_index"]) * self.dist.world + self.dist.rank) * t.micro_batch_size
        seed = int.from_bytes(hashlib.blake2b(f"{t.seed}:{int(batch['step'])}:{offset}".encode(), digest_size=8).digest(), "little")
        return torch.Generator(device="cpu").manual_seed(seed)

    def train_step(self, batch: dict[str, Any]) -> float:
        """Noise the cached latents, predict, weight the loss (`forward_loss`), backward, and let DeepSpeed step."""
        loss = forward_loss(self.engine, self.setup, batch, self.batch_generator(batch)).loss
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    # ---- the loop -------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> dict[str, float]:
        """Train to `train.max_steps` (or stop after step `until`, as an interruption would)."""
        t = self.config.train
        stop = min(t.max_steps, until) if until is not None else t.max_steps
        ahead = t.read_ahead if t.read_ahead is not None else (0 if self.cache.storage.is_local else 16)
        copies = (t.read_through_dir, int(t.read_through_gb * 1e9)) if t.read_through_dir else None
        reads = shard_window_reads(self.schedule.shard_window, self.global_batch, t.micro_batch_size,
                                   self.dist.world, t.num_workers, ahead)
        dataset = CachedBatches(self.cache.url, dict(self.config.cache.storage_options), self.samples.train_rows,
                                reads.read_ahead, copies, control=t.controlnet.enabled,
                                item_sources=self.samples.item_sources, whole_shards=reads.whole_shards,
                                ahead_rows=reads.ahead_rows)
        sampler = MicroBatchSampler(self.schedule, self.state, self.dist.rank, self.dist.world, t.micro_batch_size)
        batches = iter(build_loader(dataset, sampler, self.config, reads.horizon))
        if t.validation_every:  # before any training: at step 0 this renders the base model's row
            self._check_base_row()
        bar = _progress(self.dist.is_main, self.step, t.max_steps)
        started = time.perf_counter()
        last: dict[str, float] = {}
        while self.step < stop:
            losses, wait = [], 0.0
            for _ in range(t.gradient_accumulation_steps):
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                losses.append(self.train_step(batch))
            self.step += 1
            self.state = self.schedule.advance(self.state)
            if self.dist.is_main:
                self.source_counts.advance()
            if self.ema is not None:
                self.ema.update(self.engine.module, self.step)
            loss = _mean_over_ranks(float(np.mean(losses)), self.dist.device)
            self.history.append(loss)
            if self.dist.is_main:  # one JSON line per step: easy to plot, diff and test against
                with open(self.output / "train_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                                        "epoch": self.state.epoch}) + "\n")
            self.metrics.count(t.micro_batch_size * t.gradient_accumulation_steps * self.dist.world, wait)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                last = self.metrics.flush_window(self.step, {
                    "train/loss": loss, "train/lr": self.lr_scheduler.get_last_lr()[0],
                    "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                    "train/epoch": float(self.state.epoch),
                    **{f"data/samples_source{i}": float(n) for i, n in enumerate(self.source_counts.counts)}})
            if t.validation_every and (self.step % t.validation_every == 0 or self.step == t.max_steps):
                self.validate()
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                self.evaluate()
            if (self.step % t.checkpoint_every == 0 or self.step == t.max_steps
                    or (t.backup_every and self.step % t.backup_every == 0)):
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", **({"samples/s": f"{last['perf/samples_per_s']:.1f}"} if last else {}))
        bar.close()
        if self.dist.is_main:
            self._write_run_summary(last, time.perf_counter() - started)
            write_loss_curve(self.output)  # OUTPUT/loss_curve.png beside train_log.jsonl
        self.metrics.hparams(_hparams(self.config), {"final/loss": float(np.mean(self.history[-10:] or [float("nan")]))})
        self.metrics.close()
        return last

    def _write_run_summary(self, last: dict[str, float], seconds: float) -> None:
        """OUTPUT/run_summary.json: what two runs need to be compared side by side (TensorBoard has hparams too)."""
        summary = {
            "steps": self.step, "seconds": round(seconds, 2), "hparams": _hparams(self.config),
            "final_loss_mean_last_10": float(np.mean(self.history[-10:])) if self.history else None,
            "last_window": last, "world_size": self.dist.world, "global_batch": self.global_batch,
            "train_samples": self.samples.num_train, "cache_fingerprint": self.cache.spec.fingerprint,
            "samples_per_source": source_report(self.source_counts.counts.tolist(), self.config.data.sources),
            # ZeRO-3 leaves each parameter's module tensor empty; `ds_numel` is its whole size.
            "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters()
                                        if p.requires_grad),
            "config": config_to_dict(self.config), "eval": self.last_eval,
        }
        (self.output / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))

    def save(self) -> Path:
        """Checkpoint the TrainState (collective: every rank calls it)."""
        t = self.config.train
        return save_checkpoint(self.train_state, t.output_dir, t.keep_last, t.backup_every)

    def validate(self) -> None:
        """Held-out loss and (main rank) the image grid: the base row, the weights as they are now, the EMA's."""
        self._check_base_row()
        validate(self.engine.module, self.setup, self.validation, self.metrics, self.step, is_main=self.dist.is_main,
                 sharded=self.sharded, base=self.base_row, ema=self.ema)

    def _check_base_row(self) -> None:
        """Read or render the grid's base row, once per process (collective under ZeRO-3)."""
        if not self._base_checked:
            self.base_row = base_row(self.engine.module, self.setup, self.validation, self.step,
                                     is_main=self.dist.is_main, sharded=self.sharded)
            self._base_checked = True

    def evaluate(self) -> None:
        """FID, KID, IS, CLIP score, LPIPS, HPSv2.1 of the weights as they are now (collective: every rank)."""
        from .evaluation.run import run_evaluation

        self.last_eval = run_evaluation(self.engine.module, self.setup, self.validation, self.step, rank=self.dist.rank,
                                        world=self.dist.world, sharded=self.sharded, metrics=self.metrics,
                                        output_dir=self.output) or self.last_eval


def _mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _progress(enabled: bool, start: int, total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled or None)


def _hparams(config: Config) -> dict[str, Any]:
    t = config.train
    return {"lr": t.lr, "micro_batch_size": t.micro_batch_size, "grad_accum": t.gradient_accumulation_steps,
            "snr_gamma": t.snr_gamma or 0.0, "noise_offset": t.noise_offset, "caption_dropout": t.caption_dropout,
            "prediction_type": t.prediction_type or "scheduler", "ema": t.ema.enabled, "family": config.model.family,
            "zero_stage": int(config.deepspeed.get("zero_optimization", {}).get("stage", 0)), "seed": t.seed,
            "lora_rank": t.lora.rank if t.lora.enabled else 0, "controlnet": t.controlnet.enabled, "global_batch_per_rank": t.micro_batch_size * t.gradient_accumulation_steps}


def run_train(config: Config) -> int:
    """Entry of `latentforge train` and of the deepspeed launcher."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    trainer = Trainer(config)
    try:
        figures = trainer.train()
    except RuntimeError as exc:  # torch.distributed.DistError is one too
        reason = lost_peer(exc)
        if reason is None:
            raise
        # Another node's process died mid-collective: one line, not a traceback per rank (docs/training.md).
        print(f"latentforge train: rank {trainer.dist.rank} of {trainer.dist.world} lost a peer ({reason}); "
              "resume from the last complete checkpoint with train.resume=latest", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        shown = ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in figures.items())
        print(f"train: {trainer.step} steps done; {shown}; outputs in {trainer.output}")
    return 0



def cli_entry(args: Any) -> int:
    """`latentforge train --config FILE [overrides]`."""
    from latentforge.shared.config import load_config

    return run_train(load_config(args.config, args.overrides))


def main(argv: list[str] | None = None) -> int:
    """Launcher entry (`deepspeed --module latentforge.train`, `python -m latentforge.train`)."""
    import argparse

    from latentforge.shared.entry import add_run_args, run_guarded

    parser = argparse.ArgumentParser(prog="python -m latentforge.train", description="train from the cache")
    add_run_args(parser)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment already says the same.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    return run_guarded("train", cli_entry, parser.parse_args(argv))
