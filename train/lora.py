"""LoRA on the denoiser through diffusers' peft integration (the same config rebuilds it at export)."""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config


def lora_config(config: Config) -> Any:
    """The peft LoraConfig of a run (also rebuilt at export, from the run's config snapshot)."""
    from peft import LoraConfig

    lora = config.train.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                      lora_dropout=lora.dropout, init_lora_weights="gaussian")


def add_lora(model: torch.nn.Module, config: Config) -> None:
    """Freeze the denoiser and inject trainable LoRA layers (diffusers' peft integration; peft's own
    `inject_adapter_in_model` for a model without it, Stable Cascade's StableCascadeUNet)."""
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):
        model.add_adapter(lora_config(config))
    else:
        from peft import inject_adapter_in_model

        cfg = lora_config(config)
        inject_adapter_in_model(cfg, model)
        model.peft_config = {"default": cfg}  # what export reads the rank and alpha from, as with add_adapter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"train.lora.target_modules={config.train.lora.target_modules} matched no module of the model")


def merge_lora(model: torch.nn.Module) -> None:
    """Fold the LoRA update into the base weights and drop the adapters (diffusers' `fuse_lora` + `unload_lora`
    where the model has them, else peft's layers merged and replaced by their base layers one by one)."""
    if hasattr(model, "fuse_lora"):
        model.fuse_lora()
        model.unload_lora()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config  # set by `add_lora`; the merged model holds no adapter
