"""Model folders the benchmarks train and cache with: diffusers pipeline folders with random weights.

Each starts as a copy of the tiny SDXL pipeline (`latentforge.devkit.tiny_models`: its real CLIP BPE
tokenizers and the real SDXL scheduler config) and replaces some components with wider or narrower ones
built here, saved with `save_pretrained`, so the trainer and the cache job load them like any checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TEXT_WIDTHS = (32, 64)  # CLIP-L and bigG stand-ins, as in the tiny pipeline
TIME_EMBED_DIM = 8


def _base(workdir: Path) -> Path:
    """The tiny SDXL pipeline, built once beside the benchmarks' own folders and shared by them
    (or the one LATENTFORGE_BENCH_TINY_SDXL names, e.g. the test session's)."""
    import os

    from latentforge.devkit.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", os.environ.get("LATENTFORGE_BENCH_TINY_SDXL") or workdir.parent / "tiny-sdxl")


def _fresh_copy(workdir: Path, out: Path) -> Path:
    base = _base(workdir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    (out / "latentforge_tiny.json").unlink(missing_ok=True)  # not a tiny build any more
    return out


def unet(channels: tuple[int, ...], cross_dim: int, pooled_dim: int, attention_levels: int = 1,
         layers_per_block: int = 1, head_dim: int = 16, groups: int = 8, sample_size: int = 32) -> Any:
    """A UNet2DConditionModel with SDXL's text_time conditioning, cross-attention on the last levels."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    n = len(channels)
    down = ["DownBlock2D"] * (n - attention_levels) + ["CrossAttnDownBlock2D"] * attention_levels
    up = ["CrossAttnUpBlock2D"] * attention_levels + ["UpBlock2D"] * (n - attention_levels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(channels), layers_per_block=layers_per_block, transformer_layers_per_block=1,
        attention_head_dim=tuple(max(1, c // head_dim) for c in channels), norm_num_groups=groups,
        cross_attention_dim=cross_dim, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM, projection_class_embeddings_input_dim=pooled_dim + 6 * TIME_EMBED_DIM,
    )


def vae(width: int, layers_per_block: int = 1) -> Any:
    """An SDXL-geometry VAE (four levels: factor 8, 4 latent channels) with channels (w, 2w, 4w, 4w)."""
    import math

    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        layers_per_block=layers_per_block, act_fn="silu", latent_channels=4, norm_num_groups=math.gcd(width, 8),
        sample_size=256, scaling_factor=0.13025, force_upcast=True,
    ).eval()


def text_encoders(folder: Path, widths: tuple[int, int] = TEXT_WIDTHS, layers: tuple[int, int] = (2, 3)) -> tuple[Any, Any]:
    """CLIP-L / bigG stand-ins matching the folder's tokenizers (vocabulary and special token ids)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = []
    for i, (sub, cls, act) in enumerate((("tokenizer", CLIPTextModel, "quick_gelu"),
                                         ("tokenizer_2", CLIPTextModelWithProjection, "gelu"))):
        tok = CLIPTokenizer.from_pretrained(folder / sub)
        torch.manual_seed(2 + i)
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=widths[i], intermediate_size=4 * widths[i],
                             projection_dim=widths[i], num_hidden_layers=layers[i], num_attention_heads=4,
                             max_position_embeddings=77, hidden_act=act, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(cls(cfg).eval())
    return out[0], out[1]


def pipeline_folder(workdir: Path, out: Path, *, unet_model: Any, vae_model: Any = None,
                    text_models: tuple[Any, Any] | None = None, keep_text: bool = True) -> Path:
    """A pipeline folder: the tiny pipeline with the given components replaced (None keeps the tiny one)."""
    folder = _fresh_copy(workdir, out)
    unet_model.save_pretrained(folder / "unet")
    if vae_model is not None:
        vae_model.save_pretrained(folder / "vae")
    if text_models is not None:
        text_models[0].save_pretrained(folder / "text_encoder")
        text_models[1].save_pretrained(folder / "text_encoder_2")
    if not keep_text:
        for sub in ("text_encoder", "text_encoder_2"):
            shutil.rmtree(folder / sub)
    return folder


def sdxl_shaped_unet() -> Any:
    """A small UNet that takes SDXL's tensors as they are: 4x128x128 latents, 77x2048 embeds, pooled 1280.

    About 0.9 M parameters; four levels so cross-attention runs at 16x16, which keeps a CPU step near the
    per-sample rate an H100 trains SDXL at (~6-15 samples/s).
    """
    return unet((8, 16, 32, 32), cross_dim=2048, pooled_dim=1280, attention_levels=1, head_dim=8, groups=8,
                sample_size=128)
