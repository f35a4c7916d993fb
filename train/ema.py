"""Exponential moving average of the trained weights, in fp32: whole on rank 0, or sharded under ZeRO-3.

Under ZeRO 0-2 every rank holds the full (bf16 or fp32) module weights after a step, so rank 0 alone
keeps the EMA (`Ema`); the other ranks spend no memory on it. ZeRO-3 partitions the weights: each rank
holds one flat slice (`param.ds_tensor`) of every parameter, and `ShardedEma` keeps the EMA of exactly
that slice on the rank that owns it. We chose that over gathering the full weights onto rank 0 at every
update (`deepspeed.zero.GatheredParameters`): the sharded update needs no communication at all, costs
4 bytes per parameter / world size per rank instead of 4 bytes per parameter on rank 0 (the memory ZeRO-3
is there to save), and computes the very same numbers, since a slice of the weights is the weights.
Only a checkpoint gathers it (one parameter at a time, onto rank 0), so `ema.safetensors` always holds
whole, unpartitioned tensors: export reads it as before, and a resume at any world size re-slices it.

The average follows the module weights (bf16 under bf16 training), not DeepSpeed's fp32 master copy:
the EMA itself stays fp32, so rounding noise of single steps averages out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


class Ema:
    """fp32 shadow of a module's trainable parameters: decay, start step and update interval."""

    def __init__(self, module: torch.nn.Module, decay: float, start_step: int = 0, update_every: int = 1) -> None:
        self.decay, self.start_step, self.update_every = decay, start_step, update_every
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in module.named_parameters()
                       if p.requires_grad}

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        """The part of `param` this process averages: all of it here."""
        return param

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> bool:
        """Call after optimizer step `step` (1-based); returns whether the EMA changed.

        Stable Cascade's semantics (`train/base.py`: every `ema_iters`, `update_weights_ema(beta=ema_beta if
        i > ema_start_iters else 0)`): every `update_every` steps the shadow moves towards the weights with
        `decay` once past `start_step`, and until then (start_step included) it is a copy of them.
        """
        if step % self.update_every:
            return False
        beta = self.decay if step > self.start_step else 0.0
        for n, p in module.named_parameters():
            if n in self.shadow:
                if beta == 0.0:
                    self.shadow[n].copy_(self._local(p).detach().float())
                else:
                    self.shadow[n].lerp_(self._local(p).detach().float(), 1.0 - beta)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 shadow weights by parameter name (what a checkpoint's ema.safetensors holds)."""
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a saved shadow in place; one that lacks a trained parameter is refused."""
        self._check(state)
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    def _check(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state.keys())
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")


class ShardedEma(Ema):
    """ZeRO-3: the fp32 EMA of this rank's slice of every trainable parameter (see the module docstring).

    Built on every rank after `deepspeed.initialize` has partitioned the module. `state_dict` and
    `load_state_dict` take and give whole tensors, so checkpoints do not depend on the world size;
    `state_dict` is collective (every rank calls it) and returns the tensors on rank 0 only.
    """

    def __init__(self, module: torch.nn.Module, decay: float, start_step: int = 0, update_every: int = 1, *,
                 rank: int | None = None, world: int | None = None) -> None:
        # The data-parallel group ZeRO-3 partitions over: the whole world here (no model parallelism).
        self.rank = rank if rank is not None else dist.get_rank() if dist.is_initialized() else 0
        self.world = world if world is not None else dist.get_world_size() if dist.is_initialized() else 1
        # Shape and size of each whole parameter: its module tensor is empty while partitioned.
        self.whole = {n: (tuple(p.ds_shape), int(p.ds_numel)) for n, p in module.named_parameters() if p.requires_grad}
        super().__init__(module, decay, start_step, update_every)

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor  # type: ignore[attr-defined]  # ZeRO-3's flat slice of `param`, padded at the end

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors on rank 0 (empty elsewhere), gathered one parameter at a time.

        One parameter at a time keeps the peak at one whole tensor per rank, on the device; each whole
        tensor moves to the CPU as soon as it is assembled.
        """
        out: dict[str, torch.Tensor] = {}
        # NCCL moves only GPU tensors: a slice offloaded to the CPU (offload_param) travels through the GPU.
        via = torch.device("cuda", torch.cuda.current_device()) \
            if self.world > 1 and dist.get_backend() == "nccl" else None
        for name, shard in self.shadow.items():  # the same order on every rank: named_parameters()'
            shape, numel = self.whole[name]
            mine = shard if via is None else shard.to(via)
            parts = [mine]
            if self.world > 1:
                parts = [torch.empty_like(mine) for _ in range(self.world)] if self.rank == 0 else []
                dist.gather(mine, parts if self.rank == 0 else None, dst=0)
            if self.rank == 0:
                out[name] = torch.cat(parts)[:numel].view(shape).cpu()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take this rank's slice of each whole tensor in `state` (saved at any world size)."""
        self._check(state)
        for name, shard in self.shadow.items():
            _, numel = self.whole[name]
            size = shard.numel()  # ceil(numel / world): ZeRO-3 pads every parameter to world x slice size
            flat = state[name].reshape(-1).to(shard.device, torch.float32)
            start, stop = min(self.rank * size, numel), min((self.rank + 1) * size, numel)
            shard.zero_()  # the padding past the end of the parameter stays zero
            shard[:stop - start].copy_(flat[start:stop])


def build_ema(module: torch.nn.Module, settings: Any, *, sharded: bool, is_main: bool) -> Ema | None:
    """The run's EMA (`train.ema`): sharded on every rank under ZeRO-3, else on the main rank only."""
    if not settings.enabled:
        return None
    if sharded:
        return ShardedEma(module, settings.decay, settings.start_step, settings.update_every)
    return Ema(module, settings.decay, settings.start_step, settings.update_every) if is_main else None
