"""Checkpoints: DeepSpeed engine state plus everything needed to resume exactly, crash-safe.

Layout of `OUTPUT/checkpoints/`::

    step-00000500/            DeepSpeed's files (module, optimizer partitions, lr scheduler)
        rng-rank<r>.pt        each rank's RNG states (python, numpy, torch, cuda, the trainer's generators)
        trainer_state.json    step, sampler state, config snapshot, cache fingerprint
        ema.safetensors       fp32 EMA weights, whole tensors at every ZeRO stage (when enabled)
        COMPLETE              written last, after every rank finished: only such folders are resumable
    step-00000500-universal/  the same converted for another world size (ZeRO >= 1; `universal.py`)
    latest                    name of the newest COMPLETE folder (a hint; the scan decides)

What a checkpoint holds is one `TrainState`: the run's stateful parts (engine, sampler position, EMA,
generators, step), after torchtitan's checkpoint of `Stateful` objects. `save_checkpoint` writes it and
`load_checkpoint` restores a checkpoint into it in place.

A crash at any point leaves either an older COMPLETE checkpoint or a folder without the marker, which
`find_checkpoint("latest")` ignores. Secrets never enter a checkpoint: the config snapshot holds only
config values, and credentials are never config values (the config rejects them).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from latentforge.shared.faults import fault_point

from .sampler import GlobalBucketSchedule, SamplerState

COMPLETE = "COMPLETE"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
# A checkpoint converted for another world size (`universal.py`) lives next to it, as `step-N` + this suffix,
# and counts only with this marker in it (naming the checkpoint it came from).
UNIVERSAL_SUFFIX = "-universal"
UNIVERSAL_DONE = "UNIVERSAL_COMPLETE"
_TAG_RE = re.compile(r"^step-(\d{8})$")


class Stateful(Protocol):
    """An object that saves and restores itself (torch.distributed.checkpoint's `Stateful`), e.g. `Ema`."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The stateful parts of a run: what `save_checkpoint` writes and `load_checkpoint` restores in place.

    The DeepSpeed engine stands for model, optimizer and lr scheduler (DeepSpeed writes their files itself,
    partitioned under ZeRO). `rank` and `world` say whose files these are: each rank saves its own RNG
    states, and a resume at another world size keeps the (global) sample order but not the RNG streams.
    """

    engine: Any
    schedule: GlobalBucketSchedule  # checks that a restored sampler position fits this run
    sampler: SamplerState  # position in the global sample order
    rank: int
    world: int
    step: int = 0  # optimizer steps done
    ema: Stateful | None = None  # the fp32 EMA: on the main rank (ZeRO 0-2), or each rank's slice (ZeRO-3)
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # saved per rank with the global RNGs
    trainable_only: bool = False  # LoRA: the engine saves and loads only the trainable parameters
    # Written for readers of the checkpoint (export reads the config), never restored from it.
    snapshot: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """The JSON of trainer_state.json: step, sampler position, world size, then the snapshot."""
        return {"step": self.step, "sampler": self.sampler.to_dict(), "world_size": self.world, **self.snapshot}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore step and sampler position; a position from another global batch or seed is an error."""
        self.sampler = self.schedule.load_state(state["sampler"])  # checked before anything changes
        self.step = int(state["step"])


def tag_for(step: int) -> str:
    """Folder name of the checkpoint after optimizer step `step`."""
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """COMPLETE checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_TAG_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """Resolve `train.resume`: None, "latest" (newest COMPLETE, or None when there is none) or a folder."""
    if not resume:
        return None
    root = Path(output_dir) / "checkpoints"
    if resume == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete latentforge checkpoint (no {COMPLETE} marker)")
    return path


def universal_path(checkpoint: Path) -> Path:
    """The sibling folder that holds `checkpoint` converted to DeepSpeed's universal format."""
    return checkpoint.with_name(checkpoint.name + UNIVERSAL_SUFFIX)


def remove_universal(checkpoint: Path) -> None:
    """Delete `checkpoint`'s universal sibling: before the checkpoint itself is deleted or rewritten, so a
    converted folder never outlives (or predates) the files it was converted from."""
    target = universal_path(checkpoint)
    if target.exists():
        (target / UNIVERSAL_DONE).unlink(missing_ok=True)  # marker first, as for checkpoints
        shutil.rmtree(target, ignore_errors=True)


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rotating(checkpoints: list[Path], backup_every: int) -> list[Path]:
    """The checkpoints the keep-last rotation may prune: all but the backups (step a multiple of `backup_every`)."""
    if not backup_every:
        return checkpoints
    return [p for p in checkpoints if int(_TAG_RE.match(p.name).group(1)) % backup_every]  # type: ignore[union-attr]


def save_checkpoint(state: TrainState, output_dir: str | Path, keep_last: int, backup_every: int = 0) -> Path:
    """Write `state` as OUTPUT/checkpoints/step-N (N = `state.step`); keep the newest `keep_last`, and every
    backup (N a multiple of `backup_every`, as Stable Cascade's `backup_every`) beside them.

    Collective: every rank calls it. Rank 0 marks it COMPLETE last and prunes old checkpoints.
    """
    root = Path(output_dir) / "checkpoints"
    tag = tag_for(state.step)
    path = root / tag
    rank = state.rank
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_universal(path)  # converted from the files about to be replaced
        if path.exists():  # a half-written folder from a crash at this very step
            (path / COMPLETE).unlink(missing_ok=True)  # marker first, as when pruning
            shutil.rmtree(path)
    _barrier()
    # LoRA runs keep only the adapters (and their optimizer state): the frozen base is the base model's.
    state.engine.save_checkpoint(str(root), tag=tag, client_state={"step": state.step}, save_latest=False,
                                 exclude_frozen_parameters=state.trainable_only)
    fault_point("checkpoint:deepspeed_written")
    torch.save(_rng_state(state.generators), path / f"rng-rank{rank}.pt")
    # Every rank that holds an EMA asks for its state: under ZeRO-3 that gathers the slices onto rank 0.
    ema = state.ema.state_dict() if state.ema is not None else None
    if rank == 0:
        (path / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=2, default=str))
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.items()}, str(path / EMA_FILE))
    _barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        fsync_tree(path)  # COMPLETE must never reach the disk before the files it vouches for
        fault_point("checkpoint:state_written")
        write_atomic(path / COMPLETE, tag)
        fault_point("checkpoint:complete_written")
        write_atomic(root / "latest", tag)
        for old in rotating(complete_checkpoints(root), backup_every)[:-keep_last]:
            # Marker first: a crash halfway through the delete leaves a folder `latest` ignores, never
            # a COMPLETE folder with files missing.
            (old / COMPLETE).unlink(missing_ok=True)
            _fsync_dir(old)
            fault_point("checkpoint:pruning")
            remove_universal(old)
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(state: TrainState, path: Path, engine_path: Path | None = None) -> None:
    """Restore the checkpoint at `path` into `state`: engine, RNGs, step, sampler position and EMA.

    `engine_path` is where the engine's files are read from when not from `path`: its universal
    conversion, for a resume at another world size under ZeRO >= 1 (the engine must have been built
    with `checkpoint.load_universal`). A different world size keeps the data order (the sampler state is
    global) but gets fresh per-rank RNG streams. A checkpoint without an EMA leaves `state.ema` as built.
    """
    engine_path = engine_path or path
    load_path, _ = state.engine.load_checkpoint(str(engine_path.parent), tag=engine_path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True,
                                                load_module_strict=not state.trainable_only)
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed could not load this checkpoint")
    saved = json.loads((path / STATE_FILE).read_text())
    rng_file = path / f"rng-rank{state.rank}.pt"
    if saved.get("world_size") == state.world and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False), state.generators)
    state.load_state_dict(saved)
    if state.ema is not None and (path / EMA_FILE).exists():
        state.ema.load_state_dict(SafetensorsMapping(path / EMA_FILE))


class SafetensorsMapping(Mapping[str, torch.Tensor]):
    """A .safetensors file as a read-only mapping that reads each tensor when asked (CPU).

    A ZeRO-3 EMA takes one slice of each tensor on every rank: reading them one at a time keeps every
    rank's peak at one whole tensor instead of the whole model.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), "pt", device="cpu")
        self._keys = dict.fromkeys(self._file.keys())  # ordered, with O(1) membership

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Any:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, rename it over `path` and fsync the folder:
    a reader (or a resume after a crash) sees the old content or the new, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fault_point(f"write:{path.name}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder of a checkpoint (DeepSpeed and torch.save do not), so a power loss
    after COMPLETE cannot leave the marker on disk without the data."""
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))
