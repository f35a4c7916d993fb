"""TensorBoard scalars, images and the run's throughput figures (main rank only).

Besides loss/lr/grad norm, it logs the share of step time spent waiting for the DataLoader (what
torchtitan calls data_loading %): the number that says whether the cache reader keeps up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Metrics:
    """A SummaryWriter on the main rank; a silent no-op elsewhere."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
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
        if self.writer is not None:
            for key, value in figures.items():
                self.writer.add_scalar(key, value, step)
        self.window_start, self.data_wait, self.samples, self.steps = time.perf_counter(), 0.0, 0, 0
        return figures

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(key, value, step)

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        """`image` is HxWx3 uint8."""
        if self.writer is not None:
            self.writer.add_image(key, image, step, dataformats="HWC")

    def text(self, key: str, value: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(key, value, step)

    def hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        if self.writer is not None:
            clean = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, final, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
