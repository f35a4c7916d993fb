"""Guarantee 5: a config error (misspelt key, wrong type, negative steps, contradictory DeepSpeed batch
settings, a model path that does not exist) stops `latentforge cache` / `latentforge train` with exit
code 2 and one line naming the key, before anything is written. Run through the real console script.
See docs/reliability.md."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from reliability_support import DEMO, run_cli

from latentforge.shared.config import ConfigError, load_config

CACHE_CASES = [
    ("misspelt key", ["cache.batch_sise=4"], "cache.batch_sise: unknown key; did you mean 'batch_size'?"),
    ("wrong type", ["cache.batch_size=four"], "cache.batch_size: Input should be a valid integer"),
    ("negative steps", ["train.max_steps=-5"], "train.max_steps: Input should be greater than 0"),
    ("missing model folder", ["model.pretrained=/nonexistent/tiny-sdxl"], "model.pretrained: folder '/nonexistent"),
    ("missing VAE folder", ["model.vae=./no/such/vae"], "model.vae: folder './no/such/vae' does not exist"),
    ("unknown hub id offline", ["model.pretrained=nobody/no-such-model"], "model.pretrained: 'nobody/no-such-model'"),
    ("missing input shards", ["data.sources=[{type: webdataset, path: '/nonexistent/*.tar'}]"],
     "data.sources[0].path '/nonexistent/*.tar' matched no tar shards"),
]
TRAIN_CASES = [
    ("misspelt key", ["train.max_step=5"], "train.max_step: unknown key; did you mean 'max_steps'?"),
    ("wrong type", ["train.lr=fast"], "train.lr: Input should be a valid number"),
    ("negative steps", ["train.max_steps=-5"], "train.max_steps: Input should be greater than 0"),
    ("contradictory deepspeed batch", ["deepspeed.train_batch_size=7"],
     "deepspeed.train_batch_size=7 contradicts train.micro_batch_size x train.gradient_accumulation_steps"),
    ("misspelt key in the yaml file", ["--config=BAD_YAML"], "train.lrr: unknown key; did you mean 'lr'?"),
]


def assert_one_line_exit_2(rc: int, err: str, command: str, expected: str) -> None:
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("latentforge ")]
    assert len(ours) == 1 and ours[0] == err.strip().splitlines()[-1], err[-3000:]
    assert ours[0].startswith(f"latentforge {command}: ") and expected in ours[0], ours[0]


def cache_argv(model: Path, data: Path, out: Path, extra: list[str]) -> list[str]:
    sources = f"data.sources=[{{type: webdataset, path: '{data}/webdataset/{{00000..00003}}.tar'}}]"
    return ["cache", "--config", str(DEMO), f"model.pretrained={model}", sources, f"cache.path={out / 'cache'}",
            f"train.output_dir={out / 'run'}", *extra]


def train_argv(model: Path, cache: Path, out: Path, extra: list[str], config: Path = DEMO) -> list[str]:
    return ["train", "--config", str(config), f"model.pretrained={model}", f"cache.path={cache}",
            f"train.output_dir={out / 'run'}", "train.num_workers=0", *extra]


def main_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """`latentforge ...` through the same `main` the console script calls (the console script itself is
    run for one case of each command below)."""
    from latentforge.app.cli import main

    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name,extra,expected", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_cache_config_errors(name, extra, expected, tiny_sdxl, demo_data, tmp_path, capsys):
    rc, err = main_in_process(cache_argv(tiny_sdxl, demo_data, tmp_path, extra), capsys)
    assert_one_line_exit_2(rc, err, "cache", expected)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,extra,expected", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_config_errors(name, extra, expected, tiny_sdxl, small_cache, tmp_path, capsys):
    config = DEMO
    if extra == ["--config=BAD_YAML"]:
        config, extra = tmp_path / "bad.yaml", []
        config.write_text(DEMO.read_text().replace("\n  lr: ", "\n  lrr: "))
    rc, err = main_in_process(train_argv(tiny_sdxl, small_cache, tmp_path, extra, config), capsys)
    assert_one_line_exit_2(rc, err, "train", expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_console_script_exits_2_with_one_line(tiny_sdxl, demo_data, small_cache, tmp_path):
    """The installed `latentforge` executable, a fresh interpreter each: stderr holds only that line."""
    def run(argv: list[str], log: str) -> tuple[int, str]:
        rc, _, err = run_cli(argv, tmp_path / log)
        return rc, err

    with ThreadPoolExecutor(2) as pool:
        cache = pool.submit(run, cache_argv(tiny_sdxl, demo_data, tmp_path / "c",
                                            ["model.pretrained=/nonexistent/tiny-sdxl"]), "c-log")
        train = pool.submit(run, train_argv(tiny_sdxl, small_cache, tmp_path / "t", ["train.max_step=5"]), "t-log")
        (crc, cerr), (trc, terr) = cache.result(), train.result()
    assert_one_line_exit_2(crc, cerr, "cache", "model.pretrained: folder '/nonexistent/tiny-sdxl' does not exist")
    assert_one_line_exit_2(trc, terr, "train", "train.max_step: unknown key; did you mean 'max_steps'?")
    assert len(cerr.strip().splitlines()) == 1 and len(terr.strip().splitlines()) == 1, (cerr, terr)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert not (tmp_path / "t" / "run").exists()


@pytest.mark.parametrize("wrong,right,expected", [("\ntrain:\n", "\ntrian:\n", "trian: unknown key; did you mean 'train'"),
                                                  ("  max_steps: ", "  max_step: ", "train.max_step: unknown key")])
def test_a_misspelt_required_key_is_named(wrong, right, expected, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace(wrong, right))
    with pytest.raises(ConfigError, match=expected):
        load_config(bad)


def test_trainer_names_a_missing_model_folder(tiny_sdxl, small_cache, tmp_path):
    from latentforge.train.trainer import Trainer

    config = load_config(DEMO, ["model.pretrained=/nonexistent/tiny-sdxl", f"cache.path={small_cache}",
                                f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="model.pretrained: folder '/nonexistent/tiny-sdxl' does not exist"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_contradictory_deepspeed_settings_fail_before_the_process_group(tiny_sdxl, small_cache, tmp_path, monkeypatch):
    from latentforge.train import trainer

    def too_late():
        raise AssertionError("the process group was started before the DeepSpeed settings were checked")

    monkeypatch.setattr(trainer, "init_distributed", too_late)
    config = load_config(DEMO, [f"model.pretrained={tiny_sdxl}", f"cache.path={small_cache}",
                                f"train.output_dir={tmp_path / 'run'}", "deepspeed.train_batch_size=7"])
    with pytest.raises(ConfigError, match="deepspeed.train_batch_size"):
        trainer.Trainer(config)


def test_preflight_names_the_key_for_the_trainer_too(tmp_path):
    """The helper the trainer needs (shared/preflight.py), on a train-style config."""
    from latentforge.shared.preflight import check_model_paths

    config = load_config(DEMO, ["model.pretrained=/nonexistent/model", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^config error: model.pretrained: folder '/nonexistent/model' does not exist"):
        check_model_paths(config)
