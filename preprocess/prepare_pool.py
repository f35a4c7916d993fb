"""Image preparation in worker processes, so the encoder never waits for it (`cache.prepare_processes`).

Worker threads (`overlap.ordered_map`) share the job's interpreter: decoding and resizing release the GIL
only in parts, and their Python holds it while the encoder's thread needs it. Here a bounded pool of
processes (spawned: never a fork of a process whose torch threads already run) each builds its own
`Preparer` once and turns raw samples into `Prepared` items with uint8 pixels; the job's process only
converts them to float tensors (`images.u8_to_tensor`, the same arithmetic as the thread path, so the
cache is bit for bit the same). At most `ahead` samples are in flight, in input order.

A worker that dies (a decoder crash, the OOM killer) breaks the whole pool: the pool is restarted, the
sample being waited for is retried alone in the new one, and if that kills it too it is skipped as
`prepare_crashed`; the samples in flight behind it are resubmitted. A bad image is a skip, as on threads.
Model upscaling (`upscale.enabled` with a model) stays on threads: its model lives on the job's device.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from latentforge.shared.config import Config

from .images import SkipSample, u8_to_tensor
from .prepare import Prepared, Preparer
from .sources import RawSample
from .upscale import Upscaler

Result = tuple[list[Prepared] | tuple[str, str], float]  # items or (skip reason, detail); seconds

_PREPARER: Preparer | None = None  # one per worker process, built by `_init`


def _init(config: Config, resolutions: dict[int, tuple[tuple[int, int], ...]]) -> None:
    import logging

    import torch

    torch.set_num_threads(1)  # a worker is one core's worth of preparation
    # The job's process already warned that no upscale model is set; once is enough.
    logging.getLogger(Upscaler.__module__).setLevel(logging.ERROR)
    # Lanczos-only (no model: the job keeps model upscaling on threads), the same code as the job's own.
    upscaler = Upscaler.from_config(config.upscale, "cpu") if config.upscale.enabled else None
    global _PREPARER
    _PREPARER = Preparer(config, resolutions, upscaler, uint8_pixels=True)


def _prepare(raw: RawSample) -> Result:
    assert _PREPARER is not None
    if raw.key == os.environ.get("LATENTFORGE_FAULT_PREPARE_CRASH_KEY"):  # fault injection (tests): die here
        os._exit(13)
    t = time.perf_counter()
    try:
        return _PREPARER(raw), time.perf_counter() - t
    except SkipSample as exc:  # sent back as plain strings: the exception type need not pickle
        return (exc.reason, exc.detail), time.perf_counter() - t


class PreparePool:
    """`processes` spawned workers preparing samples; `map` yields results in input order."""

    def __init__(self, config: Config, resolutions: dict[int, tuple[tuple[int, int], ...]], processes: int) -> None:
        self.config, self.resolutions, self.processes = config, resolutions, processes
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0
        self._booting: list[Future[int]] = []

    def start(self) -> None:
        """Boot the workers now (spawn + imports take seconds), without waiting: `wait_ready` waits."""
        pool = self._executor()
        self._booting = [pool.submit(os.getpid) for _ in range(self.processes)]

    def wait_ready(self) -> None:
        """Block until the workers `start` booted answer, so a shard's time is not their start-up."""
        for future in self._booting:
            try:
                future.result()
            except BrokenProcessPool:
                self._restart()  # the first sample finds out again, and is handled there
        self._booting = []

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init, initargs=(self.config, self.resolutions))
        return self._pool

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.restarts += 1

    def map(self, raws: Iterable[RawSample], ahead: int) -> Iterator[tuple[RawSample, list[Prepared] | SkipSample, float]]:
        """`(raw, items or SkipSample, seconds)` per raw sample, in order, at most `ahead` in flight."""
        window: deque[list[Any]] = deque()  # [raw, future]
        for raw in raws:
            window.append([raw, self._executor().submit(_prepare, raw)])
            if len(window) >= ahead:
                yield self._next(window)
        while window:
            yield self._next(window)

    def _next(self, window: deque[list[Any]]) -> tuple[RawSample, list[Prepared] | SkipSample, float]:
        raw, future = window.popleft()
        try:
            result, seconds = future.result()
        except BrokenProcessPool:
            result, seconds = self._retry_alone(raw)
            for entry in window:  # they were in the broken pool too
                entry[1] = self._executor().submit(_prepare, entry[0])
        if isinstance(result, tuple):
            return raw, SkipSample(*result), seconds
        for item in result:
            item.pixels = u8_to_tensor(item.pixels)
        return raw, result, seconds

    def _retry_alone(self, raw: RawSample) -> Result:
        self._restart()
        retry: Future[Result] = self._executor().submit(_prepare, raw)
        try:
            return retry.result()
        except BrokenProcessPool:
            self._restart()
            return ("prepare_crashed", "the image preparation process died on this sample (twice)"), 0.0

    def close(self) -> None:
        """Stop the workers; queued work is dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
