"""Tiny offline pipelines for SD 1.x, SD 2.x, PixArt-Sigma and SANA (SDXL lives in `tiny_models`).

Same rules as the SDXL builder: random weights, tiny widths, real geometry. SD 1.x/2.x and PixArt use
the 8x, 4-channel VAE; SANA uses a DC-AE with six levels (32x downsampling) and 32 latent channels, so
the cache's bucket step and latent shapes follow the autoencoder exactly as with the real model. SD2 is
the 768-v flavour (v-prediction); PixArt's transformer predicts its variance too (8 output channels).
"""

from __future__ import annotations

from pathlib import Path

from .clip_tokenizer import EOS_TOKEN, make_clip_tokenizer
from .tiny_tokenizers import make_gemma_tokenizer, make_t5_tokenizer


def _seeded(seed: int, offset: int) -> None:
    import torch

    torch.manual_seed(seed * 1000 + offset)


def _kl_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                         scaling_factor=scaling_factor)


def _clip_encoder(tokenizer, width: int, projection: bool = False):
    """A tiny CLIP text encoder (`projection`: with the pooled projection, CLIPTextModelWithProjection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, projection_dim=width,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _sd_unet(cross_attention_dim: int, linear_projection: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                                layers_per_block=1, attention_head_dim=(2, 4), norm_num_groups=32,
                                cross_attention_dim=cross_attention_dim, use_linear_projection=linear_projection)


def _build_sd(tmp_dir: Path, seed: int, version: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # SD1: CLIP ViT-L (pads with eos), epsilon. SD2-768: OpenCLIP-H (pads with "!"), v-prediction.
    tokenizer = make_clip_tokenizer(pad_token=EOS_TOKEN if version == 1 else "!")
    width = 32 if version == 1 else 48
    _seeded(seed, 0)
    vae = _kl_vae(0.18215)
    _seeded(seed, 1)
    text_encoder = _clip_encoder(tokenizer, width)
    _seeded(seed, 2)
    unet = _sd_unet(width, linear_projection=version == 2)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon" if version == 1 else "v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_dir, safe_serialization=True)


def build_sd1(tmp_dir: Path, seed: int) -> None:
    """Tiny SD 1.x: one CLIP encoder (last layer), epsilon prediction."""
    _build_sd(tmp_dir, seed, 1)


def build_sd2(tmp_dir: Path, seed: int) -> None:
    """Tiny SD 2.x (768-v): one OpenCLIP-style encoder, v-prediction."""
    _build_sd(tmp_dir, seed, 2)


def build_pixart_sigma(tmp_dir: Path, seed: int) -> None:
    """Tiny PixArt-Sigma: T5 encoder (300 tokens, masked), DiT with learned sigma, SDXL-style VAE."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = make_t5_tokenizer()
    _seeded(seed, 0)
    vae = _kl_vae(0.13025)
    _seeded(seed, 1)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)).eval()
    _seeded(seed, 2)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, sample_size=32, patch_size=2,
                                           caption_channels=32, use_additional_conditions=False, norm_num_groups=8)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", prediction_type="epsilon")
    PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler).save_pretrained(tmp_dir, safe_serialization=True)


def build_sana(tmp_dir: Path, seed: int) -> None:
    """Tiny SANA: Gemma-2 encoder, linear-attention DiT, DC-AE (32x, 32 channels), flow matching."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = make_gemma_tokenizer()
    _seeded(seed, 0)
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=8,
                        encoder_block_types=("ResBlock",) * 6, decoder_block_types=("ResBlock",) * 6,
                        encoder_block_out_channels=(8, 8, 16, 16, 32, 32), decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
                        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
                        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
                        scaling_factor=0.41407)
    _seeded(seed, 1)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16, pad_token_id=tokenizer.pad_token_id,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    _seeded(seed, 2)
    transformer = SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=32, sample_size=16, patch_size=1)
    # The real SANA scheduler: DPM-Solver on flow sigmas with shift 3.
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0, beta_schedule="linear")
    SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(tmp_dir, safe_serialization=True)
