"""Shard-window order: hypothesis properties (permutation per epoch, ranks disjoint, resume-equal,
deterministic, bounded files per window) over random buckets, shard sizes, windows and layouts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.shared.cache_format import bucket_name
from latentforge.train.sampler import GlobalBucketSchedule
from latentforge.train.shard_window import ShardWindow, shard_window_order

PROPS = settings(max_examples=60, deadline=None)


@st.composite
def windowed(draw) -> tuple[GlobalBucketSchedule, int, int, dict[tuple[int, int], int]]:
    """(schedule, micro, world, sizes): 1-3 buckets of up to 120 items, rows in shard files of
    `shard_rows`, items of a bucket mapped to rows in a random order (as held-out rows and repeats do)."""
    micro, world, accum = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    gb = micro * world * accum
    dims = draw(st.lists(st.sampled_from([(512, 512), (576, 448), (448, 576)]), min_size=1, max_size=3, unique=True))
    sizes = {b: draw(st.integers(0, 120)) for b in dims}
    sizes[dims[0]] = max(sizes[dims[0]], gb)
    shard_rows, shards = draw(st.integers(1, 16)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    blocks = {b: rng.permutation(n) // shard_rows for b, n in sizes.items()}
    sched = GlobalBucketSchedule(sizes, gb, draw(st.integers(0, 2**32 - 1)), ShardWindow(blocks, shards, shard_rows))
    return sched, micro, world, sizes


def take(sched: GlobalBucketSchedule, state, n: int) -> list[tuple[tuple[int, int], list[int]]]:
    return [(b, items.tolist()) for _, b, items in itertools.islice(sched.global_batches(state), n)]


@PROPS
@given(windowed())
def test_each_epoch_is_a_permutation_with_carry(case) -> None:
    sched, _, _, sizes = case
    gb, carry = sched.global_batch, {}
    for epoch in range(3):
        plan, carry_out = sched.epoch_plan(epoch, carry)
        assert len(plan) == sched.steps_per_epoch
        for bucket, n in sizes.items():
            consumed = [i for b, items in plan if b == bucket for i in items.tolist()]
            out = list(carry_out.get(bucket_name(bucket), ()))
            assert sorted(consumed + out) == list(range(n)), "item dropped or duplicated in an epoch"
            assert len(out) == (n % gb if n >= gb else n)
            assert all(len(items) == gb for b, items in plan if b == bucket)
        carry = carry_out


@PROPS
@given(windowed())
def test_ranks_are_disjoint_and_tile_the_global_batch(case) -> None:
    sched, micro, world, _ = case
    accum = sched.grad_accum(world, micro)
    n = min(sched.steps_per_epoch, 20)
    per_rank = [list(itertools.islice(sched.micro_batches(sched.initial_state(), r, world, micro), n * accum))
                for r in range(world)]
    for k, (bucket, items) in enumerate(take(sched, sched.initial_state(), n)):
        parts = [per_rank[r][k * accum + a] for a in range(accum) for r in range(world)]
        assert {p.bucket for p in parts} == {bucket}
        assert [i for p in parts for i in p.items] == items  # disjoint slices that tile the batch


@PROPS
@given(windowed(), st.data())
def test_resume_equals_the_uninterrupted_order(case, data) -> None:
    sched, _, _, sizes = case
    k = data.draw(st.integers(0, 2 * sched.steps_per_epoch))
    m = data.draw(st.integers(1, 2 * sched.steps_per_epoch))
    full = take(sched, sched.initial_state(), k + m)
    state = sched.advance(sched.initial_state(), k)
    assert state.order == sched.shard_window.name
    fresh = GlobalBucketSchedule(dict(sizes), sched.global_batch, sched.seed, sched.shard_window)
    assert take(fresh, fresh.load_state(json.loads(json.dumps(state.to_dict()))), m) == full[k:]
    # Same seed, same plan; a global-order schedule refuses the state instead of replaying another order.
    assert take(fresh, fresh.initial_state(), k + m) == full
    with pytest.raises(ValueError, match="order shard_window"):
        GlobalBucketSchedule(dict(sizes), sched.global_batch, sched.seed).load_state(state.to_dict())


@PROPS
@given(windowed())
def test_a_window_of_batches_touches_few_shard_files(case) -> None:
    sched, _, _, _ = case
    sw, gb = sched.shard_window, sched.global_batch
    per_window = sw.window_items(gb) // gb
    # Files a window can span: its items over the rows of a file (files are full but for one), + 2 ends.
    bound = -(-sw.window_items(gb) // sw.shard_rows) + 2
    plan, _ = sched.epoch_plan(0, {})
    for bucket in sched.bucket_sizes:
        mine = [items for b, items in plan if b == bucket]
        for start in range(0, len(mine), per_window):
            files = {int(sw.blocks[bucket][i]) for items in mine[start: start + per_window] for i in items}
            assert len(files) <= bound


def test_order_is_a_seeded_permutation_of_whole_files_then_windows() -> None:
    items = np.arange(40)
    blocks = items // 10  # 4 files of 10 rows
    a = shard_window_order(items, blocks, 20, 0, np.random.default_rng(1))
    assert sorted(a.tolist()) == items.tolist()
    assert np.array_equal(a, shard_window_order(items, blocks, 20, 0, np.random.default_rng(1)))
    assert len({int(b) for b in blocks[a[:20]]}) == 2 and len({int(b) for b in blocks[a[20:]]}) == 2
    # An offset shortens the first window: 20 - 5 items, then windows of 20.
    b = shard_window_order(items, blocks, 20, 5, np.random.default_rng(1))
    assert len({int(x) for x in blocks[b[:15]]}) == 2
    with pytest.raises(ValueError, match="shard numbers"):
        GlobalBucketSchedule({(512, 512): 40}, 4, 0, ShardWindow({(512, 512): blocks[:3]}, 2, 10))
