"""The frozen encoders of the cache job: the VAE and each family's text encoders.

Models load once per process, in eval mode, without gradients, straight onto the process's own device
(`model_load`: no host copy of the weights). A family's text side lives in its own module under `families/`;
the VAE side is shared and takes its class from the facts.
Encoding a batch that runs out of memory is retried in halves before a sample is given up on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from latentforge.shared.cache_fingerprint import files_model_part, hub_model_part, model_identity_doc
from latentforge.shared.config import Config
from latentforge.shared.families import family_facts
from latentforge.shared.file_hash import sha256_file

from .model_load import load_pretrained
from .model_source import DEFAULT_REVISION, ModelSource, ModelSources
from .model_source import is_local_folder as is_local

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_halving_on_oom(fn: Callable[[Any], dict[str, torch.Tensor]], items: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Run `fn` on the whole batch; on OOM, split it in halves (down to single items) and concatenate.

    A single item that still runs out of memory raises: the caller skips that sample with a reason.
    """
    try:
        return fn(items)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if not _is_oom(exc) or len(items) <= 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mid = len(items) // 2
        log.warning("out of memory on a batch of %d, retrying as %d + %d", len(items), mid, len(items) - mid)
        a, b = run_halving_on_oom(fn, items[:mid]), run_halving_on_oom(fn, items[mid:])
        return {k: torch.cat([a[k], b[k]]) for k in a}


def load_kwargs(config: Config) -> dict[str, Any]:
    """The pipeline's `revision` and `variant` to pass to `from_pretrained` (none when unset)."""
    kwargs: dict[str, Any] = {}
    if config.model.revision:
        kwargs["revision"] = config.model.revision
    if config.model.variant:
        kwargs["variant"] = config.model.variant
    return kwargs


class VaeEncoder:
    """Encodes pixel batches in [-1, 1] to latents in the autoencoder's native (unscaled) space.

    KL VAEs (SD, SDXL, PixArt) give the posterior mean and std; SANA's DC-AE is deterministic and gives
    one latent (then `latent_std` does not exist and `cache.latent_mode: dist` is refused).
    """

    def __init__(self, config: Config, device: torch.device, sources: ModelSources | None = None) -> None:
        """Load the VAE of `config` on `device`; `sources` (the job's resolved models) pins a separate hub
        VAE to its resolved commit (the pipeline's own commit arrives as `config.model.revision`)."""
        import diffusers

        dtype = DTYPES[config.cache.vae_dtype]
        source = config.model.vae or config.model.pretrained
        kwargs = load_kwargs(config)
        if config.model.vae:
            # model.revision names a revision of the pipeline repo; a separate VAE is another repo.
            kwargs.pop("revision", None)
            if sources is not None and sources.vae is not None and sources.vae.load_revision:
                kwargs["revision"] = sources.vae.load_revision
            if not is_local(config.model.vae):
                kwargs.pop("variant", None)  # a standalone VAE repo rarely has the pipeline's variant files
        subfolder = None if config.model.vae else "vae"
        cls = getattr(diffusers, family_facts(config.model.family).vae_class)
        self.model = load_pretrained(cls, source, device, dtype, subfolder=subfolder, **kwargs)
        self.device, self.dtype = device, dtype
        cfg = self.model.config
        self.has_posterior = cls is not diffusers.AutoencoderDC
        if not self.has_posterior and config.cache.latent_mode == "dist":
            raise ValueError("cache.latent_mode=dist: this family's autoencoder (DC-AE) has no posterior; use mean")
        self.latent_channels = int(cfg.latent_channels)
        blocks = cfg.block_out_channels if self.has_posterior else cfg.encoder_block_out_channels
        self.downsample = 2 ** (len(blocks) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = None if getattr(cfg, "shift_factor", None) is None else float(cfg.shift_factor)

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.encode(pixels.to(self.device, self.dtype))
        if not self.has_posterior:
            return {"latent_mean": out.latent.float().cpu()}
        dist = out.latent_dist
        return {"latent_mean": dist.mean.float().cpu(), "latent_std": dist.std.float().cpu()}

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> {"latent_mean"[, "latent_std"]}, each (B, C, H/f, W/f) float32 on CPU."""
        return run_halving_on_oom(lambda chunk: self._encode(torch.stack(list(chunk))), list(pixels))


class EffnetEncoder:
    """Stable Cascade's Stage C encoder (`effnet.py`) behind `VaeEncoder`'s interface: deterministic latents.

    The weights come from `model.vae` (a folder or hub repo holding `effnet_encoder.safetensors`), else from
    the pipeline folder's `effnet/` subfolder (the devkit's tiny model keeps it there). The latents are
    cached as the encoder gives them (scaling 1.0: its BatchNorm already normalises them).
    """

    has_posterior = False
    scaling_factor, shift_factor = 1.0, None

    def __init__(self, config: Config, device: torch.device, sources: ModelSources | None = None) -> None:
        from .effnet import load_effnet, to_effnet_input

        if config.cache.latent_mode == "dist":
            raise ValueError("cache.latent_mode=dist: Stable Cascade's EfficientNet encoder has no posterior; use mean")
        folder = effnet_folder(config, sources)
        self.model = load_effnet(folder, device).to(dtype=DTYPES[config.cache.vae_dtype]).requires_grad_(False)
        self.device, self.dtype, self._prepare = device, DTYPES[config.cache.vae_dtype], to_effnet_input
        self.latent_channels = int(self.model.mapper[0].out_channels)
        self.downsample = 32  # EfficientNet's five stride-2 stages

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._prepare(pixels.to(self.device, torch.float32)).to(self.dtype)
        return {"latent_mean": self.model(x).float().cpu()}

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> {"latent_mean"}: (B, 16, H/32, W/32) float32 on CPU."""
        return run_halving_on_oom(lambda chunk: self._encode(torch.stack(list(chunk))), list(pixels))


