"""Every `train.optimizer` choice trains 3 steps under DeepSpeed and resumes exactly; our warmup/decay
schedule applies to each, a `deepspeed.optimizer` section works with or without `deepspeed.scheduler`,
ZeRO-Offload runs with the optimizer it needs, and impossible combinations fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_support import soak
from test_train import DEMO, run_in_process, train_args

from latentforge.shared.config import ConfigError, load_config
from latentforge.train.distributed import deepspeed_config
from latentforge.train.objective import lr_lambda
from latentforge.train.optimizers import OPTIMIZERS, build_optimizer

ZERO = "deepspeed={zero_optimization: {stage: %d%s}, bf16: {enabled: false}%s}"
OFFLOAD_OPT = ", offload_optimizer: {device: cpu}"
OFFLOAD_ALL = ", offload_optimizer: {device: cpu}, offload_param: {device: cpu}"
DS_ADAMW = ", optimizer: {type: AdamW, params: {}}"
COMMON = ["train.max_steps=3", "train.checkpoint_every=2", "train.warmup_steps=2", "train.lr_scheduler=cosine",
          "train.lr=1e-3"]


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def three_steps_then_resume(model: Path, cache: Path, tmp_path: Path, *extra: str) -> tuple[list[float], list[float]]:
    """Train 3 steps (checkpoint at 2); resume a second run from that checkpoint: its step 3 must equal."""
    full = run_in_process(train_args(model, cache, tmp_path / "full", *COMMON, *extra))
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000002"
    resumed = run_in_process(train_args(model, cache, tmp_path / "resumed", *COMMON, *extra, f"train.resume={ckpt}"))
    return full, resumed


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,zero", [
    ("adamw", ZERO % (2, "", "")),
    ("adamw_8bit", ZERO % (2, "", "")),
    ("lion", ZERO % (1, "", "")),
    ("lion_8bit", ZERO % (2, "", "")),
    ("adafactor", ZERO % (2, OFFLOAD_OPT, "")),  # no DeepSpeed CPU kernel: runs as a client optimizer on the CPU
    ("prodigy", ZERO % (3, OFFLOAD_ALL, "")),  # ZeRO-3 with parameters and optimizer state offloaded
])
def test_each_optimizer_takes_three_steps_and_resumes_exactly(unet_only_model, small_cache, tmp_path, optimizer, zero):
    # EMA stays on (the demo config's): sharded under ZeRO-3.
    full, resumed = three_steps_then_resume(unet_only_model, small_cache, tmp_path, f"train.optimizer={optimizer}", zero)
    assert len(full) == 3 and all(loss == loss for loss in full)
    assert resumed == full[2:], (optimizer, full, resumed)
    lrs = [row["lr"] for row in logged(tmp_path / "full")]
    peak = 1e-3
    assert lrs == pytest.approx([peak * lr_lambda(s, 2, 3, "cosine") for s in range(1, 4)])


# `torch_adam: true` has DeepSpeed build its AdamW from torch: the section is read, filled and scheduled the same
# way, without compiling DeepSpeed's FusedAdam kernel (about 100 s on 2 cores, paid by every clean CI run).
TORCH_ADAMW = ", optimizer: {type: AdamW, params: {torch_adam: true}}"


def deepspeed_section_trains_and_resumes(model: Path, cache: Path, tmp_path: Path, optimizer: str, scheduler: bool) -> None:
    """A `deepspeed.optimizer` section (`optimizer`), with or without a `deepspeed.scheduler` section, trains
    3 steps and resumes exactly; the lr follows our schedule without one, DeepSpeed's with one."""
    sched = ", scheduler: {type: WarmupLR, params: {warmup_min_lr: 0, warmup_max_lr: 0.002, warmup_num_steps: 4}}"
    zero = ZERO % (2, "", optimizer + (sched if scheduler else ""))
    common = COMMON if not scheduler else [*COMMON, "train.warmup_steps=0", "train.lr_scheduler=constant"]
    full = run_in_process(train_args(model, cache, tmp_path / "full", *common, zero))
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000002"
    resumed = run_in_process(train_args(model, cache, tmp_path / "r", *common, zero, f"train.resume={ckpt}"))
    assert resumed == full[2:]
    lrs = [row["lr"] for row in logged(tmp_path / "full")]
    if scheduler:  # DeepSpeed's WarmupLR (log-shaped warmup to 0.002), not ours
        assert lrs[-1] < 0.002 and lrs[0] < lrs[1] < lrs[2]
    else:  # train.lr and our warmup/cosine reach DeepSpeed's own AdamW
        assert lrs == pytest.approx([1e-3 * lr_lambda(s, 2, 3, "cosine") for s in range(1, 4)])


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [False, True])
def test_a_deepspeed_optimizer_section_with_or_without_its_scheduler(unet_only_model, small_cache, tmp_path, scheduler):
    deepspeed_section_trains_and_resumes(unet_only_model, small_cache, tmp_path, TORCH_ADAMW, scheduler)


