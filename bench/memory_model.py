"""Bytes per rank of one training configuration: what DeepSpeed 0.19.8 keeps, where, and for how long.

Pure accounting, no torch: a `Model` (the trainable shapes and counts of the rest), a `Setup` (optimizer,
ZeRO stage, GPUs, offload) and the optimizer's measured state and scratch (`bench.memory_measure`) give
the `Part`s of one rank's memory, each on the GPU or the CPU, held through the whole step or only while
the optimizer steps. DeepSpeed's copies and buffers (bf16 weights, fp32 master copy, gradients, reduce
buckets) follow DeepSpeed 0.19.8's own code with `bf16.enabled: true` and no `data_types` section;
every figure names the file and line it comes from (`SOURCES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

GIB = 1 << 30
CARDS_GIB = (24, 48, 80)
# Assumption, not measured: CUDA context with cuBLAS/cuDNN handles (~0.5-1 GiB), NCCL buffers on several
# GPUs and the caching allocator's fragmentation. Kept apart from everything counted.
RESERVE_GIB = 2.0

# DeepSpeed 0.19.8 defaults that size its buffers (deepspeed/runtime/zero/config.py, engine.py).
REDUCE_BUCKET = 500_000_000  # zero/config.py:113 reduce_bucket_size (elements)
PREFETCH_BUCKET = 50_000_000  # zero/config.py:222 stage3_prefetch_bucket_size
PERSISTENCE_THRESHOLD = 100_000  # zero/config.py:228 stage3_param_persistence_threshold
SUB_GROUP_SIZE = 1_000_000_000  # zero/config.py:182 sub_group_size
INT32_MAX = 2**31 - 1

OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "lion_8bit", "adafactor", "prodigy")
BNB = ("adamw_8bit", "lion", "lion_8bit")  # bitsandbytes' CUDA kernels (train/optimizers.py OPTIMIZERS)
DS = ".venv/lib/python3.11/site-packages/deepspeed/"

# Where each DeepSpeed figure comes from (read in deepspeed 0.19.8).
SOURCES: dict[str, str] = {
    "wrapper": f"{DS}runtime/engine.py:2294-2326 _do_optimizer_sanity_check: bf16 with grad_accum_dtype unset "
               "(= bf16, engine.py:1806) gives DDP_BFLOAT16 at ZeRO 0 -> FP16_UnfusedOptimizer for a client "
               "optimizer (engine.py:2564-2599), ZERO_OPTIMIZATION at ZeRO >= 1; BF16_Optimizer "
               "(runtime/bf16_optimizer.py) only for ZeRO 1 with data_types.grad_accum_dtype=fp32 "
               "(engine.py:2305-2310)",
    "cast": f"{DS}runtime/engine.py:2080-2088 _cast_module_mixed_precision: the module is cast to bf16",
    "z0_master": f"{DS}runtime/fp16/unfused_optimizer.py:78 fp32 clone of every trainable parameter, "
                 "one tensor per parameter (the optimizer sees the model's own shapes)",
    "z0_grads": "autograd gradients in the parameters' dtype (bf16); FP16_UnfusedOptimizer keeps them until after "
                "the step (unfused_optimizer.py:218-236)",
    "z0_fp32_grads": f"{DS}runtime/fp16/unfused_optimizer.py:218-222 fp32 copy of every gradient before the step",
    "z12_weights": f"{DS}runtime/zero/stage_1_and_2.py:505-509 bit16_groups_flat: all bf16 weights on every rank",
    "z12_master": f"{DS}runtime/zero/stage_1_and_2.py:561-577 fp32 partition of this rank, one flat tensor per "
                  "param group (the optimizer sees one 1-D tensor)",
    "z2_grads": f"{DS}runtime/zero/stage_1_and_2.py:2192 grads_in_partition, dtype bf16 (self.dtype), this rank's part",
    "z12_bucket": f"{DS}runtime/zero/stage_1_and_2.py:3266 ipg bucket of reduce_bucket_size elements, bf16 "
                  "(a second one with overlap_comm, default off below ZeRO 3: zero/config.py:384-386)",
    "z12_fp32_grads": f"{DS}runtime/zero/stage_1_and_2.py:3118 fp32 copy of the gradient partition for the step",
    "z12_off_grads": f"{DS}runtime/zero/stage_1_and_2.py:935-941 pinned fp32 gradient partition on the CPU, held",
    "z12_off_staging": f"{DS}runtime/zero/stage_1_and_2.py:566-573 bf16 staging copy of the partition on the CPU",
    "z12_off_tmp": f"{DS}runtime/zero/stage_1_and_2.py:648-660 one largest-parameter bf16 buffer on CPU and on GPU",
    "z3_weights": f"{DS}runtime/zero/stage3.py lp_param_buffer: this rank's bf16 partition; "
                  "parameter_offload.py:317-329 parameters of <= 1e5 elements stay whole on every rank",
    "z3_master": f"{DS}runtime/zero/stage3.py:1118-1176 fp32 partition per sub-group (sub_group_size 1e9 elements "
                 "of the rank's partition, stage3.py:1210-1233; the optimizer steps one at a time, :1235-1257)",
    "z3_grads": f"{DS}runtime/zero/stage3.py:791 grad_partitions_flat_buffer, gradient_accumulation_dtype (bf16), "
                "on self.device (the CPU with offload_optimizer, stage3.py:333)",
    "z3_bucket": f"{DS}runtime/zero/stage3.py:780-784 ipg bucket of reduce_bucket_size elements, bf16",
    "z3_fp32_grads": f"{DS}runtime/zero/stage3.py:2686 fp32 gradient of one sub-group for its step",
    "z3_off_grads": f"{DS}runtime/zero/stage3.py:1334-1342 pinned fp32 gradient buffer per sub-group on the CPU, held",
    "z3_gathered": "estimate: stage3_prefetch_bucket_size (zero/config.py:222) + the largest module's parameters, "
                   "gathered in bf16 (up to stage3_max_live_parameters = 1e9 may be live)",
    "cpu_adam": f"{DS}ops/adam/cpu_adam.py:157-164 exp_avg + exp_avg_sq in fp32 (fp32_optimizer_states=True)",
    "cpu_lion": f"{DS}ops/lion/cpu_lion.py:117-124 allocates exp_avg AND exp_avg_sq in fp32 (only exp_avg is used)",
    "ema": "train/ema.py: train.ema keeps an fp32 shadow of the trainable parameters on rank 0's device "
           "(ZeRO 0-2); under ZeRO-3 each rank keeps the fp32 shadow of its own partition",
}
NOTES: dict[str, str] = {
    "flat": "under ZeRO >= 1 the optimizer sees one flat 1-D fp32 tensor per rank: Adafactor is not factored "
            "there (4 B/param, and its RMS clipping spans the whole partition)",
    "int32": "the optimizer gets a tensor of more than 2^31-1 elements (ZeRO-2 on 1 GPU: the whole 2.57 B-element "
             "partition); bitsandbytes' CUDA kernels take the element count as ctypes.c_int32 "
             "(bitsandbytes/backends/cuda/ops.py:1114, :1208), which wraps silently: do not use",
    "prodigy_d": "Prodigy estimates its step size from this rank's partition only unless "
                 "train.optimizer_args sets fsdp_in_use: true (prodigyopt all-reduces then)",
    "refused": "refused by train/optimizers.py check_optimizer: 8-bit state stays on the GPU, no ZeRO-Offload",
}


class StateBytes(Protocol):
    """An optimizer's measured bytes for a set of parameter shapes (`bench.memory_measure.OptimizerBytes`)."""

    name: str

    def state(self, shapes: dict[tuple[int, ...], int]) -> int: ...

    def temporary(self, shapes: dict[tuple[int, ...], int]) -> int: ...


