"""Run evaluation: FID, KID, IS, CLIP score, LPIPS diversity and HPSv2.1 of images generated from the cache.

`generate` makes the images (split over ranks), `scores` computes each metric through its library,
`backbones` and `weights` load the metric networks from local files or one download, `run` ties one
evaluation together for the trainer (`train.eval_every`), `cli` is `latentforge evaluate`.
"""

from __future__ import annotations

from typing import Any


def check_evaluation(config: Any, is_main: bool) -> None:
    """Before training starts: evaluation settings the schema cannot judge, and (main rank) every backbone
    loaded once, so missing weights end the run at step 0 with one line, not at the first evaluation."""
    t = config.train
    if not t.eval_every:
        return
    if t.controlnet.enabled:
        from latentforge.shared.config import ConfigError

        raise ConfigError("train.eval_every: evaluation does not support ControlNet runs yet; set it to 0")
    if is_main:
        from .backbones import load_backbones

        load_backbones(t.eval, t.eval.metrics)
