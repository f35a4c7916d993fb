"""What `cache.deterministic: true` pins so a shard's tensors are bitwise the same for any process count
and any thread count (docs/caching.md, "Determinism").

On the CPU, PyTorch splits work between intra-op threads at points that depend on the thread count, and
the split changes the rounding:

- oneDNN (mkldnn) picks convolution algorithms by thread count;
- GroupNorm on a channels-last input with H*W >= 1024 sums each (sample, group) in per-thread partial
  buffers (aten/src/ATen/native/cpu/group_norm_kernel.cpp, "impl-2"); diffusers' VAE attention hands its
  output back channels-last to the mid block's next GroupNorm: a 256-px bucket with a batch of 3 came out
  one bf16 ulp apart at 1 and 2 threads (issue 20);
- vectorised elementwise loops (SiLU) compute the tail of each thread's chunk with the scalar function:
  3 threads moved a chunk boundary off the vector width and SiLU differed in the last bit.

So the CPU encoders run on one intra-op thread, the one count every machine gives, and throughput on
more cores comes from more processes (torchrun), which are deterministic (each shard is encoded whole
by one process). On CUDA, cuDNN runs deterministic and without autotuning; CPU threads do not matter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


def pin_deterministic(device: torch.device) -> None:
    """Switch the backends to thread-count-independent results for encoders running on `device`."""
    torch.backends.mkldnn.enabled = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if device.type == "cpu" and torch.get_num_threads() != 1:
        log.info("cache.deterministic: the CPU encoders run on 1 thread per process (was %d); for more "
                 "cores run more processes (torchrun --nproc_per_node) or set cache.deterministic=false",
                 torch.get_num_threads())
        torch.set_num_threads(1)


@contextmanager
def restored_backends() -> Iterator[None]:
    """Give in-process callers (tests, notebooks) their backend switches and thread count back: the cache
    job's settings must not change the numerics or speed of a trainer run in the same process."""
    flags = (torch.backends.mkldnn.enabled, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
