"""The offline tiny pipelines must load like real ones and keep real SDXL geometry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from latentforge.devkit.tiny_models import TINY_BUILDERS, build_tiny_pipeline

PROMPT = "a photo of a cat sitting on a red chair"


def _weight_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One build shared by the read-only tests: building is the slow part.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.slow
def test_sdxl_pipeline_loads_and_generates(sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    assert pipe.vae_scale_factor == 8
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images[0].size == (64, 64)

    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (1, 77, 32 + 64)  # penultimate states of both encoders, concatenated
    assert pooled.shape == (1, 64)


@pytest.mark.slow
def test_vae_downsamples_by_8_like_real_sdxl(sdxl_dir: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae")
    assert vae.config.scaling_factor == pytest.approx(0.13025)
    assert vae.config.force_upcast is True
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.sample()
        assert latents.shape == (1, 4, 8, 8)
        assert vae.decode(latents).sample.shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_components_load_individually_with_sdxl_config(sdxl_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te1 = CLIPTextModel.from_pretrained(sdxl_dir, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(sdxl_dir, subfolder="text_encoder_2")
    assert (te1.config.hidden_size, te2.config.hidden_size, te2.config.projection_dim) == (32, 64, 64)
    assert te1.config.num_hidden_layers >= 2 and te2.config.num_hidden_layers >= 2

    unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == 96
    assert unet.config.projection_class_embeddings_input_dim == 6 * unet.config.addition_time_embed_dim + 64

    sched = EulerDiscreteScheduler.from_pretrained(sdxl_dir, subfolder="scheduler")
    expected = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "use_karras_sigmas": False,
    }
    assert {k: sched.config[k] for k in expected} == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tok_sub", "te_sub", "pad"),
    [("tokenizer", "text_encoder", "<|endoftext|>"), ("tokenizer_2", "text_encoder_2", "!")],
)
def test_tokenizers_are_real_bpe(sdxl_dir: Path, tok_sub: str, te_sub: str, pad: str) -> None:
    from transformers import CLIPTextConfig, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sdxl_dir, subfolder=tok_sub)
    assert tok.model_max_length == 77
    assert tok.pad_token == pad
    assert len(tok) == CLIPTextConfig.from_pretrained(sdxl_dir, subfolder=te_sub).vocab_size

    ids = tok(PROMPT).input_ids
    assert len(ids) > 5
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    # Learned merges, not a byte-per-token fallback: common caption words are single tokens.
    assert len(ids) == len(PROMPT.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT

    for text in ["Héllo, wörld? 1234 ☃ 日本語 #$%&", "", "   ", "<b>tags</b> & emoji 🐱"]:
        enc = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(enc) == 77


@pytest.mark.slow
def test_same_seed_is_byte_identical_and_reuse_skips_rebuild(
    sdxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    again = build_tiny_pipeline("sdxl", tmp_path / "again", seed=0)
    hashes = _weight_hashes(sdxl_dir)
    assert len(hashes) == 4  # vae, unet, two text encoders
    assert _weight_hashes(again) == hashes
    # Only the finished folder is left behind: no temp directories beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["again"]

    mtimes = {p: p.stat().st_mtime_ns for p in again.rglob("*")}

    def must_not_run(tmp_dir: Path, seed: int) -> None:
        raise AssertionError("rebuilt a folder that already held the requested build")

    monkeypatch.setitem(TINY_BUILDERS, "sdxl", must_not_run)
    assert build_tiny_pipeline("sdxl", again, seed=0) == again
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == mtimes


@pytest.mark.slow
def test_other_seed_replaces_previous_build(tmp_path: Path, sdxl_dir: Path) -> None:
    target = tmp_path / "model"
    build_tiny_pipeline("sdxl", target, seed=1)
    assert _weight_hashes(target) != _weight_hashes(sdxl_dir)
    seed1 = _weight_hashes(target)
    build_tiny_pipeline("sdxl", target, seed=0)
    assert _weight_hashes(target) == _weight_hashes(sdxl_dir) != seed1
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unknown_family_lists_supported() -> None:
    with pytest.raises(ValueError, match="sdxl") as err:
        build_tiny_pipeline("sd3", "/nonexistent/never-created")
    assert "\n" not in str(err.value)
    assert not Path("/nonexistent/never-created").exists()


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_pipeline("sdxl", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
