"""The cache job's model loading (preprocess/model_load.py): straight onto the device, in the dtype it runs in,
the weights exactly the files', once per rank; and the summary's peak host memory per rank."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from reliability_support import soak
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from latentforge.preprocess.model_load import built_on, load_pretrained

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


def test_pretrained_models_arrive_on_the_device_in_the_dtype(tiny_sdxl):
    # The meta device through the libraries' real from_pretrained: a weight read to the host and moved
    # afterwards would not end up there unless the placement reached the loader.
    for cls, sub in ((AutoencoderKL, "vae"), (CLIPTextModelWithProjection, "text_encoder_2")):
        model = load_pretrained(cls, str(tiny_sdxl), META, torch.float16, subfolder=sub)
        assert {p.device for p in model.parameters()} == {META}, cls.__name__
        assert {p.dtype for p in model.parameters()} == {torch.float16}, cls.__name__
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_loaded_weights_are_the_files_bit_for_bit(tiny_sdxl):
    for cls, sub in ((AutoencoderKL, "vae"), (CLIPTextModelWithProjection, "text_encoder_2")):
        saved = load_file(str(next((tiny_sdxl / sub).glob("*.safetensors"))))
        for dtype in (torch.float32, torch.bfloat16):
            state = load_pretrained(cls, str(tiny_sdxl), torch.device("cpu"), dtype, subfolder=sub).state_dict()
            assert set(saved) <= set(state), cls.__name__
            for key, value in saved.items():
                assert torch.equal(state[key], value.to(dtype)), (cls.__name__, key, dtype)


def test_modules_built_on_the_device_and_the_upscaler_with_them(tmp_path):
    from spandrel.architectures.ESRGAN import ESRGAN

    from latentforge.devkit.esrgan_weights import basicsr_keys
    from latentforge.preprocess.upscale import Upscaler

    with built_on(META, "a linear layer"):
        assert torch.nn.Linear(3, 3).weight.device == META
    path = tmp_path / "esrgan.pth"
    torch.save({"params_ema": basicsr_keys(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4).state_dict())},
               path)
    up = Upscaler(path, device="meta")
    assert up.scale == 4 and {p.device for p in up._sr.model.parameters()} == {META}


def test_a_rank_loads_each_model_once_and_the_summary_has_its_peak(tiny_sdxl, demo_data, tmp_path, caplog):
    import json

    from latentforge.preprocess.job import run_cache
    from latentforge.shared.cache_reader import CacheReader
    from latentforge.shared.config import load_config

    cache = tmp_path / "cache"
    sources = f"data.sources=[{{type: webdataset, path: '{demo_data}/webdataset/0000{{0..1}}.tar'}}]"
    config = load_config(ROOT / "configs" / "demo.yaml", [f"model.pretrained={tiny_sdxl}", sources,
                                                          f"cache.path={cache}", f"train.output_dir={tmp_path / 'run'}"])
    caplog.set_level(logging.INFO, logger="latentforge.preprocess.model_load")
    assert run_cache(config) == 0
    loads = [r.getMessage().split(" on ")[0] for r in caplog.records if r.name == "latentforge.preprocess.model_load"]
    assert sorted(loads) == sorted(f"loaded {cls} from {tiny_sdxl}/{sub}" for cls, sub in (
        ("AutoencoderKL", "vae"), ("CLIPTextModel", "text_encoder"), ("CLIPTextModelWithProjection", "text_encoder_2")))
    assert len(CacheReader(str(cache)).groups) == 2  # two shards, one load
    summary = json.loads((cache / "summary.json").read_text())
    assert list(summary["peak_host_mb_by_rank"]) == ["0"]
    assert summary["peak_host_mb_by_rank"]["0"] == summary["peak_host_mb_per_rank"] > 0


def test_load_memory_measures_both_ways_and_checks_the_weights(tiny_sdxl):
    """bench.load_memory's child, in this process: both ways load the file's weights; the figures add up."""
    from bench import load_memory

    records = [load_memory.annotate(load_memory.child(way, tiny_sdxl, "vae", "cpu", "bfloat16"), "float32", 1.0)
               for way in load_memory.WAYS]
    [(case, vae)] = load_memory.summary(records).items()
    assert case == "vae bfloat16 (from float32)" and vae["model_mb"] > 0
    assert vae["equals_saved"] and vae["same_weights_both_ways"] and vae["old"]["on_device"] and vae["new"]["on_device"]
    assert all(vae[way]["peak_rss_mb"] >= 0 for way in load_memory.WAYS)
    figures = load_memory.headline({"status": "ok", "per_case": {case: vae}})
    assert set(figures) == {case} and f"{case} " in load_memory.headline_lines(figures)[0]
    assert load_memory.headline({"status": "skipped"}) is None and load_memory.headline_lines(None) == []


@soak
def test_gpu_check_load_memory_phase_on_the_cpu(tiny_sdxl):
    """The phase bench.gpu_check runs on a GPU, each load in a fresh process, here on the CPU (~40 s)."""
    from bench import load_memory

    phase = load_memory.gpu_check_phase(tiny_sdxl, None, "cpu", 240.0, components=("vae",))
    [(case, vae)] = phase["per_case"].items()
    assert case.startswith("vae float32") and vae["equals_saved"] and vae["same_weights_both_ways"]