def effnet_folder(config: Config, sources: ModelSources | None = None) -> Path:
    """The local folder holding the Stage C encoder weights (a hub `model.vae` is fetched at its commit)."""
    from .effnet import WEIGHTS_NAME

    if config.model.vae and is_local(config.model.vae):
        return Path(config.model.vae)
    if config.model.vae:
        from huggingface_hub import hf_hub_download

        revision = sources.vae.load_revision if sources is not None and sources.vae is not None else None
        return Path(hf_hub_download(config.model.vae, WEIGHTS_NAME, revision=revision)).parent
    sub = Path(config.model.pretrained) / family_facts(config.model.family).encoder_subfolder
    if not sub.is_dir():
        raise FileNotFoundError(f"model.vae: {config.model.pretrained} has no Stage C encoder; set model.vae to the "
                                "folder or hub repo holding effnet_encoder.safetensors (stabilityai/StableCascade)")
    return sub


def load_latent_encoder(config: Config, device: torch.device, sources: ModelSources | None = None) -> Any:
    """The family's image-to-latent encoder: a diffusers autoencoder, or Stable Cascade's EfficientNet."""
    from latentforge.shared.families import EFFNET_CLASS

    if family_facts(config.model.family).vae_class == EFFNET_CLASS:
        return EffnetEncoder(config, device, sources)
    return VaeEncoder(config, device, sources)


def model_identity(config: Config, sources: ModelSources | None = None) -> dict[str, Any]:
    """What the cached tensors depend on in the model: weight hashes for local folders; for the hub, the id,
    the configured revision, the commit it resolved to (from `sources`, the job's resolved models; None
    without them) and the weight variant.

    Only the encoders count (VAE, text encoders, tokenizers): swapping the UNet must not invalidate a cache.
    The key names are the cache contract's (`cache_fingerprint.model_identity_doc`): the trainer reads them back.
    """
    def one(src: str, subfolders: Sequence[str], source: ModelSource | None, revision: str | None,
            variant: str | None) -> dict[str, Any]:
        if not is_local(src):
            if source is not None:
                return hub_model_part(src, source.revision or DEFAULT_REVISION, variant, source.commit)
            return hub_model_part(src, revision or DEFAULT_REVISION, variant)
        files = {}
        for sub in subfolders:
            base = Path(src) / sub if sub else Path(src)
            for p in sorted(base.glob("*")) if base.is_dir() else ():
                if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
                    files[f"{sub}/{p.name}" if sub else p.name] = sha256_file(p)
        if not files:
            raise FileNotFoundError(f"model.pretrained: {src} holds no weights under {', '.join(subfolders)}")
        return files_model_part(files)

    m = config.model
    pipe = sources.pretrained if sources is not None else None
    text_subfolders = [d for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
                       if not is_local(m.pretrained) or (Path(m.pretrained) / d).is_dir()]
    text = one(m.pretrained, text_subfolders, pipe, m.revision, m.variant)
    if m.vae:  # another repo: loaded at its own default branch, without the pipeline's variant (VaeEncoder)
        vae = one(m.vae, ("",), sources.vae if sources is not None else None, None, None)
    else:
        vae = one(m.pretrained, (family_facts(m.family).encoder_subfolder,), pipe, m.revision, m.variant)
    return model_identity_doc(text=text, vae=vae)
