"""The frozen encoders of the cache job: the VAE and each family's text encoders.

Models load once per process, in eval mode, without gradients, on the process's own device. A family's
text side is one small adapter class (`SdxlText`); adding a family adds one class to `TEXT_ADAPTERS`.
Encoding a batch that runs out of memory is retried in halves before a sample is given up on.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from latentforge.shared.config import Config
from latentforge.shared.file_hash import sha256_file

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _load_kwargs(config: Config, dtype: torch.dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if config.model.revision:
        kwargs["revision"] = config.model.revision
    if config.model.variant:
        kwargs["variant"] = config.model.variant
    return kwargs


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


class VaeEncoder:
    """Encodes pixel batches in [-1, 1] to latents in the autoencoder's native (unscaled) space.

    KL VAEs (SD, SDXL, PixArt) give the posterior mean and std; SANA's DC-AE is deterministic and gives
    one latent (then `latent_std` does not exist and `cache.latent_mode: dist` is refused).
    """

    def __init__(self, config: Config, device: torch.device) -> None:
        import diffusers

        dtype = _DTYPES[config.cache.vae_dtype]
        source = config.model.vae or config.model.pretrained
        kwargs = _load_kwargs(config, dtype)
        if config.model.vae and not _is_local(config.model.vae):
            kwargs.pop("variant", None)  # a standalone VAE repo rarely has the pipeline's variant files
        subfolder = None if config.model.vae else "vae"
        cls = diffusers.AutoencoderDC if config.model.family == "sana" else diffusers.AutoencoderKL
        self.model = cls.from_pretrained(source, subfolder=subfolder, **kwargs).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.dtype = device, dtype
        cfg = self.model.config
        self.has_posterior = cls is diffusers.AutoencoderKL
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


def token_windows(max_tokens: int, window: int = 77) -> int:
    """Number of 77-token windows a `max_tokens` prompt is encoded in (75 content tokens each)."""
    return max(1, math.ceil((max_tokens - 2) / (window - 2)))


class SdxlText:
    """SDXL text side: both CLIP encoders' penultimate hidden states concatenated, pooled from the second.

    `clip_skip` moves further up from the penultimate layer. Prompts longer than 77 tokens are split
    into 75-token windows, each wrapped with BOS/EOS and encoded separately, then concatenated along the
    sequence (as kohya sd-scripts and A1111 do); the pooled embedding comes from the first window.
    """

    def __init__(self, config: Config, device: torch.device) -> None:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        dtype = _DTYPES[config.cache.text_dtype]
        src, kwargs = config.model.pretrained, _load_kwargs(config, dtype)
        tok_kwargs = {"revision": config.model.revision} if config.model.revision else {}
        self.tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder=s, **tok_kwargs) for s in ("tokenizer", "tokenizer_2")]
        self.encoders = [
            CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kwargs).to(device).eval(),
            CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kwargs).to(device).eval(),
        ]
        for enc in self.encoders:
            enc.requires_grad_(False)
        self.device = device
        self.windows = token_windows(config.cache.max_tokens or 77)
        self.clip_skip = config.cache.clip_skip
        self.text_dim = sum(int(e.config.hidden_size) for e in self.encoders)
        self.pooled_dim = int(self.encoders[1].config.projection_dim)
        self.tokens = 77 * self.windows

    def _tokenize(self, tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
        """(B, windows, 77) ids: 75 content tokens per window, each window framed by BOS ... EOS/pad."""
        body = 75 * self.windows
        ids = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=body).input_ids
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        out = torch.full((len(captions), self.windows, 77), pad, dtype=torch.long)
        for i, seq in enumerate(ids):
            for w in range(self.windows):
                chunk = seq[w * 75:(w + 1) * 75]
                row = [bos, *chunk, eos]
                out[i, w, : len(row)] = torch.tensor(row)
        return out

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = self._tokenize(tokenizer, captions)
            b = ids.shape[0]
            out = encoder(ids.view(b * self.windows, 77).to(self.device), output_hidden_states=True)
            h = out.hidden_states[-(2 + self.clip_skip)]
            hidden.append(h.reshape(b, self.windows * 77, -1).float().cpu())
            if isinstance(out, dict) and "text_embeds" in out:
                pooled = out["text_embeds"].reshape(b, self.windows, -1)[:, 0].float().cpu()
        assert pooled is not None
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> {"prompt_embeds": (B, T, D), "pooled_prompt_embeds": (B, P)}; duplicates encoded once."""
        unique = list(dict.fromkeys(captions))
        enc = run_halving_on_oom(self._encode_unique, unique)
        where = [unique.index(c) for c in captions] if len(unique) != len(captions) else list(range(len(captions)))
        return {k: v[where] for k, v in enc.items()}

    def field_widths(self) -> dict[str, int]:
        return {"prompt_embeds": self.text_dim, "pooled_prompt_embeds": self.pooled_dim}


