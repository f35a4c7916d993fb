"""`make gpu-check` (bench/gpu_check*.py) without a GPU.

The whole `--tiny` run (real cache job, three deepspeed launches, the in-loop baseline) takes about 100 s
on a 2-core machine, so it is a soak test (`make soak`); the pieces it is built from are checked here in
seconds: the child-process hook (peak memory record, final-checkpoint skip), the images and the Real-ESRGAN
file, the written configs, the bitsandbytes probe script, and the budget/skip bookkeeping.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_support import soak

from bench import gpu_check, gpu_check_assets, gpu_check_runs

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_hook_records_the_peak_of_a_process_that_used_cuda(tmp_path):
    hook = gpu_check_runs.write_hook(tmp_path / "hook")
    peaks = tmp_path / "peaks"
    env = gpu_check_runs.child_env(True, hook, peaks, skip_final_save=False)
    # A stand-in torch whose CUDA was initialised: what the hook reads at exit.
    fake = ("import sys, types; t = types.ModuleType('torch'); t.cuda = types.SimpleNamespace("
            "is_initialized=lambda: True, max_memory_allocated=lambda: 3 * 2**30, max_memory_reserved=lambda: 4 * 2**30);"
            " sys.modules['torch'] = t")
    assert _child(fake, env).returncode == 0
    assert gpu_check_runs.read_peak(peaks) == {"max_allocated_gib": 3.0, "max_reserved_gib": 4.0, "processes": 1}
    # A process that never touched CUDA records nothing (the launchers, every CPU run).
    other = tmp_path / "other"
    assert _child("import sys", gpu_check_runs.child_env(True, hook, other, skip_final_save=False)).returncode == 0
    assert gpu_check_runs.read_peak(other) is None


def test_hook_skips_the_trainers_final_checkpoint_only_when_asked(tmp_path):
    hook = gpu_check_runs.write_hook(tmp_path / "hook")
    code = "import latentforge.train.trainer as m; print(m.Trainer.save.__module__, m.Trainer.save(None))"
    skipped = _child(code, gpu_check_runs.child_env(True, hook, tmp_path / "p1", skip_final_save=True))
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert skipped.stdout.split()[-1] == "None" and "final checkpoint skipped" in skipped.stderr
    kept = _child("import latentforge.train.trainer as m; print(m.Trainer.save.__module__)",
                  gpu_check_runs.child_env(True, hook, tmp_path / "p2", skip_final_save=False))
    assert kept.stdout.split()[-1] == "latentforge.train.trainer"


def test_images_are_distinct_some_need_upscaling_and_the_esrgan_file_loads(tmp_path):
    from PIL import Image

    from latentforge.preprocess.upscale import Upscaler

    folder, info = gpu_check_assets.make_images(tmp_path, 8, 256)
    jpgs = sorted(folder.glob("*.jpg"))
    assert len(jpgs) == 8 and all(p.with_suffix(".txt").read_text() for p in jpgs)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in jpgs}) == 8
    shorts = [min(Image.open(p).size) for p in jpgs]
    assert info["smaller_than_bucket"] == 2 == sum(s < 256 for s in shorts)
    path, _ = gpu_check_assets.write_esrgan(tmp_path, tiny=True)
    up = Upscaler(path)
    assert up.method == "realesrgan" and up.scale == 4
    small = Image.open(jpgs[3]).convert("RGB")
    out, method = up.upscale(small, (256, 256))
    assert method == "realesrgan" and min(out.size) >= 256


def _check(tmp_path: Path, tiny: bool, budget_s: float = 480.0) -> gpu_check.Check:
    args = argparse.Namespace(tiny=tiny, workdir=tmp_path, budget_s=budget_s, checkpoint=False, keep_runs=False)
    return gpu_check.Check(args, gpu_check.TINY if tiny else gpu_check.FULL, "cpu", 1)


@pytest.mark.parametrize("tiny", [True, False])
def test_written_config_is_valid_and_says_what_the_brief_asks(tmp_path, tiny):
    from latentforge.shared.config import load_config

    check = _check(tmp_path, tiny)
    check.model, check.images = tmp_path / "model", tmp_path / "images"
    config = load_config(check.write_config(tmp_path / "esrgan.pth"), [])
    s = check.s
    assert config.buckets.resolutions == [s.resolution] and config.cache.vae_dtype == "float32"
    assert config.upscale.enabled and config.upscale.model_path == str(tmp_path / "esrgan.pth")
    assert config.model.vae is None and [src.path for src in config.data.sources] == [str(tmp_path / "images")]
    t = config.train
    assert (t.micro_batch_size, t.gradient_checkpointing, t.gradient_accumulation_steps, t.ema.enabled) == (s.micro, True, 1, False)
    assert config.deepspeed == {"zero_optimization": {"stage": 2}, "bf16": {"enabled": not tiny}}
    if not tiny:
        assert (s.resolution, s.micro, s.steps, s.images) == (1024, 4, 30, 256)


def test_bnb_probe_script_runs(tmp_path):
    # On the CPU backend; on a GPU the same script steps a tensor as large as the ZeRO-2 partition.
    run = subprocess.run([sys.executable, "-c", gpu_check.BNB_PROBE, "10000", "cpu"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    found = [line for line in run.stdout.splitlines() if line.startswith("PROBE ")]
    assert run.returncode == 0 and json.loads(found[0][6:]) == {"first_updated": True, "last_updated": True}


def test_phases_skip_on_budget_and_on_failed_dependencies(tmp_path):
    check = _check(tmp_path, tiny=True, budget_s=60.0)
    check.phase("a", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    check.phase("b", lambda: {"x": 1}, needs=("a",))
    check.phase("c", lambda: {"x": 1}, need_s=1000.0)
    check.phase("d", lambda: {"steps_per_s": 2.0})
    phases = check.doc["phases"]
    assert phases["a"]["status"] == "failed" and "boom" in phases["a"]["error"]
    assert phases["b"]["status"] == "skipped" and "a" in phases["b"]["reason"]
    assert phases["c"]["status"] == "skipped" and "estimated 1000 s" in phases["c"]["reason"]
    assert phases["d"] == {"status": "ok", "steps_per_s": 2.0, "wall_s": phases["d"]["wall_s"]}
    figs = gpu_check.headline({"train_zero2": {"status": "ok", "steps_per_s": 2.0, "images_per_s": 8.0, "world_size": 1},
                               "in_loop": {"status": "ok", "steps_per_s": 1.0, "images_per_s": 4.0,
                                           "seconds_per_step": {"encode_s": 0.2, "decode_wait_s": 0.05}},
                               "zero3": {"status": "skipped", "reason": "r", "steps_per_s": 9.0}})
    assert figs["cached_vs_in_loop"] == 2.0 and figs["cached_vs_in_loop_same_engine"] == pytest.approx(1.5)
    assert figs["steps_per_s"]["zero3"] is None


@soak
def test_tiny_end_to_end(tmp_path):
    """Every phase on the CPU: model, images, the real cache job, deepspeed ZeRO-2, in-loop, adamw_8bit, ZeRO-3."""
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny", "--workdir", str(tmp_path / "work"),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert {n: r["status"] for n, r in doc["phases"].items()} == {
        "model": "ok", "cache_inputs": "ok", "cache": "ok", "train_zero2": "ok", "in_loop": "ok", "adamw_8bit": "ok",
        "zero3": "ok", "bnb_probe": "skipped"}
    cache = doc["phases"]["cache"]
    assert cache["cached_samples"] == 8 and cache["resize_paths"].get("realesrgan", 0) == 2
    for name, steps in (("train_zero2", 3), ("adamw_8bit", 2), ("zero3", 2)):
        rec = doc["phases"][name]
        assert rec["steps"] == steps and rec["losses_finite"] and rec["final_checkpoint"].startswith("skipped")
        assert not (tmp_path / "work" / "runs" / name / "checkpoints").exists()
    f = doc["figures"]
    for key in ("cache_images_per_s_steady", "train_images_per_s_cached", "steps_per_s_cached", "steps_per_s_in_loop",
                "cached_vs_in_loop", "loader_share_cached"):
        assert f[key] is not None and f[key] >= 0, key
    assert doc["backend"] == "gloo" and doc["tiny"] is True
