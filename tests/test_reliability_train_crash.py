"""Guarantee 2: a training run killed with SIGKILL between or during checkpoint writes resumes with
`train.resume: latest` from a complete checkpoint only, and the resumed run reproduces the loss
trajectory of an uninterrupted run exactly (compared step by step in OUTPUT/train_log.jsonl, where a
resumed run appends). See docs/reliability.md."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from reliability_support import (
    DEMO,
    FP32_ZERO2,
    Job,
    child_env,
    logged_losses,
    seeded_rng,
    soak,
    train_command,
    wait_until,
)

from latentforge.shared.config import load_config
from latentforge.train.checkpoint import COMPLETE, find_checkpoint

STEPS = 4


def train_args(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    # A constant lr keeps the schedule a pure function of the step; keep_last=1 makes every save prune.
    return [f"model.pretrained={model}", f"cache.path={cache}", f"train.output_dir={out}", "train.num_workers=0",
            "train.validation_every=0", "train.held_out_fraction=0", "train.log_every=1", "train.caption_dropout=0.2",
            "train.micro_batch_size=2", f"train.max_steps={STEPS}", "train.checkpoint_every=1", "train.keep_last=1",
            "train.ema.enabled=true", FP32_ZERO2, *extra]


def train_in_process(args: list[str]) -> None:
    """As `latentforge train` would, in this process: with the CPU backends a fresh process has (an
    in-process cache job earlier in the session must not change the numerics)."""
    import torch

    from latentforge.train.trainer import Trainer

    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = True
    try:
        Trainer(load_config(DEMO, args)).train()
    finally:
        torch.backends.mkldnn.enabled = saved


@pytest.fixture(scope="module")
def reference(tiny_sdxl, small_cache, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("train-reference") / "run"
    train_in_process(train_args(tiny_sdxl, small_cache, out))
    losses = logged_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {step: values[0] for step, values in losses.items()}


def complete_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def assert_trajectory(out: Path, reference: dict[int, float], context: str) -> None:
    """Every loss ever logged for a step (killed runs and resumed ones) equals the uninterrupted run's."""
    losses = logged_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1)), (context, losses)
    for step, values in losses.items():
        assert all(v == reference[step] for v in values), (context, step, values, reference[step])


def killed_at(point: str, args: list[str], log: Path) -> Job:
    job = Job(train_command(args), log, child_env(LATENTFORGE_FAULT_KILL_AT=point))
    assert job.wait() == -9, f"{point} was not reached: {job.stderr[-3000:]}"
    return job


@pytest.mark.slow
def test_sigkill_during_and_between_checkpoint_writes_resumes_exactly(tiny_sdxl, small_cache, reference, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_sdxl, small_cache, out)
    resume = [*args, "train.resume=latest"]

    # 1. Killed with every file of step 2 written but its COMPLETE marker: step 2 is not resumable.
    killed_at("checkpoint:state_written@2", args, tmp_path / "a")
    assert complete_steps(out) == [1] and (out / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()
    assert find_checkpoint(out, "latest").name == "step-00000001"

    # 2. Resumed from step 1; step 2 completes, then killed while pruning step 1 (its marker goes first).
    killed_at("checkpoint:pruning", resume, tmp_path / "b")
    assert complete_steps(out) == [2] and (out / "checkpoints" / "step-00000001").is_dir()
    assert find_checkpoint(out, "latest").name == "step-00000002"

    # 3. Resumed from step 2 and killed at a random moment after step 3 was logged (while training
    #    step 4 or writing a checkpoint).
    rng, seed = seeded_rng("train-kill")
    job = Job(train_command(resume), tmp_path / "c", child_env())
    wait_until(lambda: max(logged_losses(out)) >= 3 or not job.running(), 300, f"step 3 (seed {seed})")
    time.sleep(rng.uniform(0.0, 0.25))  # inside step 4 or step 3's checkpoint (a CPU step takes > 0.5 s)
    job.kill_tree()
    assert job.proc.returncode == -9, f"seed {seed}: the run finished before the kill"
    assert find_checkpoint(out, "latest").name in ("step-00000002", "step-00000003", "step-00000004")

    # 4. Resumed to the end, in this process.
    train_in_process(resume)
    assert complete_steps(out) == [STEPS]
    assert_trajectory(out, reference, f"seed {seed}")


@soak
@pytest.mark.parametrize("point", ["checkpoint:deepspeed_written", "checkpoint:state_written", "write:COMPLETE",
                                   "checkpoint:complete_written", "write:latest", "checkpoint:pruning"])
@pytest.mark.parametrize("save", [1, 2])
def test_soak_every_checkpoint_fault_point(point, save, tiny_sdxl, small_cache, reference, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_sdxl, small_cache, out)
    killed_at(f"{point}@{save}", args, tmp_path / "killed")
    latest = find_checkpoint(out, "latest")
    assert latest is None or (latest / COMPLETE).is_file()
    for ckpt in (out / "checkpoints").glob("step-*"):  # a COMPLETE folder is always whole
        if (ckpt / COMPLETE).is_file():
            assert (ckpt / "trainer_state.json").is_file() and list(ckpt.glob("rng-rank*.pt"))
    train_in_process([*args, "train.resume=latest"])
    assert_trajectory(out, reference, point)


@soak
def test_soak_random_kills_while_training(tiny_sdxl, small_cache, reference, tmp_path):
    rng, seed = seeded_rng("train-soak")
    out = tmp_path / "run"
    args = [*train_args(tiny_sdxl, small_cache, out), "train.resume=latest"]
    for round_ in range(6):
        job = Job(train_command(args), tmp_path / f"r{round_}", child_env())
        done_before = max(logged_losses(out), default=0)
        wait_until(lambda job=job, d=done_before: max(logged_losses(out), default=0) > d or not job.running(), 300,
                   f"progress (seed {seed})")
        time.sleep(rng.uniform(0.0, 3.0))
        if job.running():
            job.kill_tree()
        else:
            job.wait()
        if complete_steps(out) == [STEPS]:
            break
    if complete_steps(out) != [STEPS]:
        train_in_process(args)
    assert_trajectory(out, reference, f"seed {seed}")
    shutil.rmtree(out)
