"""Scalars, images, text and hparams of a run, fanned out to its sinks (main rank only), and throughput figures.

`train.report_to` picks the sinks: TensorBoard (`TensorBoardSink`, OUTPUT/tensorboard) and wandb
(`wandb_sink.WandbSink`); every call of `Metrics` goes to each, so they show the same numbers. Besides
loss/lr/grad norm, it logs the share of step time spent waiting for the DataLoader (what torchtitan calls
data_loading %): the number that says whether the cache reader keeps up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class Sink(Protocol):
    """Where a run's figures go: one per `train.report_to` entry."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def image(self, key: str, image: np.ndarray, step: int) -> None: ...
    def text(self, key: str, value: str, step: int) -> None: ...
    def hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """A SummaryWriter on OUTPUT/tensorboard."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(key, image, step, dataformats="HWC")

    def text(self, key: str, value: str, step: int) -> None:
        self.writer.add_text(key, value, step)

    def hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        self.writer.add_hparams(hparams, final, run_name=".")

    def close(self) -> None:
        self.writer.close()


class Metrics:
    """Fans every figure out to `sinks` (`open_metrics`); with none (every rank but the main one), a silent
    no-op that still counts the throughput window."""

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.window_start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.steps = 0

    def count(self, samples: int, data_wait: float) -> None:
        self.samples += samples
        self.data_wait += data_wait
        self.steps += 1

    def flush_window(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
        """Log scalars plus this window's samples/s and data-wait share; start a new window."""
        elapsed = max(1e-9, time.perf_counter() - self.window_start)
        figures = {**scalars, "perf/samples_per_s": self.samples / elapsed,
                   "perf/data_wait_share": self.data_wait / elapsed, "perf/steps_per_s": self.steps / elapsed}
        if torch.cuda.is_available():
            figures["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for sink in self.sinks:
            sink.scalars(figures, step)
        self.window_start, self.data_wait, self.samples, self.steps = time.perf_counter(), 0.0, 0, 0
        return figures

    def scalar(self, key: str, value: float, step: int) -> None:
        for sink in self.sinks:
            sink.scalars({key: value}, step)

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        """`image` is HxWx3 uint8."""
        for sink in self.sinks:
            sink.image(key, image, step)

    def text(self, key: str, value: str, step: int) -> None:
        for sink in self.sinks:
            sink.text(key, value, step)

    def hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        clean = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
        for sink in self.sinks:
            sink.hparams(clean, final)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_metrics(config: Any, output: Path, enabled: bool) -> Metrics:
    """The run's Metrics: one sink per `train.report_to` entry, on the main rank (`enabled`) only."""
    if not enabled:
        return Metrics()
    sinks: list[Sink] = []
    if "tensorboard" in config.train.report_to:
        sinks.append(TensorBoardSink(output / "tensorboard"))
    if "wandb" in config.train.report_to:
        from .wandb_sink import WandbSink

        sinks.append(WandbSink(config, output))
    return Metrics(sinks)