# ---- the model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """What the estimate needs from the trained model: the shapes that train, and counts of the rest."""

    name: str
    trainable: dict[tuple[int, ...], int]  # parameter shape -> how many trainable parameters have it
    frozen: int = 0  # parameters that do not train (LoRA: the whole base UNet)
    largest_module: int = 0  # parameters of the largest module (ZeRO-3 gathers module by module)
    small: int = 0  # elements of parameters of <= PERSISTENCE_THRESHOLD elements (whole on every ZeRO-3 rank)

    @property
    def n_trainable(self) -> int:
        return sum(math.prod(s) * c for s, c in self.trainable.items())

    @property
    def n_total(self) -> int:
        return self.n_trainable + self.frozen

    @property
    def largest_param(self) -> int:
        return max(math.prod(s) for s in self.trainable)


# ---- one configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """One training configuration: optimizer, ZeRO stage, data-parallel GPUs, offload."""

    optimizer: str
    stage: int
    gpus: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def label(self) -> str:
        off = (" + offload opt+param" if self.offload_param else " + offload opt") if self.offload_optimizer else ""
        return f"ZeRO-{self.stage} x{self.gpus}{off}"


@dataclass(frozen=True)
class Part:
    """Bytes of one thing on one rank: where it lives, whether it is held through the whole step or exists
    only while the optimizer steps, and where the figure comes from."""

    what: str
    nbytes: int
    device: str  # "gpu" | "cpu"
    when: str  # "held" | "step"
    source: str