@soak
def test_a_deepspeed_optimizer_section_with_its_compiled_fused_adam(unet_only_model, small_cache, tmp_path):
    """The same section with DeepSpeed's default AdamW kernel (FusedAdam, compiled on first use: about
    100 s on 2 cores, too long for `make test`; the section's handling is the test above)."""
    deepspeed_section_trains_and_resumes(unet_only_model, small_cache, tmp_path, DS_ADAMW, scheduler=False)


def _ds(*overrides: str) -> tuple:
    config = load_config(DEMO, ["train.output_dir=x", *overrides])
    return config, deepspeed_config(config, 1)


def test_a_deepspeed_optimizer_section_takes_the_train_values_it_leaves_out():
    config, ds = _ds("deepspeed={optimizer: {type: AdamW, params: {eps: 1.0e-6}}}", "train.lr=3e-4",
                     "train.adam_betas=[0.8, 0.95]")
    optimizer, filled = build_optimizer([], config, ds)
    assert optimizer is None
    assert filled["optimizer"]["params"] == {"eps": 1e-6, "lr": 3e-4, "betas": [0.8, 0.95], "weight_decay": 1e-2}


@pytest.mark.parametrize("overrides,words", [
    (["deepspeed={optimizer: {type: AdamW, params: {lr: 0.1}}}", "train.lr=3e-4"], ["deepspeed.optimizer.params.lr", "train.lr"]),
    (["deepspeed={optimizer: {type: AdamW}}", "train.optimizer=lion"], ["train.optimizer=lion", "deepspeed.optimizer"]),
    (["train.optimizer=deepspeed"], ["train.optimizer=deepspeed", "needs a deepspeed.optimizer section"]),
    (["train.optimizer=adamw_8bit", "deepspeed={zero_optimization: {stage: 2, offload_optimizer: {device: cpu}}}"],
     ["adamw_8bit", "ZeRO-Offload"]),
    (["deepspeed={scheduler: {type: WarmupLR}}", "train.warmup_steps=10"], ["train.", "deepspeed.scheduler", "keep one"]),
])
def test_impossible_combinations_fail_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as info:
        _ds(*overrides)  # deepspeed_config checks the optimizer choice before any model loads
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_offload_uses_deepspeeds_cpu_kernels_for_adam_and_lion():
    assert OPTIMIZERS["adamw"].offload == "ds_adam" and OPTIMIZERS["lion"].offload == "ds_lion"
    assert {n for n, c in OPTIMIZERS.items() if c.offload == "no"} == {"adamw_8bit", "lion_8bit"}


@soak
@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_offload_with_deepspeeds_compiled_cpu_kernels_resumes_exactly(unet_only_model, small_cache, tmp_path, optimizer):
    """ZeRO-Offload with AdamW/Lion: DeepSpeed compiles its CPU kernels on first use (about 2 minutes each
    on 2 cores), too long for `make test`; `make soak` runs it."""
    full, resumed = three_steps_then_resume(unet_only_model, small_cache, tmp_path, f"train.optimizer={optimizer}",
                                            ZERO % (2, OFFLOAD_OPT, ""))
    assert resumed == full[2:], (full, resumed)


def test_bitsandbytes_refuses_a_partition_past_its_32_bit_element_count():
    import torch

    config, ds = _ds("train.optimizer=adamw_8bit", "deepspeed={zero_optimization: {stage: 2}}")
    big = torch.nn.Parameter(torch.empty(2**31, device="meta"))
    with pytest.raises(ConfigError, match="32-bit limit") as info:
        build_optimizer([big], config, ds)
    assert "\n" not in str(info.value)
    config0, ds0 = _ds("train.optimizer=adamw_8bit", "deepspeed={zero_optimization: {stage: 0}}")
    from latentforge.train.optimizers import _check_bnb_partition

    _check_bnb_partition(config0, ds0, [big])  # ZeRO 0 keeps per-parameter tensors: each is within the limit


def test_prodigy_sharded_over_several_cpu_processes_is_one_line(monkeypatch):
    """prodigyopt sums its estimate over ranks in a CUDA tensor: on CPU that would crash mid-step."""
    import torch

    config, ds = _ds("train.optimizer=prodigy", "deepspeed={zero_optimization: {stage: 2}}")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs CUDA") as info:
        build_optimizer([torch.nn.Parameter(torch.zeros(4))], config, ds)
    assert "\n" not in str(info.value)
