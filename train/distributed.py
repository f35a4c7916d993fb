"""Process group and DeepSpeed: the one place that reads launcher variables and calls `deepspeed.initialize`.

`latentforge train` alone runs one process (we fill in the launcher variables DeepSpeed expects);
`deepspeed --num_gpus N -m latentforge.train ...` runs N. CPU runs use gloo (tests, the demo), GPU runs
NCCL. The values DeepSpeed needs that the `train:` section already decides (micro-batch, accumulation,
clipping) are derived here, in one place, and a `deepspeed:` section that contradicts them is an error.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch

from latentforge.shared.config import Config, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> Dist:
    """Join (or, alone, create) the process group; pick this rank's device from LOCAL_RANK."""
    if "RANK" not in os.environ:  # a plain `latentforge train`: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def deepspeed_config(config: Config, world: int) -> dict[str, Any]:
    """The `deepspeed:` section plus the values derived from `train:`; contradictions are config errors."""
    ds = copy.deepcopy(config.deepspeed)
    t = config.train
    derived = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world,
        "gradient_clipping": t.max_grad_norm,
    }
    source = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
              "gradient_accumulation_steps": "train.gradient_accumulation_steps",
              "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x world size",
              "gradient_clipping": "train.max_grad_norm"}
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"deepspeed.{key}={ds[key]} contradicts {source[key]} (= {value}); "
                              f"set it through {source[key].split(' ')[0]} only")
        ds[key] = value
    ds.setdefault("steps_per_print", 1 << 30)  # we log ourselves
    ds.setdefault("zero_optimization", {"stage": 0})
    stage = int(ds["zero_optimization"].get("stage", 0))
    if not 0 <= stage <= 3:
        raise ConfigError(f"deepspeed.zero_optimization.stage={stage}: expected 0, 1, 2 or 3")
    offload_param = (ds["zero_optimization"].get("offload_param") or {}).get("device")
    if stage == 3 and t.ema.enabled and offload_param == "nvme":
        # The ZeRO-3 EMA averages each rank's slice of the weights in place (`ema.py`); a slice swapped
        # out to NVMe is not in memory to average.
        raise ConfigError("train.ema.enabled with deepspeed.zero_optimization.offload_param.device=nvme: the EMA "
                          "needs the weight slices in memory; offload parameters to cpu, or turn the EMA off")
    from .optimizers import check_optimizer

    check_optimizer(config, ds)  # before any model loads: a combination that cannot run fails in one line
    if ds.get("bf16", {}).get("enabled") and stage == 0:
        log.warning("bf16 with ZeRO stage 0 accumulates gradients in bf16 (worse loss); ZeRO >= 1 keeps fp32 masters")
    return ds


def build_engine(model: torch.nn.Module, config: Config, ds_config: dict[str, Any],
                 lr_lambda: Any) -> tuple[Any, Any, Any]:
    """The single `deepspeed.initialize` call: model + the chosen optimizer + our warmup/decay schedule.

    A `deepspeed.scheduler` section replaces our schedule; otherwise ours is applied to whichever optimizer
    DeepSpeed ends up stepping (its own from a `deepspeed.optimizer` section, or ours).
    """
    import deepspeed

    from .optimizers import build_optimizer, schedule

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, ds_config = build_optimizer(params, config, ds_config)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else schedule(lr_lambda),
    )
    return engine, optimizer, lr_scheduler


# A collective whose peer process died: gloo raises a RuntimeError naming its transport source file,
# NCCL and the c10d store raise torch.distributed.DistError subclasses.
_GLOO_SOURCE = re.compile(r"^\[[^\]]*gloo[^\]]*\]\s*")
_BOILERPLATE = " This is typically caused by"


def lost_peer(exc: BaseException) -> str | None:
    """The reason in one line when `exc` is a collective or store call that failed because another rank
    is gone (its process died, its node went down); None for any other error."""
    import torch.distributed as dist

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, dist.DistError):
        pass
    elif isinstance(exc, RuntimeError) and _GLOO_SOURCE.match(first):
        first = _GLOO_SOURCE.sub("", first)
    else:
        return None
    return first.split(_BOILERPLATE)[0].strip()
