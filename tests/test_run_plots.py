"""The run's pictures for people without TensorBoard: loss_curve.png and labelled validation grids (unit tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from latentforge.train.grid_labels import CAPTION_H, NAME_W, label_row, shorten, stack_rows
from latentforge.train.loss_curve import (
    PALETTE,
    Axis,
    axes_for,
    draw_curves,
    nice_ticks,
    read_jsonl,
    run_curves,
    write_loss_curve,
)


def _write_log(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "epoch": 0} for s in range(1, 11)]
    lines.insert(5, {"step": 3, "loss": 0.5, "lr": 1e-4, "epoch": 0})  # a resumed run logs step 3 again
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 11, "lo'  # a line cut short by a crash
    (run / "train_log.jsonl").write_text(text)
    (run / "val_log.jsonl").write_text("\n".join(json.dumps({"step": s, "val_loss": 0.8 / s}) for s in (5, 10)) + "\n")


def test_nice_ticks_by_hand():
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]  # 10 / 5 = 2: a 2 step
    assert nice_ticks(0.13, 0.97, 5) == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(1, 1) == [1]
    assert nice_ticks(1, 2, 6) == [1, 1.2, 1.4, 1.6, 1.8, 2] and nice_ticks(1, 2, 6, integer=True) == [1, 2]
    assert nice_ticks(1, 100, 6) == [20, 40, 60, 80, 100]


def test_axis_maps_values_to_pixels_monotonically():
    x = Axis(0, 10, 70, 700)
    assert x.to_pixel(0) == 70 and x.to_pixel(10) == 700 and x.to_pixel(5) == pytest.approx(385)
    y = Axis(0.0, 1.0, 370, 40)  # y grows upwards on screen: larger loss, smaller pixel row
    values = np.linspace(0, 1, 11)
    assert np.all(np.diff([y.to_pixel(v) for v in values]) < 0)
    assert Axis(2, 2, 0, 100).to_pixel(2) == 50


def test_read_jsonl_dedupes_resumed_steps_and_skips_a_cut_line(tmp_path):
    _write_log(tmp_path)
    steps, losses = read_jsonl(tmp_path / "train_log.jsonl", "loss")
    assert steps == list(range(1, 11)) and losses[2] == 0.5  # the later line for step 3 wins
    assert set(run_curves(tmp_path)) == {"loss", "val loss"}
    assert read_jsonl(tmp_path / "missing.jsonl", "loss") == ([], [])


def test_loss_curve_png_draws_each_series_where_the_axes_put_it(tmp_path):
    _write_log(tmp_path)
    path = write_loss_curve(tmp_path)
    assert path == tmp_path / "loss_curve.png"
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (420, 720, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 4  # not blank: axes, text, two colours
    x_axis, y_axis = axes_for(run_curves(tmp_path), (720, 420))
    for (step, value), colour in (((1, 1.0), PALETTE[0]), ((10, 0.1), PALETTE[0]), ((5, 0.16), PALETTE[1])):
        px, py = round(x_axis.to_pixel(step)), round(y_axis.to_pixel(value))
        patch = img[py - 2:py + 3, px - 2:px + 3].reshape(-1, 3)
        assert (patch == colour).all(axis=1).any(), (step, value, colour)
    assert y_axis.to_pixel(1.0) < y_axis.to_pixel(0.1)  # larger loss higher up


def test_write_loss_curve_waits_for_a_step_and_draws_a_single_point(tmp_path):
    assert write_loss_curve(tmp_path) is None
    draw_curves({"loss": ([1.0], [0.5])}, tmp_path / "one.png", "one point")
    assert (tmp_path / "one.png").is_file()


def test_shorten():
    assert shorten("a  cat\non a mat") == "a cat on a mat"
    long = "a photograph of an astronaut riding a horse on the moon, 4k"
    assert len(shorten(long)) == 40 and shorten(long).endswith("...")


def test_label_row_adds_caption_and_name_strips_and_keeps_the_panels():
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 255, (64, 3 * 64, 3), dtype=np.uint8)
    labelled = label_row(grid, ["a red cube", "a photograph of an astronaut riding a horse", "x"], "current", 12)
    assert labelled.shape == (CAPTION_H + 64, NAME_W + 192, 3)
    assert np.array_equal(labelled[CAPTION_H:, NAME_W:], grid)  # the images themselves are untouched
    assert (labelled[:CAPTION_H, NAME_W:] < 128).any()  # prompt text drawn above the panels
    assert (labelled[CAPTION_H:, :NAME_W] < 128).any()  # row name and step drawn left of them
    with pytest.raises(ValueError, match="equal panels"):
        label_row(grid[:, :100], ["a", "b", "c"], "current", 1)


def test_stack_rows_pads_narrow_rows():
    a, b = np.zeros((10, 30, 3), np.uint8), np.zeros((5, 20, 3), np.uint8)
    out = stack_rows([a, b])
    assert out.shape == (15, 30, 3) and (out[10:, 20:] == 255).all()


def test_two_short_runs_write_curves_and_labelled_grids_and_compare_side_by_side(unet_only_model, small_cache,
                                                                                  tmp_path, capsys):
    from test_train import run_in_process, train_args

    from latentforge.app.cli import main

    common = ("train.max_steps=2", "train.checkpoint_every=2", "train.validation_every=2",
              "train.validation_inference_steps=2", "train.held_out_fraction=0.2")
    for name, lr in (("a", "1e-4"), ("b", "3e-4")):
        run_in_process(train_args(unet_only_model, small_cache, tmp_path / name, *common, f"train.lr={lr}"))
        run = tmp_path / name
        assert (run / "loss_curve.png").is_file() and (run / "val_log.jsonl").is_file()
        grid = np.asarray(Image.open(run / "validation" / "step-00000002.png"))
        assert grid.shape[0] > CAPTION_H and (grid[:CAPTION_H, NAME_W:] < 128).any()  # labelled

    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "train.lr" in text and "0.0001" in text and "0.0003" in text and "last val loss" in text
    assert "train.output_dir" not in text  # differs by construction, not worth a line
    curves = Image.open(tmp_path / "cmp" / "loss_curves.png")
    grids = np.asarray(Image.open(tmp_path / "cmp" / "validation_grids.png"))
    one = np.asarray(Image.open(tmp_path / "a" / "validation" / "step-00000002.png"))
    assert curves.size == (720, 420) and grids.shape[0] == 2 * one.shape[0]

    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_compare_prints_the_evaluation_figures_of_either_run(tmp_path: Path, capsys: Any) -> None:
    """Evaluation figures from run_summary.json's `eval` entry; a run without them shows '-'."""
    from latentforge.app.cli import main

    for name, summary in (("a", {"steps": 4, "eval": {"step": 4, "metrics": {"fid": 12.5, "hps": 27.25}}}),
                          ("b", {"steps": 4})):
        run = tmp_path / name
        run.mkdir()
        (run / "run_summary.json").write_text(json.dumps(summary))
        (run / "train_log.jsonl").write_text(json.dumps({"step": 4, "loss": 0.5, "lr": 1e-4}) + "\n")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("eval ")}
    assert "12.5" in lines["fid"] and "27.25" in lines["hps"] and lines["fid"].rstrip().endswith("-")
