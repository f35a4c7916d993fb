"""The interface every family's denoiser adapter fills in: load, expected cache, condition, forward."""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from ..lora import add_lora


class DenoiserAdapter:
    """Interface of a family: `load`, `expected_cache`, `condition`, `forward`."""

    family: str = ""
    model_subfolder: str = "unet"  # where the trained model lives in a diffusers pipeline folder
    model_class: str = "UNet2DConditionModel"  # diffusers class of the trained model
    pipeline_class: str = ""  # diffusers pipeline class an export loads with
    objective: str = "diffusion"  # "diffusion" (DDPM noise schedule) or "flow" (rectified flow)
    # Pipeline constructor arguments that stand in for the text side (validation runs without it).
    no_text: dict[str, Any] = {"tokenizer": None, "text_encoder": None}

    def validation_pipeline(self, model: torch.nn.Module, vae: Any, scheduler: Any) -> Any:
        """The family pipeline around the model being trained, without text encoders."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class)(vae=vae, scheduler=scheduler, **{self.model_subfolder: model},
                                                       **self.no_text)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validation_renderer(self, model: torch.nn.Module, setup: Any) -> Any:
        """A function (size, prompt fields, empty fields, generator, decode) -> HxWx3 uint8 image (None without
        `decode`), built once per validation grid: the family pipeline and its VAE decoder (`render.py`)."""
        from .render import vae_renderer

        return vae_renderer(self, model, setup)

    def prompt_kwargs(self, embeds: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Pipeline call arguments from cached text fields: the prompt and the empty prompt as negative."""
        names = {"prompt_embeds": "prompt_embeds", "pooled_prompt_embeds": "pooled_prompt_embeds",
                 "prompt_mask": "prompt_attention_mask"}
        kwargs: dict[str, Any] = {}
        for field, arg in names.items():
            if field in embeds:
                kwargs[arg] = embeds[field]
                kwargs[f"negative_{arg}"] = empty[field]
        return kwargs

    def _load(self, config: Config) -> torch.nn.Module:
        import diffusers

        cls = getattr(diffusers, self.model_class)
        model = cls.from_pretrained(config.model.pretrained, subfolder=self.model_subfolder, torch_dtype=torch.float32,
                                    **config.model.pins())
        if config.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if config.train.lora.enabled:
            add_lora(model, config)
        return model

    def load(self, config: Config) -> torch.nn.Module:
        raise NotImplementedError

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        """Arguments for `CacheReader.check_compatible`, read from the model's own config."""
        raise NotImplementedError

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Text and extra conditioning for a batch, with train-time caption/micro-conditioning dropout."""
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError
