"""Elastic resume: a ZeRO >= 1 checkpoint resumed with another number of ranks, through DeepSpeed's
universal checkpoint.

ZeRO 1-3 split the optimizer state (and under ZeRO-3 the weights) into one file per rank, cut for the
world size that wrote them; DeepSpeed refuses to load them at another world size. Its universal
checkpoint stores every parameter whole (fp32 master weights and each optimizer moment, one folder per
parameter), which any world size can slice again. So when the world size in `trainer_state.json`
differs from the current one and the ZeRO stage is >= 1, rank 0 converts the checkpoint once
(`deepspeed.checkpoint.ds_to_universal`) into the sibling folder `step-N-universal/`, the other ranks
wait at a barrier, and the engine loads that folder with `checkpoint.load_universal` set. ZeRO 0 keeps
nothing per rank (every rank holds the whole optimizer state), so it resumes at any world size as is.

Only the engine's files come from the universal folder: `trainer_state.json`, the EMA (whole tensors at
every stage) and the RNG files are read from the original checkpoint. The conversion is written to a
temporary folder, fsynced, marked and renamed, so a crash mid-conversion leaves no folder that looks
finished; a finished one is reused by later resumes, and pruning or rewriting `step-N` removes it first.

Checked before anything loads (`prepare_resume`): the global batch must be the checkpoint's (the sample
order depends on it; the error names the accumulation that keeps it), and the optimizer must be AdamW,
the only state DeepSpeed's converter carries. Per-rank RNG streams are not converted: at another world
size each rank starts from `train.seed`. Noise, timesteps and dropout of the objective do not use them
(they come from per-sample generators, `Trainer.batch_generator`), so only randomness inside the model
(e.g. `train.lora.dropout`) differs from an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as dist

from latentforge.shared.config import Config, ConfigError

from .checkpoint import STATE_FILE, UNIVERSAL_DONE, fsync_tree, universal_path

log = logging.getLogger("latentforge.train")


def prepare_resume(config: Config, ds_config: dict[str, Any], checkpoint: Path, world: int,
                   rank: int) -> tuple[dict[str, Any], Path | None]:
    """Before the engine is built: check that `checkpoint` can resume with `world` ranks, and convert it
    when the world size changed under ZeRO >= 1 (collective; rank 0 converts).

    Returns the DeepSpeed config to build the engine with and the folder its state loads from (None: the
    checkpoint itself). Mismatches fail here in one line, before a model loads or a file is written.
    """
    check_global_batch(config, checkpoint, world)
    if not needs_universal(checkpoint, world, ds_config):
        return ds_config, None
    check_universal_supported(config, ds_config, checkpoint, world)
    return load_universal_config(ds_config), prepare_universal(checkpoint, rank)


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage of a derived DeepSpeed config (0 when the section is absent)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def saved_world_size(checkpoint: Path) -> int:
    """The number of ranks that wrote `checkpoint` (its trainer_state.json)."""
    return int(json.loads((checkpoint / STATE_FILE).read_text())["world_size"])


def needs_universal(checkpoint: Path, world: int, ds_config: dict[str, Any]) -> bool:
    """Whether resuming `checkpoint` with `world` ranks needs the universal format.

    Only partitioned optimizer state (ZeRO >= 1) read by a different number of ranks does.
    """
    return zero_stage(ds_config) >= 1 and saved_world_size(checkpoint) != world


def check_global_batch(config: Config, checkpoint: Path, world: int) -> None:
    """Refuse, before anything loads, a resume whose global batch differs from the checkpoint's.

    The sample order is a function of the global batch (`sampler.py`): with another number of ranks it
    continues only if micro-batch x accumulation x ranks stays the same, and the error says how.
    """
    t = config.train
    saved = int(json.loads((checkpoint / STATE_FILE).read_text())["sampler"]["global_batch"])
    now = t.micro_batch_size * t.gradient_accumulation_steps * world
    if saved == now:
        return
    per_step = t.micro_batch_size * world
    hint = (f"train.gradient_accumulation_steps={saved // per_step}" if saved % per_step == 0 else
            f"a micro-batch and accumulation whose product with {world} ranks is {saved}")
    raise ConfigError(f"{checkpoint.name} was trained with a global batch of {saved} samples and this run has "
                      f"{t.micro_batch_size} x {t.gradient_accumulation_steps} x {world} ranks = {now}; "
                      f"the sample order continues only with the same global batch: set {hint}")


# Optimizer state DeepSpeed's converter understands: it copies `exp_avg` and `exp_avg_sq` (and the fp32
# master weights) of each parameter by name, and nothing else (ds_to_universal.extract_zero_shards*).
_ADAM_TYPES = {"adam", "adamw"}


def check_universal_supported(config: Config, ds_config: dict[str, Any], checkpoint: Path, world: int) -> None:
    """Refuse, in one line, an elastic resume whose optimizer state the universal format cannot carry.

    DeepSpeed's `ds_to_universal` knows Adam's two moments only: Lion, Adafactor, Prodigy, the 8-bit
    optimizers and AMSGrad keep other state and fail deep inside the conversion with a KeyError.
    """
    t = config.train
    if t.optimizer == "deepspeed":
        section = ds_config.get("optimizer", {})
        name = str(section.get("type", "")).lower()
        amsgrad = bool(section.get("params", {}).get("amsgrad"))
        label = f"deepspeed.optimizer.type={section.get('type')}"
    else:
        name, amsgrad, label = t.optimizer, bool(t.optimizer_args.get("amsgrad")), f"train.optimizer={t.optimizer}"
    if name not in _ADAM_TYPES or amsgrad:
        raise ConfigError(
            f"{checkpoint.name} was written by {saved_world_size(checkpoint)} ranks under ZeRO-{zero_stage(ds_config)} "
            f"and this run has {world}: resuming needs DeepSpeed's universal checkpoint, which carries AdamW's "
            f"state only, not that of {label}{' with amsgrad' if amsgrad else ''}; resume with "
            f"{saved_world_size(checkpoint)} ranks")


def load_universal_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """`ds_config` with `checkpoint.load_universal` on: the engine reads a universal folder.

    It must be in the config given to `deepspeed.initialize` (the engine reads it from there).
    """
    out = copy.deepcopy(ds_config)
    out.setdefault("checkpoint", {})["load_universal"] = True
    return out


def prepare_universal(checkpoint: Path, rank: int) -> Path:
    """Convert `checkpoint` to `step-N-universal/` once (rank 0) and return that folder (every rank).

    Collective: every rank calls it; the others wait at a barrier while rank 0 converts. A folder that
    an earlier resume converted from this very checkpoint is reused.
    """
    target = universal_path(checkpoint)
    if rank == 0 and not _is_converted(target, checkpoint):
        convert_to_universal(checkpoint, target)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not _is_converted(target, checkpoint):  # e.g. a rank that does not share rank 0's filesystem
        raise FileNotFoundError(f"{target}: the universal checkpoint rank 0 wrote is not visible on this rank")
    return target


def convert_to_universal(checkpoint: Path, target: Path) -> None:
    """Run DeepSpeed's `ds_to_universal` on `checkpoint` into `target`, atomically (tmp folder, rename).

    In process and with one worker: a process pool forked from a trainer that already runs a process
    group and OpenMP threads is asking for a deadlock. The conversion reads one rank's files at a time
    and writes every parameter's fp32 weights and Adam moments once (about 12 bytes per trained parameter).
    """
    from deepspeed.checkpoint import ds_to_universal

    for litter in target.parent.glob(f".{target.name}.*.tmp"):  # left by a conversion that was killed
        shutil.rmtree(litter, ignore_errors=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    out = staging / target.name  # ds_to_universal also writes `latest_universal` next to its output
    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # Our models carry no UNIVERSAL_CHECKPOINT_INFO (no tensor parallelism): inject
                              # the empty default instead of refusing the ZeRO 1-2 checkpoint.
                              inject_missing_state=True)
    log.info("world size changed since %s: converting it to a universal checkpoint in %s", checkpoint.name, target)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):  # its progress prints; kept for the debug log
            ds_to_universal.main(args)
        fsync_tree(out)  # the marker must never reach the disk before the files it vouches for
        (out / UNIVERSAL_DONE).write_text(checkpoint.name)
        if target.exists():  # stale: converted from an earlier checkpoint of the same step
            shutil.rmtree(target)
        out.rename(target)
    finally:
        log.debug("ds_to_universal: %s", chatter.getvalue())
        shutil.rmtree(staging, ignore_errors=True)


def _is_converted(target: Path, checkpoint: Path) -> bool:
    # `save_checkpoint` deletes the sibling before it rewrites or prunes `step-N`, so a marker naming
    # the checkpoint means the folder was converted from the files that are there now.
    marker = target / UNIVERSAL_DONE
    return marker.is_file() and marker.read_text().strip() == checkpoint.name
