"""Per-source `loss_weight`: each sample's loss is multiplied by its source's weight (DreamBooth's prior loss)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train import DEMO, _rows, _step_setup, _TinyDenoiser

from latentforge.shared.config import load_config


def _loss(setup, batch, weights) -> float:
    from latentforge.train.step import forward_loss

    setup = dataclasses.replace(setup, loss_weights=None if weights is None else torch.tensor(weights))
    return float(forward_loss(_TinyDenoiser(), setup, batch, torch.Generator().manual_seed(3)).loss)


def test_loss_is_instance_plus_weight_times_class() -> None:
    setup = _step_setup(snr_gamma=5.0)
    batch = {**_rows(4, 0), "source_index": torch.tensor([0, 1, 0, 1])}  # 0: instance, 1: class images
    instance, prior = _loss(setup, batch, [1.0, 0.0]), _loss(setup, batch, [0.0, 1.0])
    # Same draws whatever the weights, so the weighted loss is linear in them (min-SNR weights included).
    assert _loss(setup, batch, [1.0, 0.7]) == pytest.approx(instance + 0.7 * prior, rel=1e-6)
    assert _loss(setup, batch, [1.0, 1.0]) == pytest.approx(_loss(setup, batch, None), rel=1e-6)


def test_source_loss_weights_table() -> None:
    from latentforge.train.step import source_loss_weights

    plain = load_config(DEMO)
    assert source_loss_weights(plain) is None  # every source weighs 1: nothing changes
    weighted = load_config(DEMO, ["data.sources.1.loss_weight=0.5"])
    assert source_loss_weights(weighted).tolist() == [1.0, 0.5, 1.0]