def estimate(model: Model, setup: Setup, opt: StateBytes) -> tuple[list[Part], list[str]]:
    """The parts of one rank's memory for `setup`, and the note keys that apply (see NOTES).

    Stages 0, 2 and 3 (the ones the table compares); stage 1 is refused rather than guessed.
    """
    if setup.stage not in (0, 2, 3):
        raise ValueError(f"ZeRO stage {setup.stage}: this estimate covers stages 0, 2 and 3")
    if setup.offload_param and (setup.stage != 3 or not setup.offload_optimizer):
        raise ValueError("offload_param is modelled with ZeRO-3 and offload_optimizer only")
    p, n, s = model.n_trainable, setup.gpus, setup.stage
    notes: list[str] = []
    cpu_side = setup.offload_optimizer
    if cpu_side and setup.optimizer in ("adamw_8bit", "lion_8bit"):
        return [], ["refused"]
    parts: list[Part] = []

    def add(what: str, nbytes: float, device: str, when: str, source: str) -> None:
        parts.append(Part(what, int(nbytes), device, when, source))

    if s == 0:
        if setup.optimizer in BNB and model.largest_param > INT32_MAX:
            notes.append("int32")
        add("bf16 weights", 2 * model.n_total, "gpu", "held", SOURCES["cast"])
        add("fp32 master copy", 4 * p, "gpu", "held", SOURCES["z0_master"])
        add("bf16 gradients", 2 * p, "gpu", "held", SOURCES["z0_grads"])
        add("optimizer state", opt.state(model.trainable), "gpu", "held", f"measured: {opt.name}, model shapes")
        add("fp32 gradient copies", 4 * p, "gpu", "step", SOURCES["z0_fp32_grads"])
        add("optimizer temporaries", opt.temporary(model.trainable), "gpu", "step", f"measured: {opt.name}")
        return parts, notes

    # ZeRO >= 1: the optimizer owns one flat fp32 tensor per rank (ZeRO-3: one per sub-group).
    part = math.ceil(p / n)
    flat = {(part,): 1}
    if s == 3 and part > SUB_GROUP_SIZE:
        # Sub-groups close once they reach sub_group_size elements of this rank's partition
        # (stage3.py:1210-1233); the overshoot of the last parameter in each is ignored here.
        flat = {(SUB_GROUP_SIZE,): part // SUB_GROUP_SIZE}
        if part % SUB_GROUP_SIZE:
            flat[(part % SUB_GROUP_SIZE,)] = 1
    # ZeRO-3 steps one sub-group at a time (stage3.py:1235-1257): scratch for the largest one only.
    one = {(max(sh[0] for sh in flat),): 1}
    odev = "cpu" if cpu_side else "gpu"
    if setup.optimizer == "adafactor":
        notes.append("flat")
    if setup.optimizer in BNB and not cpu_side and max(one)[0] > INT32_MAX:
        notes.append("int32")
    if setup.optimizer == "prodigy" and n > 1:
        notes.append("prodigy_d")
    if cpu_side and setup.optimizer in ("adamw", "lion"):
        # DeepSpeed's CPU kernels replace these under offload (train/optimizers.py _deepspeed_cpu_optimizer).
        state, temp, src = 8 * part, 0, SOURCES["cpu_adam" if setup.optimizer == "adamw" else "cpu_lion"]
    else:
        state, temp = opt.state(flat), opt.temporary(one if s == 3 else flat)
        src = f"measured: {opt.name}, flat partition"

    if s == 2:
        add("bf16 weights (all, every rank)", 2 * model.n_total, "gpu", "held", SOURCES["z12_weights"])
        add("fp32 master partition", 4 * part, odev, "held", SOURCES["z12_master"])
        add("reduce bucket (bf16)", 2 * REDUCE_BUCKET, "gpu", "held", SOURCES["z12_bucket"])
        if cpu_side:
            add("fp32 gradient partition", 4 * part, "cpu", "held", SOURCES["z12_off_grads"])
            add("bf16 staging partition", 2 * part, "cpu", "held", SOURCES["z12_off_staging"])
            add("largest-parameter grad buffers", 2 * model.largest_param, "gpu", "held", SOURCES["z12_off_tmp"])
            add("largest-parameter grad buffers", 2 * model.largest_param, "cpu", "held", SOURCES["z12_off_tmp"])
        else:
            add("bf16 gradient partition", 2 * part, "gpu", "held", SOURCES["z2_grads"])
            add("fp32 gradient partition", 4 * part, "gpu", "step", SOURCES["z12_fp32_grads"])
    else:
        wdev = "cpu" if setup.offload_param else "gpu"
        add("bf16 weight partition", 2 * math.ceil(model.n_total / n), wdev, "held", SOURCES["z3_weights"])
        add("small parameters, whole", 2 * model.small, "gpu", "held", SOURCES["z3_weights"])
        add("gathered parameters", 2 * (PREFETCH_BUCKET + model.largest_module), "gpu", "held", SOURCES["z3_gathered"])
        add("fp32 master partition", 4 * part, odev, "held", SOURCES["z3_master"])
        add("bf16 gradient partition", 2 * part, odev, "held", SOURCES["z3_grads"])
        add("reduce bucket (bf16)", 2 * REDUCE_BUCKET, "gpu", "held", SOURCES["z3_bucket"])
        if cpu_side:
            add("fp32 gradient partition", 4 * part, "cpu", "held", SOURCES["z3_off_grads"])
        else:
            add("fp32 gradient, one sub-group", 4 * max(one)[0], "gpu", "step", SOURCES["z3_fp32_grads"])
    add("optimizer state", state, odev, "held", src)
    add("optimizer temporaries", temp, odev, "step", src)
    return parts, notes


def totals(parts: list[Part]) -> dict[str, float]:
    """GiB per device: held through the step, and the peak while the optimizer steps (held + step parts;
    the gradient buffers are counted as still held then, exact for ZeRO 0, at most 2 B/param/N high above)."""
    out = {}
    for dev in ("gpu", "cpu"):
        held = sum(x.nbytes for x in parts if x.device == dev and x.when == "held")
        step = sum(x.nbytes for x in parts if x.device == dev and x.when == "step")
        out[f"{dev}_held_gib"] = held / GIB
        out[f"{dev}_step_peak_gib"] = (held + step) / GIB
    return out


def fits(t: dict[str, float], activations_gib: float, card_gib: float, reserve_gib: float = RESERVE_GIB) -> bool:
    """Whether a rank fits a card: held states + activations + reserve, and the step's peak + reserve."""
    return max(t["gpu_held_gib"] + activations_gib, t["gpu_step_peak_gib"]) + reserve_gib <= card_gib

