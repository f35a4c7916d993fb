"""The environment each Make target gives its command.

Offline and CPU settings belong to the targets that run the built-in tiny models (test, demo, bench,
soak); `make cache` and `make train` must reach the hub and the GPU on a user's machine, so they pass the
user's environment through untouched. Each target's command is swapped for a probe that records its
argv and environment (the Makefile names its commands in variables for this).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")
PROBE = """import json, os, sys
with open(os.environ["PROBE_OUT"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def run_make(tmp_path: Path, *args: str, **env: str) -> list[dict]:
    """Run `make ARGS` with every command replaced by the probe; returns the calls it recorded."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / f"calls-{len(list(tmp_path.glob('calls-*')))}.jsonl"
    cmd = f"{sys.executable} {probe}"
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "PROBE_OUT": str(out),
            "USER_SETTING": "kept"}
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "INSTALL=", f"LF={cmd}", f"PY={cmd}", f"TORCHRUN={cmd}",
         f"DEEPSPEED={cmd}", f"LINT_IMPORTS={cmd}", *args],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


@pytest.mark.parametrize("target,nproc", [("cache", 1), ("cache", 2), ("train", 1), ("train", 2)])
def test_cache_and_train_get_the_users_environment(tmp_path, target, nproc):
    calls = run_make(tmp_path, target, "CONFIG=configs/sdxl-finetune.yaml", f"NPROC={nproc}")
    assert len(calls) == 1
    env, argv = calls[0]["env"], calls[0]["argv"]
    assert env["USER_SETTING"] == "kept"
    assert not set(OFFLINE) & set(env), {k: env[k] for k in OFFLINE if k in env}
    assert "configs/sdxl-finetune.yaml" in argv
    if nproc > 1:
        assert ("--nproc_per_node" if target == "cache" else "--num_gpus") in argv


def test_a_users_offline_choice_is_respected(tmp_path):
    (call,) = run_make(tmp_path, "train", "CONFIG=configs/sdxl-finetune.yaml", HF_HUB_OFFLINE="1",
                       DS_ACCELERATOR="cuda")
    assert call["env"]["HF_HUB_OFFLINE"] == "1" and call["env"]["DS_ACCELERATOR"] == "cuda"


@pytest.mark.parametrize("target", ["test", "demo", "bench", "soak"])
def test_tiny_model_targets_run_offline_on_the_cpu(tmp_path, target):
    calls = run_make(tmp_path, target)
    assert calls
    for call in calls:
        env = call["env"]
        assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
        assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["USER_SETTING"] == "kept"


def test_cache_on_a_fresh_clone_builds_the_demo_assets_first(tmp_path):
    demo_dir = tmp_path / "demo"
    calls = run_make(tmp_path, "cache", f"DEMO_DIR={demo_dir}")
    assert [c["argv"][0] for c in calls] == ["demo-data", "tiny-model", "cache"]
    assert calls[0]["env"]["HF_HUB_OFFLINE"] == "1"  # building the tiny assets never touches the hub
    assert "HF_HUB_OFFLINE" not in calls[2]["env"]
    (demo_dir / "tiny-sdxl").mkdir(parents=True)
    (demo_dir / "tiny-sdxl" / "model_index.json").write_text("{}")
    assert [c["argv"][0] for c in run_make(tmp_path, "cache", f"DEMO_DIR={demo_dir}")] == ["cache"]


def test_gpu_check_sees_the_gpu(tmp_path):
    (call,) = run_make(tmp_path, "gpu-check")
    assert call["argv"][:2] == ["-m", "bench.gpu_check"]
    assert "CUDA_VISIBLE_DEVICES" not in call["env"] and "DS_ACCELERATOR" not in call["env"]
