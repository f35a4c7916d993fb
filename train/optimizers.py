"""The optimizer and the learning-rate schedule of a run, for every choice of `train.optimizer`.

One table says what each choice is built from; our warmup-and-decay schedule (`objective.lr_lambda`) is
applied to all of them, including an optimizer DeepSpeed builds from a `deepspeed.optimizer` section.
ZeRO-Offload moves the optimizer step to the CPU, where DeepSpeed insists on its own CPU kernels for Adam
and Lion; the 8-bit optimizers keep quantised state on the GPU and cannot be offloaded.

Usual settings (docs/training.md): Prodigy with `train.lr: 1.0` (it estimates the step size itself;
`d_coef` in `train.optimizer_args` scales it) and `safeguard_warmup` on when warming up; Adafactor with a
fixed learning rate (`relative_step`, `scale_parameter` and `warmup_init` off) so the schedule applies;
Lion with a learning rate 3-10x smaller than AdamW's and a larger weight decay.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from latentforge.shared.config import Config, ConfigError


@dataclass(frozen=True)
class OptimizerChoice:
    """What `train.optimizer: <name>` builds."""

    library: str  # the package a user installs for it, named in errors
    offload: str  # "ds_adam" / "ds_lion": DeepSpeed's CPU kernel under ZeRO-Offload; "client": runs as is; "no"
    build: Callable[[list[torch.nn.Parameter], Config, float], torch.optim.Optimizer]


def _adamw(params: list[torch.nn.Parameter], config: Config, lr: float) -> torch.optim.Optimizer:
    t = config.train
    return torch.optim.AdamW(params, lr=lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay,
                             **t.optimizer_args)


def _bnb(name: str) -> Callable[[list[torch.nn.Parameter], Config, float], torch.optim.Optimizer]:
    def build(params: list[torch.nn.Parameter], config: Config, lr: float) -> torch.optim.Optimizer:
        # On CPU, bitsandbytes warns at import that an optional 4-bit matmul kernel is missing; the
        # optimizers do not use it.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import bitsandbytes as bnb

        t = config.train
        kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(t.adam_betas), "weight_decay": t.weight_decay}
        if "Adam" in name:
            kwargs["eps"] = t.adam_eps
        return getattr(bnb.optim, name)(params, **{**kwargs, **t.optimizer_args})

    return build


def _lion(params: list[torch.nn.Parameter], config: Config, lr: float) -> torch.optim.Optimizer:
    return _bnb("Lion")(params, config, lr)  # bitsandbytes' 32-bit Lion: one implementation for GPU and CPU


def _adafactor(params: list[torch.nn.Parameter], config: Config, lr: float) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    kwargs = {"lr": lr, "relative_step": False, "scale_parameter": False, "warmup_init": False,
              "weight_decay": config.train.weight_decay}
    return Adafactor(params, **{**kwargs, **config.train.optimizer_args})


def _prodigy(params: list[torch.nn.Parameter], config: Config, lr: float) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    t = config.train
    # Under ZeRO >= 1 with several ranks each rank steps only its partition; Prodigy's step-size estimate
    # must then be summed over ranks (its `fsdp_in_use`), or every rank would learn its own step size.
    sharded = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and \
        int(config.deepspeed.get("zero_optimization", {}).get("stage", 0)) >= 1
    if sharded and not torch.cuda.is_available():
        raise ConfigError("train.optimizer=prodigy under ZeRO >= 1 with several processes needs CUDA (prodigyopt sums "
                          "its step-size estimate over ranks in a CUDA tensor); on CPU use one process or ZeRO stage 0")
    kwargs = {"lr": lr, "betas": tuple(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay,
              "use_bias_correction": True, "safeguard_warmup": t.warmup_steps > 0, "fsdp_in_use": sharded}
    return Prodigy(params, **{**kwargs, **t.optimizer_args})


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "adamw": OptimizerChoice("torch", "ds_adam", _adamw),
    "adamw_8bit": OptimizerChoice("bitsandbytes", "no", _bnb("AdamW8bit")),
    "lion": OptimizerChoice("bitsandbytes", "ds_lion", _lion),
    "lion_8bit": OptimizerChoice("bitsandbytes", "no", _bnb("Lion8bit")),
    "adafactor": OptimizerChoice("transformers", "client", _adafactor),
    "prodigy": OptimizerChoice("prodigyopt", "client", _prodigy),
}


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether ZeRO-Offload puts the optimizer step (and with `offload_param`, the parameters) on the CPU."""
    zero = ds_config.get("zero_optimization", {})
    return any((zero.get(k) or {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer", "offload_param"))


def peak_lr(config: Config, ds_config: dict[str, Any]) -> float:
    """`train.lr`, times the global batch with `train.scale_lr`."""
    scale = ds_config["train_batch_size"] if config.train.scale_lr else 1
    return config.train.lr * scale


def fill_deepspeed_optimizer(config: Config, ds_config: dict[str, Any]) -> dict[str, Any]:
    """A `deepspeed.optimizer` section with the `train:` values it leaves out (lr, betas, eps, weight decay).

    A value the section sets that contradicts an explicitly set `train:` key is a config error, so no
    setting is silently ignored.
    """
    ds = copy.deepcopy(ds_config)
    params = ds["optimizer"].setdefault("params", {})
    t = config.train
    wanted = {"lr": peak_lr(config, ds), "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}
    source = {"lr": "lr", "betas": "adam_betas", "eps": "adam_eps", "weight_decay": "weight_decay"}
    for key, value in wanted.items():
        if key in params and source[key] in t.model_fields_set and params[key] != value:
            raise ConfigError(f"deepspeed.optimizer.params.{key}={params[key]} contradicts train.{source[key]}={value}; "
                              "set it in one place")
        params.setdefault(key, value)
    return ds


def check_optimizer(config: Config, ds_config: dict[str, Any]) -> None:
    """Refuse combinations that cannot run, in one line, before any model is loaded."""
    name = config.train.optimizer
    if "scheduler" in ds_config:
        t = config.train
        if t.warmup_steps or t.lr_scheduler != "constant":
            raise ConfigError(f"train.warmup_steps={t.warmup_steps}/train.lr_scheduler={t.lr_scheduler} and a "
                              "deepspeed.scheduler section both set the schedule; keep one (train.warmup_steps=0 "
                              "train.lr_scheduler=constant leaves it to DeepSpeed)")
    if "optimizer" in ds_config:
        if "optimizer" in config.train.model_fields_set and name != "deepspeed":
            raise ConfigError(f"train.optimizer={name} and a deepspeed.optimizer section both choose the optimizer; "
                              "keep one (train.optimizer: deepspeed uses the section)")
        fill_deepspeed_optimizer(config, ds_config)  # contradictions with train.lr/betas/... fail here
        return
    if name == "deepspeed":
        raise ConfigError("train.optimizer=deepspeed needs a deepspeed.optimizer section (e.g. {type: AdamW, params: {}})")
    choice = OPTIMIZERS[name]
    if offloads_optimizer(ds_config) and choice.offload == "no":
        raise ConfigError(f"train.optimizer={name} keeps 8-bit state on the GPU and cannot run under ZeRO-Offload "
                          "(deepspeed.zero_optimization.offload_*); drop the offload or use adamw or lion")
    if name in ("adamw_8bit", "lion_8bit") and not torch.cuda.is_available():
        _require_bnb_cpu(name)


def _require_bnb_cpu(name: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.optimizer={name} needs bitsandbytes (pip install bitsandbytes)") from None


def build_optimizer(params: Iterable[torch.nn.Parameter], config: Config, ds_config: dict[str, Any],
                    ) -> tuple[torch.optim.Optimizer | None, dict[str, Any]]:
    """The client optimizer for `deepspeed.initialize` (None when DeepSpeed builds it) and the DeepSpeed config.

    Under ZeRO-Offload, AdamW and Lion become DeepSpeed's CPU kernels (DeepSpeed refuses a torch
    optimizer there); optimizers with no CPU kernel run as they are, which DeepSpeed allows once told.
    """
    check_optimizer(config, ds_config)
    if "optimizer" in ds_config:
        return None, fill_deepspeed_optimizer(config, ds_config)
    params = list(params)
    lr = peak_lr(config, ds_config)
    choice = OPTIMIZERS[config.train.optimizer]
    _check_bnb_partition(config, ds_config, params)
    ds = copy.deepcopy(ds_config)
    if offloads_optimizer(ds) and choice.offload in ("ds_adam", "ds_lion"):
        return _deepspeed_cpu_optimizer(choice.offload, params, config, lr), ds
    if offloads_optimizer(ds):
        ds["zero_force_ds_cpu_optimizer"] = False
    if config.train.optimizer != "adamw":
        # ZeRO wraps any torch optimizer that keeps its state per parameter; DeepSpeed only asks to be told.
        ds["zero_allow_untested_optimizer"] = True
    return choice.build(params, config, lr), ds


# bitsandbytes' kernels take the element count of a tensor as a 32-bit int.
_BNB_MAX_ELEMENTS = 2**31 - 1


def _check_bnb_partition(config: Config, ds_config: dict[str, Any], params: list[torch.nn.Parameter]) -> None:
    """ZeRO >= 1 hands the optimizer one flat tensor per rank; past 2^31 elements bitsandbytes' kernels
    would wrap the count silently (the SDXL UNet alone is 2.57 B parameters), so refuse instead."""
    if OPTIMIZERS[config.train.optimizer].library != "bitsandbytes":
        return
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    world = ds_config["train_batch_size"] // (ds_config["train_micro_batch_size_per_gpu"]
                                              * ds_config["gradient_accumulation_steps"])
    per_rank = sum(p.numel() for p in params) // (world if stage >= 1 else 1)
    if stage >= 1 and per_rank > _BNB_MAX_ELEMENTS:
        raise ConfigError(f"train.optimizer={config.train.optimizer} under ZeRO-{stage} on {world} rank(s) steps "
                          f"{per_rank:,} elements per rank in one tensor, past bitsandbytes' 32-bit limit; use ZeRO 0, "
                          f"more ranks (>= {-(-sum(p.numel() for p in params) // _BNB_MAX_ELEMENTS)}), or adamw")


def _deepspeed_cpu_optimizer(kind: str, params: list[torch.nn.Parameter], config: Config,
                             lr: float) -> torch.optim.Optimizer:
    t = config.train
    if kind == "ds_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay,
                                adamw_mode=True)
    from deepspeed.ops.lion import DeepSpeedCPULion

    return DeepSpeedCPULion(params, lr=lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)


def schedule(lr_lambda: Callable[[int], float]) -> Callable[[torch.optim.Optimizer], Any]:
    """Our warmup-and-decay schedule as the callable `deepspeed.initialize` applies to whichever optimizer
    it ends up with (its own from a `deepspeed.optimizer` section, or ours)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
