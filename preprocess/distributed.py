"""How the ranks of a cache job share the input shards: one atomic counter, no collective in the hot path.

One process counts locally. Under torchrun the counter is the launcher's TCP store (`store.add`), so a
fast rank simply claims more shards; the process group is gloo even on GPUs, because only the store and
one final barrier are used, no tensor traffic.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta


def shard_claims() -> tuple[int, int, Callable[[], int], Callable[[], None]]:
    """(rank, world, claim, barrier). Single process: a local counter. torchrun: the TCP store's counter."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        counter = iter(range(sys.maxsize))
        return 0, 1, lambda: next(counter), lambda: None
    import torch.distributed as dist

    # gloo even on GPUs: only the store and one final barrier are used, no tensor traffic.
    dist.init_process_group("gloo", timeout=timedelta(hours=24))
    store = dist.distributed_c10d._get_default_store()
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    key = f"latentforge/cache/{run_id}/next"
    return dist.get_rank(), dist.get_world_size(), lambda: int(store.add(key, 1)) - 1, dist.barrier
