"""`cache.deterministic: true` makes a shard's cache bitwise the same for any thread count (issue 20).

On the demo photos at the default thread count, one 256-px batch of 3 came out one bf16 ulp away from
the 1-thread cache (a GroupNorm on a channels-last input sums in per-thread buffers); 3 threads moved a
SiLU chunk boundary too. The job now runs its CPU encoders on one thread (preprocess/determinism.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_support import DEMO, assert_same_cache, snapshot

from latentforge.preprocess.job import run_cache
from latentforge.shared.config import load_config


def _folder_cache(tiny: Path, data: Path, cache: Path, threads: int) -> dict:
    # The demo's folder source holds the 3-image 256x256 batch that differed (shard s1-v000001).
    sources = f"data.sources=[{{type: folder, path: '{data}/folder', caption_field: txt, shard_size: 8}}]"
    config = load_config(DEMO, [f"model.pretrained={tiny}", sources, f"cache.path={cache}",
                                f"train.output_dir={cache.parent / 'run'}"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert run_cache(config) == 0
        # The job pins its own encoders, and gives the caller its thread count back.
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    return snapshot(cache)


@pytest.mark.slow
def test_cache_is_bitwise_the_same_at_one_and_two_threads(tiny_sdxl, demo_data, tmp_path):
    two = _folder_cache(tiny_sdxl, demo_data, tmp_path / "two", 2)
    one = _folder_cache(tiny_sdxl, demo_data, tmp_path / "one", 1)
    assert any(v["latent_mean"].shape == (4, 32, 32) for v in one.values()), "no 256x256 sample: not the case of issue 20"
    assert_same_cache(two, one, "1 vs 2 threads")


def test_pin_is_one_cpu_thread_and_restored():
    from latentforge.preprocess.determinism import pin_deterministic, restored_backends

    before = (torch.get_num_threads(), torch.backends.mkldnn.enabled)
    with restored_backends():
        pin_deterministic(torch.device("cpu"))
        assert torch.get_num_threads() == 1 and not torch.backends.mkldnn.enabled
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == before
