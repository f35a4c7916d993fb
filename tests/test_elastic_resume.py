"""Elastic resume: a run checkpointed on 2 processes continues on 1 or 3, at every ZeRO stage.

Under ZeRO >= 1 the trainer converts the checkpoint to DeepSpeed's universal format (`train/universal.py`).
Every case keeps the global batch at 6 (micro-batch 1: 2 ranks x 3 accumulation steps, 1 x 6, 3 x 2), so
the global sample order and each sample's noise are the same at every world size, and the resumed loss
trajectory must continue the uninterrupted 2-process one. Only the summation order of the gradients
changes with the world size: fp32 runs agree to about 1e-7 relative; RTOL leaves room for that.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import soak
from test_train import DEMO, FP32_ZERO, logged_losses, run_in_process, torchrun_train, train_args

from latentforge.shared.config import ConfigError, load_config

RTOL, ATOL = 2e-4, 1e-6  # measured: 1e-7 relative at most (fp32), bf16 about 1e-4 (docs/training.md)
GLOBAL = 6  # divisible by 1, 2 and 3 ranks with micro-batch 1
STEPS, CKPT = 4, 2  # one epoch of the small cache at global batch 6; the checkpoint halfway


def zero(stage: int) -> str:
    return FP32_ZERO % stage


def elastic_args(model: Path, cache: Path, out: Path, stage: int, world: int, *extra: str) -> list[str]:
    """Constant lr (a 2-step run is a true prefix), EMA on, global batch GLOBAL at `world` ranks."""
    return train_args(model, cache, out, "train.lr_scheduler=constant", "train.warmup_steps=0", "train.micro_batch_size=1",
                      f"train.gradient_accumulation_steps={GLOBAL // world}", f"train.max_steps={STEPS}",
                      f"train.checkpoint_every={CKPT}", "train.keep_last=5", "train.ema.enabled=true", zero(stage), *extra)


def resume(model: Path, cache: Path, base: Path, out: Path, stage: int, world: int, *extra: str) -> dict[int, float]:
    """Resume `base`'s step-CKPT checkpoint with `world` ranks into `out`; the losses it logged by step."""
    args = elastic_args(model, cache, out, stage, world, f"train.resume={checkpoint(base, CKPT)}", *extra)
    if world == 1:
        run_in_process(args)  # no launcher: saves a process start
    else:
        torchrun_train(world, args)
    return logged_losses(out)


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def sampler_state(out: Path, step: int) -> dict:
    return json.loads((checkpoint(out, step) / "trainer_state.json").read_text())["sampler"]


