"""Real sizes without a GPU: every family's real model configs (shipped in `devkit/real-configs/`) built on the
meta device, the cache fields the encoders would write at those widths, and one meta forward of the
real-size denoiser through the trainer's family adapter on a batch shaped exactly like those fields.

The tiny test models share the real geometry but not the real widths; this is where a width that only
the real model has (SDXL's 2816-wide text_time input, T5-XXL's 4096, Gemma-2's 2304, the DC-AE's 32
channels) meets the cache format and the training step. Nothing is downloaded and no weights exist.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from latentforge.devkit import real_sizes
from latentforge.devkit.clip_tokenizer import EOS_TOKEN, make_clip_tokenizer
from latentforge.devkit.tiny_tokenizers import make_gemma_tokenizer, make_t5_tokenizer
from latentforge.preprocess.buckets import generate_bucket_set
from latentforge.preprocess.encoders import VaeEncoder
from latentforge.preprocess.families import TEXT_ENCODERS
from latentforge.shared.cache_format import CacheSpec
from latentforge.shared.cache_reader import CacheReader, _torch_dtype
from latentforge.shared.config import Config, load_config
from latentforge.shared.families import FAMILY_FACTS, cached_fields, family_facts
from latentforge.train.families import adapter_for
from latentforge.train.step import StepSetup, build_objective, forward_loss

ROOT = Path(__file__).resolve().parents[1]
# Families whose real configs are not shipped yet (docs/families.md "Not yet"): Stable Cascade's prior.
NOT_SHIPPED = {"stable_cascade"}
FAMILIES = sorted(set(FAMILY_FACTS) - NOT_SHIPPED)
CONFIG_FILES = {"sdxl": "sdxl", "sd1": "sd1", "sd2": "sd2", "pixart_sigma": "pixart-sigma", "sana": "sana"}

# Numbers the real base models are known by. The parameter counts are what these configs build, and
# equal the counts the models are known by (SDXL UNet 2.57 B, SD 1.5 UNet 859.5 M, PixArt-Sigma XL/2 610.9 M, SANA 1.6 B,
# CLIP ViT-L text 123.1 M, OpenCLIP bigG text 694.7 M, T5-XXL encoder 4.76 B, Gemma-2 2B 2.61 B): a
# config value that changed the architecture would change them.
PARAMETERS = {
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "pixart_sigma": {"transformer": 610_856_096, "vae": 83_653_863, "text_encoder": 4_762_310_656},
    "sana": {"transformer": 1_604_462_752, "vae": 312_250_275, "text_encoder": 2_614_341_888},
}
# (subfolder, key) -> value that must hold in the shipped JSON, per family.
KEY_NUMBERS: dict[str, dict[tuple[str, str], Any]] = {
    "sdxl": {("unet", "cross_attention_dim"): 2048, ("unet", "addition_time_embed_dim"): 256,
             ("unet", "projection_class_embeddings_input_dim"): 2816, ("unet", "addition_embed_type"): "text_time",
             ("unet", "in_channels"): 4, ("unet", "sample_size"): 128, ("vae", "latent_channels"): 4,
             ("vae", "scaling_factor"): 0.13025, ("text_encoder", "hidden_size"): 768,
             ("text_encoder_2", "hidden_size"): 1280, ("text_encoder_2", "projection_dim"): 1280,
             ("scheduler", "prediction_type"): "epsilon"},
    "sd1": {("unet", "cross_attention_dim"): 768, ("unet", "sample_size"): 64, ("text_encoder", "hidden_size"): 768,
            ("vae", "latent_channels"): 4},
    "sd2": {("unet", "cross_attention_dim"): 1024, ("unet", "attention_head_dim"): [5, 10, 20, 20],
            ("unet", "use_linear_projection"): True, ("unet", "sample_size"): 96, ("text_encoder", "hidden_size"): 1024,
            ("text_encoder", "num_hidden_layers"): 23, ("scheduler", "prediction_type"): "v_prediction"},
    "pixart_sigma": {("transformer", "caption_channels"): 4096, ("transformer", "sample_size"): 128,
                     ("transformer", "in_channels"): 4, ("transformer", "out_channels"): 8,
                     ("transformer", "patch_size"): 2, ("transformer", "use_additional_conditions"): False,
                     ("text_encoder", "d_model"): 4096, ("vae", "scaling_factor"): 0.13025},
    "sana": {("transformer", "in_channels"): 32, ("transformer", "caption_channels"): 2304,
             ("transformer", "patch_size"): 1, ("transformer", "sample_size"): 32, ("transformer", "num_layers"): 20,
             ("vae", "latent_channels"): 32, ("vae", "encoder_block_out_channels"): [128, 256, 512, 512, 1024, 1024],
             ("vae", "scaling_factor"): 0.41407, ("text_encoder", "hidden_size"): 2304,
             ("scheduler", "flow_shift"): 3.0, ("scheduler", "prediction_type"): "flow_prediction"},
}
# The objective's prediction type as the trainer reads it from each real scheduler config.
PREDICTION = {"sdxl": "epsilon", "sd1": "epsilon", "sd2": "v_prediction", "pixart_sigma": "epsilon", "sana": "flow"}


@functools.cache
def real_models(family: str) -> dict[str, torch.nn.Module]:
    """Subfolder -> the real-size component on the meta device, built once per test run."""
    return {sub: real_sizes.build_component(family, sub) for sub in real_sizes.model_components(family)}


def real_config(family: str) -> Config:
    """The shipped fine-tune config of the family, pointed at the real configs folder."""
    return load_config(ROOT / "configs" / f"{CONFIG_FILES[family]}-finetune.yaml",
                       [f"model.pretrained={real_sizes.config_folder(family)}", "model.vae=null"])


def tokenizer_for(family: str, subfolder: str) -> Any:
    """A small tokenizer of the real one's class and padding (the cache's text widths never depend on it)."""
    if family == "pixart_sigma":
        return make_t5_tokenizer()
    if family == "sana":
        return make_gemma_tokenizer()
    pad = real_sizes.tokenizer_facts(family)[subfolder]["pad_token"]
    return make_clip_tokenizer(pad_token=EOS_TOKEN if pad == "<|endoftext|>" else pad)


def cache_side(family: str, config: Config, monkeypatch: pytest.MonkeyPatch) -> tuple[VaeEncoder, Any]:
    """The cache job's own VaeEncoder and family text class, constructed with the real-size meta models
    standing in for `from_pretrained`: their widths are read by the cache code itself, not restated here."""
    import diffusers
    import transformers

    models = real_models(family)

    def fake_model(cls: type, src: Any = None, *args: Any, subfolder: str | None = None, **kwargs: Any) -> Any:
        return models[subfolder or "vae"]

    def fake_tokenizer(cls: type, src: Any = None, *args: Any, subfolder: str | None = None, **kwargs: Any) -> Any:
        return tokenizer_for(family, subfolder or "tokenizer")

    for name in ("AutoencoderKL", "AutoencoderDC"):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", classmethod(fake_model))
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", classmethod(fake_model))
    for name in ("CLIPTokenizer", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", classmethod(fake_tokenizer))
    meta = torch.device("meta")
    return VaeEncoder(config, meta), TEXT_ENCODERS[family](config, meta)


class RecordingAdapter:
    """A family adapter that keeps each forward's conditioning and output (everything else passes through)."""

    def __init__(self, adapter: Any) -> None:
        self.adapter, self.calls = adapter, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)

    def forward(self, model: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.adapter.forward(model, noisy, timesteps, cond)
        self.calls.append((cond, out))
        return out


def reject_constant(name: str) -> Any:
    """`json.loads` hook: NaN and Infinity are Python's extension, not JSON (other readers refuse them)."""
    raise ValueError(f"{name} is not JSON")


def meta_field(spec: Any, batch: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A meta tensor of a cached field for `batch` samples, in the dtype the cache reader gives."""
    shape = tuple(latent_hw[0] if d == "h" else latent_hw[1] if d == "w" else d for d in spec.shape)
    return torch.empty((batch, *shape), dtype=_torch_dtype(spec), device="meta")


def test_every_family_ships_real_configs_with_its_key_numbers():
    assert set(real_sizes.HUB_IDS) == set(FAMILY_FACTS) - NOT_SHIPPED
    for family, checks in KEY_NUMBERS.items():
        folder = real_sizes.config_folder(family)
        for rel in ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json", "tokenizers.json"):
            assert (folder / rel).is_file(), f"{family}: {rel} missing"
        for (sub, key), want in checks.items():
            doc = real_sizes.scheduler_config(family) if sub == "scheduler" else real_sizes.read_json(family, f"{sub}/config.json")
            assert doc[key] == want, f"{family} {sub}.{key}: {doc[key]!r} != {want!r}"
        for path in folder.rglob("*.json"):  # strict JSON (no NaN/Infinity) and small
            json.loads(path.read_text(), parse_constant=reject_constant)
            assert path.stat().st_size < 8192, path
    assert (real_sizes.REAL_CONFIGS / "README.md").is_file()
    with pytest.raises(ValueError, match="shipped: sdxl"):
        real_sizes.config_folder("flux")


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_cache_fields_fit_the_denoiser(family, monkeypatch):
    facts, adapter, config = family_facts(family), adapter_for(family), real_config(family)
    models = real_models(family)
    counts = {sub: sum(p.numel() for p in m.parameters()) for sub, m in models.items()}
    assert counts == PARAMETERS[family]
    assert all(p.is_meta for m in models.values() for p in m.parameters())

    # The classes the stages load are the ones the real pipeline folder names.
    denoiser_sub = real_sizes.denoiser_subfolder(family)
    assert denoiser_sub == adapter.model_subfolder
    denoiser = real_sizes.build_denoiser(family, dtype=torch.bfloat16)  # DeepSpeed trains it in bf16
    assert type(denoiser).__name__ == adapter.model_class
    assert type(models["vae"]).__name__ == facts.vae_class
    assert real_sizes.model_index(family)["_class_name"] == adapter.pipeline_class

    # What the cache job would write, with widths read by its own encoder classes from the real configs.
    vae, text = cache_side(family, config, monkeypatch)
    assert vae.downsample == facts.vae_downsample and vae.has_posterior == (facts.vae_class == "AutoencoderKL")
    assert text.tokens == facts.text_max_tokens
    fields = cached_fields(family, latent_channels=vae.latent_channels, latent_mode="mean", store_dtype="bfloat16",
                           text_tokens=text.tokens, text_dim=text.text_dim, pooled_dim=text.pooled_dim)
    by_name = {f.name: f for f in fields}
    for name in ("latent_mean", "prompt_embeds", "pooled_prompt_embeds"):
        if name in by_name:
            assert by_name[name].dtype == "bfloat16", name
    assert ("pooled_prompt_embeds" in by_name) == facts.has_pooled
    assert ("prompt_mask" in by_name) == facts.has_text_mask
    if facts.has_text_mask:
        assert by_name["prompt_mask"].shape == (facts.text_max_tokens,) and by_name["prompt_mask"].dtype == "uint8"
    spec = CacheSpec(family=family, fingerprint="real-sizes", fields=fields,
                     buckets=generate_bucket_set(config.buckets.resolutions, config.buckets.step,
                                                 config.buckets.min_aspect, config.buckets.max_aspect),
                     latent_channels=vae.latent_channels, vae_downsample=vae.downsample,
                     scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor)

    # The trainer's own check of a cache against the model passes (family, latent channels, field widths).
    expected = adapter.expected_cache(denoiser)
    CacheReader.check_compatible(SimpleNamespace(spec=spec, url=f"real-sizes/{family}"), **expected)
    assert set(expected["field_widths"]) <= set(by_name)
    if family == "sdxl":  # text_time input: six size/crop numbers of 256 each, then the pooled embedding
        cfg = denoiser.config
        assert 6 * cfg.addition_time_embed_dim + text.pooled_dim == cfg.projection_class_embeddings_input_dim == 2816
        assert denoiser.add_embedding.linear_1.in_features == 2816
    if facts.has_text_mask:
        assert denoiser.caption_projection.linear_1.in_features == text.text_dim

    # The text encoders' own meta forward gives the widths the cache code read from their configs.
    ids = torch.zeros(1, 77 if family in ("sdxl", "sd1", "sd2") else text.tokens, dtype=torch.long, device="meta")
    with torch.no_grad():
        outs = [enc(ids, output_hidden_states=True) for enc in text.encoders] if family == "sdxl" \
            else [text.pipe.text_encoder(ids, output_hidden_states=True)]
    assert sum(o.hidden_states[-2].shape[-1] for o in outs) == text.text_dim
    if family == "sdxl":
        assert outs[1].text_embeds.shape[-1] == text.pooled_dim

    # One training step's forward at the family's native bucket, through the trainer's own step
    # (`train.step.forward_loss`): latents from the cached mean, noise and timesteps from the objective
    # the real scheduler config gives, conditioning with caption dropout from the adapter, then the
    # real-size denoiser on meta. The adapter is wrapped only to see what its forward returns.
    side = real_sizes.NATIVE_RESOLUTION[family]
    assert (side, side) in spec.buckets
    hw, batch_size = (side // vae.downsample, side // vae.downsample), 2
    batch = {f.name: meta_field(f, batch_size, hw) for f in fields if not f.is_text}
    empty = {name: meta_field(by_name[name], 1, hw) for name in ("prompt_embeds", "pooled_prompt_embeds", "prompt_mask")
             if name in by_name}
    assert batch["latent_mean"].shape == (batch_size, vae.latent_channels, *hw)
    meta = torch.device("meta")
    objective = build_objective(config, adapter, meta)
    assert objective.prediction_type == PREDICTION[family]
    recording = RecordingAdapter(adapter)
    setup = StepSetup(recording, objective, config, empty, spec.scaling_factor, spec.shift_factor, meta, torch.bfloat16)
    with torch.no_grad():
        result = forward_loss(denoiser, setup, batch, torch.Generator().manual_seed(0))
    assert result.loss.is_meta and result.loss.shape == () and result.samples == batch_size
    (cond, pred), = recording.calls
    assert pred.is_meta and pred.dtype == torch.bfloat16
    assert pred.shape == (batch_size, vae.latent_channels, *hw)  # PixArt: the epsilon half of its 8 channels
    if family == "sdxl":
        assert cond["time_ids"].shape == (batch_size, 6) and cond["text_embeds"].shape == (batch_size, text.pooled_dim)
    if facts.has_text_mask:
        assert cond["encoder_attention_mask"].shape == (batch_size, facts.text_max_tokens)
    assert cond["encoder_hidden_states"].shape == (batch_size, text.tokens, text.text_dim)
