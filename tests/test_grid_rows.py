"""Validation grid rows: base (rendered once at step 0, kept, reused on resume), current, and ema (swapped in)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_train import DEMO, run_in_process, train_args

from latentforge.train.ema import Ema
from latentforge.train.grid_labels import CAPTION_H, NAME_W
from latentforge.train.grid_rows import ema_weights

VALIDATE = ("train.validation_every=2", "train.validation_inference_steps=1",
            "train.checkpoint_every=2")
PANEL = 256  # the square bucket of the small cache
ROW = CAPTION_H + PANEL


def grid(out: Path, step: int) -> np.ndarray:
    return np.asarray(Image.open(out / "validation" / f"step-{step:08d}.png"))


def rows(image: np.ndarray) -> list[np.ndarray]:
    assert image.shape[0] % ROW == 0, image.shape
    return [image[i * ROW:(i + 1) * ROW] for i in range(image.shape[0] // ROW)]


def panels(row: np.ndarray) -> np.ndarray:
    """The images of a labelled row, without its labels."""
    return row[CAPTION_H:, NAME_W:]


def test_ema_weights_swap_in_and_restore_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    ema = Ema(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema_weights(model, ema, sharded=False):
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n].to(torch.bfloat16)) and not torch.equal(p, trained[n])
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


def test_base_current_ema_rows_base_kept_across_validations_and_resume(unet_only_model, small_cache, tmp_path,
                                                                       caplog):
    out = tmp_path / "run"
    # EMA start_step 2: updates 1-2 copy the weights (ema row = current at step 2), 3-4 average with decay 0.5.
    args = train_args(unet_only_model, small_cache, out, "train.max_steps=4", "train.ema.decay=0.5",
                      "train.ema.start_step=2", *VALIDATE)
    with caplog.at_level(logging.INFO, logger="latentforge.train"):
        run_in_process(args, until=2)
    assert "base row rendered" in caplog.text
    kept = out / "validation" / "base.png"
    stamp = kept.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="latentforge.train"):
        run_in_process([*args, "train.resume=latest"])
    assert "base row rendered" not in caplog.text and kept.stat().st_mtime_ns == stamp  # read, not re-rendered

    two, four = grid(out, 2), grid(out, 4)
    assert two.shape == four.shape == (3 * ROW, NAME_W + 2 * PANEL, 3)  # base, current, ema; two prompts
    base2, current2, ema2 = rows(two)
    base4, current4, ema4 = rows(four)
    assert np.array_equal(base2, base4) and np.array_equal(base2, np.asarray(Image.open(kept)))
    assert (base2[CAPTION_H:, :NAME_W] < 128).any()  # its name and step drawn on the left
    assert not np.array_equal(panels(base2), panels(current2))  # trained since step 0
    assert np.array_equal(panels(current2), panels(ema2))  # the EMA still copies the weights
    assert not np.array_equal(panels(current4), panels(ema4))  # decay 0.5 < 1: the average lags
    assert not np.array_equal(panels(ema2), panels(ema4))


def test_lora_base_row_renders_with_adapters_off_after_training(unet_only_model, small_cache, tmp_path):
    from latentforge.shared.config import load_config
    from latentforge.train.trainer import Trainer

    out = tmp_path / "lora"
    trainer = Trainer(load_config(DEMO, train_args(
        unet_only_model, small_cache, out, "train.max_steps=2", "train.lora.enabled=true", "train.lr=1e-2",
        "train.ema.enabled=false", *VALIDATE)))
    trainer.train()
    at_start = np.asarray(Image.open(out / "validation" / "base.png"))
    base, current = rows(grid(out, 2))
    assert np.array_equal(base, at_start) and not np.array_equal(panels(base), panels(current))

    (out / "validation" / "base.png").unlink()  # as if a resumed run found none
    trainer._base_checked = False
    trainer._check_base_row()  # at step 2, adapters disabled: what the model drew at step 0
    assert np.array_equal(trainer.base_row, at_start)
    assert all(p.requires_grad for n, p in trainer.engine.module.named_parameters() if "lora_" in n)