def trained_samples(config_args: list[str], phases: list[tuple[dict | None, int, int]]) -> None:
    """Every (bucket, item) the ranks trained on, from the sampler states the runs started from, is each
    sample of the epoch exactly once.

    `phases`: (sampler state as saved, None for a fresh run; world size; optimizer steps). Each rank's
    micro-batches are what `MicroBatchSampler` hands the trainer of that rank from that state.
    """
    from latentforge.shared.cache_reader import CacheReader
    from latentforge.train.data import CachedSamples
    from latentforge.train.sampler import GlobalBucketSchedule

    config = load_config(DEMO, config_args)
    schedule = GlobalBucketSchedule(CachedSamples(CacheReader(config.cache.path), config).bucket_sizes, GLOBAL,
                                    config.train.seed)
    seen = []
    for saved, world, steps in phases:
        state = schedule.initial_state() if saved is None else schedule.load_state(saved)
        for rank in range(world):
            batches = schedule.micro_batches(state, rank, world, 1)
            for _ in range(steps * GLOBAL // world):
                mb = next(batches)
                seen.extend((mb.bucket, i) for i in mb.items)
    plan, _ = schedule.epoch_plan(0, {})
    epoch = [(bucket, int(i)) for bucket, items in plan for i in items]
    assert schedule.steps_per_epoch == STEPS and len(epoch) == STEPS * GLOBAL
    assert sorted(seen) == sorted(epoch), "the epoch's samples were not each trained exactly once"


def check_elastic(model: Path, cache: Path, tmp: Path, stage: int, worlds: tuple[int, ...], *extra: str,
                  rtol: float = RTOL, ema_atol: float = 1e-5) -> None:
    """2 processes train STEPS steps (checkpoint at CKPT); resuming CKPT on each of `worlds` continues them."""
    base = tmp / f"z{stage}-w2"
    torchrun_train(2, elastic_args(model, cache, base, stage, 2, *extra))
    full = logged_losses(base)
    from safetensors.torch import load_file

    want_ema = load_file(str(checkpoint(base, STEPS) / "ema.safetensors"))
    for world in worlds:
        out = tmp / f"z{stage}-w{world}"
        got = resume(model, cache, base, out, stage, world, *extra)
        assert sorted(got) == [3, 4]
        np.testing.assert_allclose([got[s] for s in (3, 4)], [full[s] for s in (3, 4)], rtol=rtol, atol=ATOL,
                                   err_msg=f"ZeRO-{stage}, 2 -> {world} ranks")
        assert sampler_state(out, STEPS) == sampler_state(base, STEPS)
        trained_samples(elastic_args(model, cache, out, stage, world),
                        [(None, 2, CKPT), (sampler_state(base, CKPT), world, STEPS - CKPT)])
        ema = load_file(str(checkpoint(out, STEPS) / "ema.safetensors"))
        assert ema.keys() == want_ema.keys()
        assert max(float((ema[k] - want_ema[k]).abs().max()) for k in ema) < ema_atol
    converted = checkpoint(base, CKPT).with_name(f"step-{CKPT:08d}-universal")
    assert (converted / "UNIVERSAL_COMPLETE").is_file() == (stage >= 1)  # ZeRO 0 needs no conversion
    assert not list(converted.parent.glob(".*.tmp")), "conversion litter left behind"


@pytest.mark.slow
def test_zero2_checkpoint_resumes_on_one_process(unet_only_model, small_cache, tmp_path):
    check_elastic(unet_only_model, small_cache, tmp_path, 2, (1,))


@soak
def test_zero2_checkpoint_resumes_on_three_processes(unet_only_model, small_cache, tmp_path):
    check_elastic(unet_only_model, small_cache, tmp_path, 2, (3,))


@soak
def test_zero1_checkpoint_resumes_on_one_and_three_processes(unet_only_model, small_cache, tmp_path):
    check_elastic(unet_only_model, small_cache, tmp_path, 1, (1, 3))


@soak
def test_zero0_checkpoint_resumes_on_three_processes(unet_only_model, small_cache, tmp_path):
    check_elastic(unet_only_model, small_cache, tmp_path, 0, (3,))


@soak
def test_lora_zero3_checkpoint_resumes_on_one_and_three_processes(unet_only_model, small_cache, tmp_path):
    check_elastic(unet_only_model, small_cache, tmp_path, 3, (1, 3), "train.lora.enabled=true", "train.lora.rank=4",
                  "train.lr=1e-2")


@soak
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_checkpoint_resumes_on_one_process(unet_only_model, small_cache, tmp_path, stage):
    """bf16 weights round each step's update, and the rounding follows the gradient's summation order, which
    the world size changes: measured 1.3e-4 relative after one step past the resume (docs/training.md)."""
    check_elastic(unet_only_model, small_cache, tmp_path, stage, (1,), "deepspeed.bf16.enabled=true",
                  rtol=1e-3, ema_atol=1e-2)


def _checkpoint_dir(tmp: Path, *, world: int, global_batch: int, optimizer: str = "adamw") -> Path:
    """A stand-in checkpoint folder: only what `prepare_resume` reads before anything loads."""
    ckpt = tmp / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    state = {"step": 2, "world_size": world, "sampler": {"epoch": 0, "step": 2, "carry": {}, "global_batch": global_batch,
                                                          "seed": 0}, "config": {"train": {"optimizer": optimizer}}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (ckpt / "COMPLETE").write_text(ckpt.name)
    return ckpt


def test_resume_checks_fail_before_anything_loads(tmp_path):
    """Another global batch, or an optimizer the universal format cannot carry, is one config error; the
    same world size and ZeRO 0 need no conversion."""
    from latentforge.train.universal import prepare_resume

    ckpt = _checkpoint_dir(tmp_path, world=2, global_batch=6)

    def config(*extra: str):
        return load_config(DEMO, ["train.micro_batch_size=1", *extra])

    ds2 = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match="global batch of 6 .* set train.gradient_accumulation_steps=2"):
        prepare_resume(config("train.gradient_accumulation_steps=1"), ds2, ckpt, 3, 0)
    with pytest.raises(ConfigError, match="train.optimizer=lion; resume with 2 ranks"):
        prepare_resume(config("train.gradient_accumulation_steps=2", "train.optimizer=lion"), ds2, ckpt, 3, 0)
    with pytest.raises(ConfigError, match="with amsgrad"):
        prepare_resume(config("train.gradient_accumulation_steps=2", "train.optimizer_args={amsgrad: true}"), ds2, ckpt, 3, 0)
    assert prepare_resume(config("train.gradient_accumulation_steps=3"), ds2, ckpt, 2, 0) == (ds2, None)
    ds0 = {"zero_optimization": {"stage": 0}}
    assert prepare_resume(config("train.gradient_accumulation_steps=6", "train.optimizer=lion"), ds0, ckpt, 1, 0) == (ds0, None)
    assert not list(ckpt.parent.glob("*universal*"))


class _FilesOnlyEngine:
    """Writes a file where DeepSpeed would write its checkpoint: enough for `save_checkpoint`'s bookkeeping."""

    def save_checkpoint(self, root: str, tag: str, **_: object) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({}, Path(root) / tag / "mp_rank_00_model_states.pt")


def test_pruning_and_rewriting_remove_the_universal_sibling(tmp_path):
    """A converted folder never outlives, nor predates, the checkpoint it was converted from."""
    from latentforge.train.checkpoint import UNIVERSAL_DONE, TrainState, save_checkpoint, universal_path
    from latentforge.train.sampler import GlobalBucketSchedule

    schedule = GlobalBucketSchedule({(64, 64): 12}, 2, seed=0)
    state = TrainState(engine=_FilesOnlyEngine(), schedule=schedule, sampler=schedule.initial_state(), rank=0, world=1)

    def save(step: int) -> Path:
        state.step = step
        return save_checkpoint(state, tmp_path, keep_last=1)

    def convert(ckpt: Path) -> Path:  # what a resume on another world size leaves next to `ckpt`
        sibling = universal_path(ckpt)
        (sibling / "zero").mkdir(parents=True)
        (sibling / UNIVERSAL_DONE).write_text(ckpt.name)
        return sibling

    first = convert(save(1))
    second = save(2)  # prunes step 1
    assert not first.parent.joinpath("step-00000001").exists() and not first.exists()
    stale = convert(second)
    assert save(2) == second and not stale.exists()  # rewritten after a crash at that step: the old conversion goes
    assert (second / "COMPLETE").is_file()


def test_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves nothing that looks converted; a finished one is reused."""
    from deepspeed.checkpoint import ds_to_universal

    from latentforge.train.checkpoint import UNIVERSAL_DONE, universal_path
    from latentforge.train.universal import prepare_universal

    ckpt = _checkpoint_dir(tmp_path, world=2, global_batch=6)
    calls = []

    def convert(args, fail: bool) -> None:
        calls.append(args.input_folder)
        (Path(args.output_folder) / "zero").mkdir(parents=True)
        (Path(args.output_folder).parent / "latest_universal").write_text("x")  # as DeepSpeed's does
        if fail:
            raise RuntimeError("killed")

    monkeypatch.setattr(ds_to_universal, "main", lambda args: convert(args, fail=True))
    with pytest.raises(RuntimeError, match="killed"):
        prepare_universal(ckpt, rank=0)
    assert not universal_path(ckpt).exists() and sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]
    monkeypatch.setattr(ds_to_universal, "main", lambda args: convert(args, fail=False))
    target = prepare_universal(ckpt, rank=0)
    assert target == universal_path(ckpt) and (target / UNIVERSAL_DONE).read_text() == ckpt.name
    assert prepare_universal(ckpt, rank=0) == target and len(calls) == 2  # reused, not converted again
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name, target.name]