class PipelineText:
    """Text side of SD 1.x/2.x, PixArt-Sigma and SANA through the family pipeline's own `encode_prompt`.

    The pipeline is built with only its tokenizer and text encoder, so the cached embeddings are exactly
    what that pipeline computes at inference (clip_skip for CLIP; T5/Gemma masks; SANA's instruction
    prefix). Padding positions are zeroed: masked out anyway, and zeros compress to almost nothing.
    """

    pipeline_class = ""
    encoder_class = ""
    tokenizer_class = "AutoTokenizer"

    def __init__(self, config: Config, device: torch.device) -> None:
        import diffusers
        import transformers

        from latentforge.shared.families import family_facts

        dtype = _DTYPES[config.cache.text_dtype]
        src, kwargs = config.model.pretrained, _load_kwargs(config, dtype)
        tok_kwargs = {"revision": config.model.revision} if config.model.revision else {}
        tokenizer = getattr(transformers, self.tokenizer_class).from_pretrained(src, subfolder="tokenizer", **tok_kwargs)
        encoder = getattr(transformers, self.encoder_class).from_pretrained(src, subfolder="text_encoder", **kwargs)
        encoder = encoder.to(device).eval().requires_grad_(False)
        self.pipe = self._text_only_pipeline(getattr(diffusers, self.pipeline_class), tokenizer, encoder)
        self.device, self.config = device, config
        self.tokens = config.cache.max_tokens or family_facts(config.model.family).text_max_tokens
        self.text_dim = int(getattr(encoder.config, "hidden_size", None) or encoder.config.d_model)
        self.pooled_dim = None

    def _text_only_pipeline(self, cls: Any, tokenizer: Any, encoder: Any) -> Any:
        return cls(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)

    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> the family's text fields; duplicates encoded once."""
        unique = list(dict.fromkeys(captions))
        enc = run_halving_on_oom(self._encode_unique, unique)
        where = [unique.index(c) for c in captions]
        return {k: v[where] for k, v in enc.items()}

    def _masked(self, embeds: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = mask.to(torch.uint8).cpu()
        return {"prompt_embeds": embeds.float().cpu() * mask[..., None], "prompt_mask": mask}


class SdText(PipelineText):
    pipeline_class, encoder_class, tokenizer_class = "StableDiffusionPipeline", "CLIPTextModel", "CLIPTokenizer"

    def _text_only_pipeline(self, cls: Any, tokenizer: Any, encoder: Any) -> Any:
        return cls(vae=None, text_encoder=encoder, tokenizer=tokenizer, unet=None, scheduler=None, safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False)

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(captions), self.device, 1, False,
                                            clip_skip=self.config.cache.clip_skip or None)
        return {"prompt_embeds": embeds.float().cpu()}


class PixArtText(PipelineText):
    pipeline_class, encoder_class, tokenizer_class = "PixArtSigmaPipeline", "T5EncoderModel", "AutoTokenizer"

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, device=self.device,
                                                     max_sequence_length=self.tokens)
        return self._masked(embeds, mask)


class SanaText(PipelineText):
    pipeline_class, encoder_class, tokenizer_class = "SanaPipeline", "AutoModel", "AutoTokenizer"

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        import inspect

        # SANA prefixes every prompt with its "complex human instruction" (the pipeline's default).
        instruction = inspect.signature(type(self.pipe).__call__).parameters["complex_human_instruction"].default
        embeds, mask, _, _ = self.pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, device=self.device,
                                                     max_sequence_length=self.tokens, complex_human_instruction=instruction)
        return self._masked(embeds, mask)


TEXT_ADAPTERS: dict[str, type] = {"sdxl": SdxlText, "sd1": SdText, "sd2": SdText, "pixart_sigma": PixArtText,
                                  "sana": SanaText}


def load_text_encoder(config: Config, device: torch.device) -> Any:
    try:
        cls = TEXT_ADAPTERS[config.model.family]
    except KeyError:
        raise ValueError(
            f"model.family {config.model.family!r}: the cache job supports {', '.join(TEXT_ADAPTERS)}"
        ) from None
    return cls(config, device)


def model_identity(config: Config) -> dict[str, Any]:
    """What the cached tensors depend on in the model: weight hashes for local folders, id+revision on the hub.

    Only the encoders count (VAE, text encoders, tokenizers): swapping the UNet must not invalidate a cache.
    """
    def one(src: str, subfolders: Sequence[str]) -> dict[str, Any]:
        if not _is_local(src):
            return {"hub_id": src, "revision": config.model.revision or "main", "variant": config.model.variant}
        files = {}
        for sub in subfolders:
            base = Path(src) / sub if sub else Path(src)
            for p in sorted(base.glob("*")):
                if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
                    files[f"{sub}/{p.name}" if sub else p.name] = sha256_file(p)
        if not files:
            raise FileNotFoundError(f"model.pretrained: {src} holds no weights under {', '.join(subfolders)}")
        return {"files": files}

    text_subfolders = [d for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
                       if not _is_local(config.model.pretrained) or (Path(config.model.pretrained) / d).is_dir()]
    ident = {"text": one(config.model.pretrained, text_subfolders)}
    ident["vae"] = one(config.model.vae, ("",)) if config.model.vae else one(config.model.pretrained, ("vae",))
    return ident
