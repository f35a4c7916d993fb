"""Per-family denoiser adapters: load the trainable model, say what cache it needs, run its forward.

The training loop only talks to `DenoiserAdapter`; adding a family adds one class here (and one in
`preprocess/encoders.py`), never a branch in the loop. Nothing here imports a text encoder.
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from .objective import drop_captions, sdxl_add_time_ids


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

        kwargs: dict[str, Any] = {}
        if config.model.revision:
            kwargs["revision"] = config.model.revision
        if config.model.variant:
            kwargs["variant"] = config.model.variant
        cls = getattr(diffusers, self.model_class)
        model = cls.from_pretrained(config.model.pretrained, subfolder=self.model_subfolder, torch_dtype=torch.float32, **kwargs)
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


def lora_config(config: Config) -> Any:
    """The peft LoraConfig of a run (also rebuilt at export, from the run's config snapshot)."""
    from peft import LoraConfig

    lora = config.train.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                      lora_dropout=lora.dropout, init_lora_weights="gaussian")


def add_lora(model: torch.nn.Module, config: Config) -> None:
    """Freeze the denoiser and inject trainable LoRA layers (diffusers' peft integration)."""
    model.requires_grad_(False)
    model.add_adapter(lora_config(config))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"train.lora.target_modules={config.train.lora.target_modules} matched no module of the model")


class SdxlAdapter(DenoiserAdapter):
    """SDXL: UNet with `text_time` conditioning (pooled text embedding + six size/crop numbers)."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    no_text = {"tokenizer": None, "tokenizer_2": None, "text_encoder": None, "text_encoder_2": None,
               "add_watermarker": False}

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config
        pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        return {"family": "sdxl", "latent_channels": int(cfg.in_channels),
                "field_widths": {"prompt_embeds": int(cfg.cross_attention_dim), "pooled_prompt_embeds": pooled}}

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = drop_captions(batch["prompt_embeds"], batch["pooled_prompt_embeds"], empty["prompt_embeds"],
                                          empty["pooled_prompt_embeds"], config.train.caption_dropout, generator)
        time_ids = sdxl_add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"],
                                     config.train.micro_conditioning_dropout, generator)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = noisy.dtype
        return model(
            noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
        ).sample


class SdAdapter(DenoiserAdapter):
    """SD 1.x / 2.x: UNet cross-attending to one CLIP encoder's states; no pooled, no size conditioning."""

    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    no_text = {"tokenizer": None, "text_encoder": None, "safety_checker": None, "feature_extractor": None,
               "requires_safety_checker": False}

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config
        return {"family": self.family, "latent_channels": int(cfg.in_channels),
                "field_widths": {"prompt_embeds": int(cfg.cross_attention_dim)}}

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        embeds, _, _ = drop_captions(batch["prompt_embeds"], None, empty["prompt_embeds"], None,
                                     config.train.caption_dropout, generator)
        return {"encoder_hidden_states": embeds}

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype)).sample


class Sd1Adapter(SdAdapter):
    family = "sd1"


class Sd2Adapter(SdAdapter):
    family = "sd2"


class MaskedTextAdapter(DenoiserAdapter):
    """DiT families conditioned on a long, masked text embedding (T5 for PixArt, Gemma for SANA)."""

    model_subfolder = "transformer"

    def prompt_kwargs(self, embeds: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]) -> dict[str, Any]:
        # These pipelines default negative_prompt to "" and refuse it beside negative embeddings.
        return {**super().prompt_kwargs(embeds, empty), "negative_prompt": None}

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config
        return {"family": self.family, "latent_channels": int(cfg.in_channels),
                "field_widths": {"prompt_embeds": int(cfg.caption_channels)}}

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        embeds, _, dropped = drop_captions(batch["prompt_embeds"], None, empty["prompt_embeds"], None,
                                           config.train.caption_dropout, generator)
        # A dropped caption takes the empty prompt's mask too, or attention would see its zero padding.
        mask = torch.where(dropped.view(-1, 1), empty["prompt_mask"].to(batch["prompt_mask"].device).expand_as(batch["prompt_mask"]),
                           batch["prompt_mask"])
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


class PixArtSigmaAdapter(MaskedTextAdapter):
    """PixArt-Sigma: DiT with learned variance (the epsilon half is trained), DDPM objective."""

    family = "pixart_sigma"
    model_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(noisy, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
                    encoder_attention_mask=cond["encoder_attention_mask"], timestep=timesteps,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        # Learned sigma: the second half of the channels is the variance, trained by PixArt's VLB term;
        # like diffusers' PixArt trainers we train the epsilon half with MSE.
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * noisy.shape[1] else out


class SanaAdapter(MaskedTextAdapter):
    """SANA: linear-attention DiT on DC-AE latents, rectified-flow objective."""

    family = "sana"
    model_class = "SanaTransformer2DModel"
    pipeline_class = "SanaPipeline"
    objective = "flow"

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(noisy, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
                     encoder_attention_mask=cond["encoder_attention_mask"], timestep=timesteps).sample


ADAPTERS: dict[str, type[DenoiserAdapter]] = {"sdxl": SdxlAdapter, "sd1": Sd1Adapter, "sd2": Sd2Adapter,
                                              "pixart_sigma": PixArtSigmaAdapter, "sana": SanaAdapter}


def adapter_for(family: str) -> DenoiserAdapter:
    try:
        return ADAPTERS[family]()
    except KeyError:
        raise ValueError(f"model.family {family!r}: the trainer supports {', '.join(ADAPTERS)} so far") from None
