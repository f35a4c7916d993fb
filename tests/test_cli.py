"""The `latentforge` command: subcommands, config errors exit 2 with one line, and the wing boundaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentforge.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_config_command_prints_resolved_config(capsys):
    assert main(["config", "--config", str(ROOT / "configs/demo.yaml"), "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "pretrained: demo/tiny-sdxl" in out


def test_config_error_exits_2_with_one_line(capsys):
    assert main(["config", "--config", str(ROOT / "configs/demo.yaml"), "train.max_steps=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.max_steps" in err


def test_help_config_lists_keys(capsys):
    assert main(["config", "--help-config"]) == 0
    assert "cache.path" in capsys.readouterr().out


def test_console_script_is_installed(tmp_path):
    exe = Path(sys.executable).parent / "latentforge"
    result = subprocess.run([str(exe), "demo-data", "--out", str(tmp_path / "d")], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "28 samples" in result.stdout
    bad = subprocess.run([str(exe), "config", "--config", "missing.yaml"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_tiny_model_subcommand(tmp_path, capsys):
    assert main(["tiny-model", "--family", "sdxl", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").exists()


def test_package_maps_three_folders_under_one_namespace():
    import latentforge.preprocess
    import latentforge.shared
    import latentforge.train

    for mod, folder in [(latentforge.shared, "shared"), (latentforge.preprocess, "preprocess"), (latentforge.train, "train")]:
        assert Path(mod.__file__).parent == ROOT / folder
    site = Path(sys.executable).parents[1] / "lib"
    assert not list(site.glob("python3*/site-packages/shared")), "a generic top-level package leaked into site-packages"


@pytest.mark.parametrize("wing,other", [("preprocess", "train"), ("train", "preprocess")])
def test_wings_never_import_each_other(wing, other):
    for path in (ROOT / wing).rglob("*.py"):
        text = path.read_text()
        assert f"latentforge.{other}" not in text and f"from ..{other}" not in text, f"{path} imports {other}"
