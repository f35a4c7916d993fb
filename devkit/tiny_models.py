"""Tiny, randomly initialised diffusers pipelines built locally, for tests and the demo.

Why: the test suite and `make demo` must run with no network access and in seconds on a laptop CPU, so
they cannot use hub checkpoints. Instead `build_tiny_pipeline` writes a complete diffusers-format folder
(the same layout `save_pretrained` gives a real model) whose weights are random and whose widths are
tiny, but whose *geometry* is real:

* the VAE has four resolution levels, so it downsamples by exactly 8 with 4 latent channels, as the real
  SDXL VAE does; cache shapes, bucket arithmetic and latent/pixel conversions are therefore exercised
  with the true factors;
* the SDXL UNet uses `text_time` added conditioning (pooled text embedding + six size/crop ids), and
  cross-attends to the concatenated penultimate hidden states of two text encoders, so the caching code
  must produce exactly the tensors a real SDXL run would;
* both tokenizers are genuine CLIP byte-level BPE tokenizers (see `clip_tokenizer`), with SDXL's two
  different pad tokens.

Builds are deterministic (same family and seed give byte-identical weight files), atomic (built in a
temporary folder beside the target and renamed into place) and idempotent (a folder already holding the
requested build is returned as is, recognised by the `latentforge_tiny.json` marker).

To add a family, write a `_build_<family>(tmp_dir, seed)` function that saves a pipeline into `tmp_dir`
and register it in `TINY_BUILDERS`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .clip_tokenizer import EOS_TOKEN, make_clip_tokenizer
from .tiny_cascade import build_stable_cascade
from .tiny_families import build_pixart_sigma, build_sana, build_sd1, build_sd2

MARKER_NAME = "latentforge_tiny.json"
# Bump when a builder changes what it writes, so stale folders built by older code are rebuilt.
BUILDER_VERSION = 1

# The widths below are chosen so that every derived SDXL width is distinct, which makes a mix-up
# (e.g. pooled vs. hidden, or one encoder for the other) fail with a shape error instead of passing.
SDXL_TEXT_WIDTH_1 = 32  # CLIP ViT-L stand-in
SDXL_TEXT_WIDTH_2 = 64  # OpenCLIP bigG stand-in; also the pooled (projected) width
# Three layers, so the penultimate hidden state SDXL conditions on is a real intermediate layer.
SDXL_TEXT_LAYERS = 3
SDXL_TIME_EMBED_DIM = 8
SDXL_CROSS_ATTENTION_DIM = SDXL_TEXT_WIDTH_1 + SDXL_TEXT_WIDTH_2  # 96
# text_time: six micro-conditioning ids (orig h/w, crop top/left, target h/w), each sinusoidally embedded.
SDXL_ADD_EMBED_DIM = 6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_WIDTH_2  # 112


def _seeded(seed: int, offset: int) -> None:
    # Re-seed per component so each one's weights depend only on (seed, component), not on how many
    # random numbers earlier components happened to draw.
    torch.manual_seed(seed * 1000 + offset)


def _sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        # Four levels, every one but the last halving resolution: 2**3 = 8, the real SDXL factor.
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _clip_text_config(vocab_size: int, width: int, layers: int, act: str, bos: int, eos: int, pad: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=37,
        projection_dim=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=bos,
        # Pooling picks the first eos position; it must be the tokenizer's real eos id.
        eos_token_id=eos,
        pad_token_id=pad,
    )


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=1,
        # diffusers' historical naming: this is the number of heads per block (head dim 16 here).
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        cross_attention_dim=SDXL_CROSS_ATTENTION_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_ADD_EMBED_DIM,
    )


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # The stabilityai/stable-diffusion-xl-base-1.0 scheduler config, so noise/timestep code is tested
    # against the real schedule.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )


def _build_sdxl(tmp_dir: Path, seed: int) -> None:
    """Save a tiny SDXL pipeline (two CLIP encoders, text_time UNet, 8x VAE) into `tmp_dir`."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_clip_tokenizer(pad_token=EOS_TOKEN)
    tokenizer_2 = make_clip_tokenizer(pad_token="!")  # OpenCLIP's pad, as in the real second tokenizer
    vocab = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    _seeded(seed, 0)
    vae = _sdxl_vae()
    _seeded(seed, 1)
    text_encoder = CLIPTextModel(
        _clip_text_config(
            vocab, SDXL_TEXT_WIDTH_1, SDXL_TEXT_LAYERS, "quick_gelu", bos, eos, tokenizer.pad_token_id
        )
    )
    _seeded(seed, 2)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(
            vocab, SDXL_TEXT_WIDTH_2, SDXL_TEXT_LAYERS, "gelu", bos, eos, tokenizer_2.pad_token_id
        )
    )
    _seeded(seed, 3)
    unet = _sdxl_unet()

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        # The watermarker would need the optional invisible-watermark package and alters outputs.
        add_watermarker=False,
    )
    pipe.save_pretrained(tmp_dir, safe_serialization=True)


TINY_BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "sdxl": _build_sdxl,
    "sd1": build_sd1,
    "sd2": build_sd2,
    "pixart_sigma": build_pixart_sigma,
    "sana": build_sana,
    "stable_cascade": build_stable_cascade,
}


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_build_of(folder: Path, family: str, seed: int) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker == _marker(family, seed)


def _marker(family: str, seed: int) -> dict:
    return {"family": family, "seed": seed, "builder_version": BUILDER_VERSION}


def build_tiny_pipeline(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) a tiny random diffusers pipeline of `family` in `out_dir`; return its path.

    The folder loads with the family's diffusers pipeline class (`StableDiffusionXLPipeline` for "sdxl")
    and each component with its own class and `subfolder=`, fully offline. If `out_dir` already holds a
    build of the same family, seed and builder version it is returned untouched; a different tiny build
    there is replaced. A non-empty folder that is not a tiny build is never deleted: `FileExistsError`.

    Raises:
        ValueError: `family` has no builder.
    """
    if family not in TINY_BUILDERS:
        raise ValueError(
            f"no tiny model builder for family {family!r}; supported: {', '.join(sorted(TINY_BUILDERS))}"
        )
    out = Path(out_dir).absolute()
    if _is_build_of(out, family, seed):
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _read_marker(out) is None)):
        raise FileExistsError(
            f"{out} exists and is not a latentforge tiny model folder; refusing to overwrite it"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        TINY_BUILDERS[family](tmp, seed)
        # The marker goes in last: its presence is what certifies the folder as complete.
        (tmp / MARKER_NAME).write_text(json.dumps(_marker(family, seed), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            # Stale tiny build (other family/seed/version) or an empty folder: move it aside first,
            # since a directory cannot be renamed over a non-empty one.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            # A concurrent builder won the race; its result is as good as ours if it is the same build.
            if _is_build_of(out, family, seed):
                return out
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
