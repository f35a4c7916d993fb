"""Global bucket schedule: hypothesis properties over random buckets, layouts and seeds, plus unit cases."""

from __future__ import annotations

import itertools
import json
import pickle
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.shared.cache_format import bucket_name
from latentforge.train.sampler import (
    GlobalBucketSchedule,
    MicroBatch,
    MicroBatchSampler,
    SamplerState,
)

PROPS = settings(max_examples=100, deadline=None)
DIMS = [512, 576, 640, 704, 768, 832, 896, 960, 1024]


@st.composite
def configs(draw, trainable: bool = False) -> tuple[dict[tuple[int, int], int], int, int, int, int]:
    """(bucket sizes, micro, world, accum, seed); ``trainable`` forces one bucket to hold a global batch."""
    micro, world, accum = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    gb = micro * world * accum
    buckets = draw(
        st.lists(st.tuples(st.sampled_from(DIMS), st.sampled_from(DIMS)), min_size=1, max_size=6, unique=True)
    )
    sizes = {b: draw(st.integers(0, 40)) for b in buckets}
    if trainable:
        sizes[buckets[0]] = draw(st.integers(gb, max(gb, 40)))
    return sizes, micro, world, accum, draw(st.integers(0, 2**32 - 1))


def layouts(gb: int) -> list[tuple[int, int]]:
    """Every (world, micro) that tiles a global batch of ``gb``."""
    return [(w, m) for w in range(1, gb + 1) for m in range(1, gb + 1) if gb % (w * m) == 0]


def take_global(
    sched: GlobalBucketSchedule, state: SamplerState, n: int
) -> list[tuple[tuple[int, int], list[int]]]:
    return [(b, items.tolist()) for _, b, items in itertools.islice(sched.global_batches(state), n)]


def reassemble(sched: GlobalBucketSchedule, state: SamplerState, world: int, micro: int, n: int) -> list:
    """Rebuild ``n`` global batches from every rank's micro-batches, checking per-step consistency."""
    accum = sched.grad_accum(world, micro)
    per_rank = [
        list(itertools.islice(sched.micro_batches(state, r, world, micro), n * accum)) for r in range(world)
    ]
    first = state.epoch * sched.steps_per_epoch + state.step
    out = []
    for k in range(n):
        parts = [per_rank[r][k * accum + a] for a in range(accum) for r in range(world)]  # (a, r) order
        assert {p.bucket for p in parts} == {parts[0].bucket}, "ranks disagree on the step's bucket"
        assert all(p.step == first + k and len(p.items) == micro for p in parts)
        assert [p.accum_index for p in parts] == [a for a in range(accum) for _ in range(world)]
        out.append((parts[0].bucket, [i for p in parts for i in p.items]))
    return out


@PROPS
@given(configs(trainable=True))
def test_global_batches_are_single_bucket_and_ranks_tile_them(cfg) -> None:
    sizes, micro, world, accum, seed = cfg
    gb = micro * world * accum
    sched = GlobalBucketSchedule(sizes, gb, seed)
    n = min(2 * sched.steps_per_epoch + 1, 40)
    batches = take_global(sched, sched.initial_state(), n)
    for bucket, items in batches:
        assert len(items) == gb and all(0 <= i < sizes[bucket] for i in items)
    assert reassemble(sched, sched.initial_state(), world, micro, n) == batches


@PROPS
@given(configs())
def test_epoch_accounting_and_carry(cfg) -> None:
    sizes, micro, world, accum, seed = cfg
    gb = micro * world * accum
    sched = GlobalBucketSchedule(sizes, gb, seed)
    assert sched.starved_buckets == {b: n for b, n in sizes.items() if 0 < n < gb}
    assert sched.steps_per_epoch == sum(n // gb for n in sizes.values())
    carry: dict[str, tuple[int, ...]] = {}
    stream = []
    for epoch in range(4):
        plan, carry_out = sched.epoch_plan(epoch, carry)
        assert len(plan) == sched.steps_per_epoch
        stream += [(b, items.tolist()) for b, items in plan]
        for bucket, n in sizes.items():
            name = bucket_name(bucket)
            consumed = [i for b, items in plan if b == bucket for i in items.tolist()]
            out = carry_out.get(name, ())
            assert len(set(consumed)) == len(consumed), "an item repeats within an epoch"
            assert len(consumed) == n - len(out)
            assert len(out) == (n % gb if n >= gb else n)
            assert sorted(consumed + list(out)) == list(range(n)), "item dropped or duplicated"
            if n >= gb:  # carried items go first, so they are never carried twice in a row
                assert set(carry.get(name, ())) <= set(consumed)
                assert len(out) < gb
            else:
                assert not consumed
        carry = carry_out
    if sched.steps_per_epoch:  # the streaming API walks exactly the epoch plans
        assert take_global(sched, sched.initial_state(), len(stream)) == stream


@PROPS
@given(configs(trainable=True), st.integers(0, 2**32 - 1))
def test_deterministic_in_seed(cfg, other_seed) -> None:
    sizes, micro, world, accum, seed = cfg
    gb = micro * world * accum
    n = 3 * GlobalBucketSchedule(sizes, gb, seed).steps_per_epoch
    a = take_global(GlobalBucketSchedule(sizes, gb, seed), SamplerState(0, 0, {}, gb, seed), n)
    assert a == take_global(
        GlobalBucketSchedule(dict(reversed(sizes.items())), gb, seed), SamplerState(0, 0, {}, gb, seed), n
    )
    # A different seed: with 40 items and a small global batch an identical plan has probability ~1/40!.
    rich = {**sizes, (1088, 1088): 40}
    plans = [
        GlobalBucketSchedule(rich, 1 + seed % 4, s).epoch_plan(0, {})[0]
        for s in (seed, seed ^ (other_seed | 1))
    ]
    assert [(b, x.tolist()) for b, x in plans[0]] != [(b, x.tolist()) for b, x in plans[1]]


@PROPS
@given(configs(trainable=True), st.data())
def test_resume_continues_the_same_order_at_any_layout(cfg, data) -> None:
    sizes, micro, world, accum, seed = cfg
    gb = micro * world * accum
    sched = GlobalBucketSchedule(sizes, gb, seed)
    k = data.draw(st.integers(0, 3 * sched.steps_per_epoch), label="k")
    m = data.draw(st.integers(1, 2 * sched.steps_per_epoch), label="m")
    full = take_global(sched, sched.initial_state(), k + m)
    state = sched.advance(sched.initial_state(), k)
    assert state == next(itertools.islice(sched.global_batches(sched.initial_state()), k, None))[0]
    assert sched.advance(sched.advance(sched.initial_state(), k), m) == sched.advance(
        sched.initial_state(), k + m
    )
    # A fresh process: schedule rebuilt from scratch, state loaded back from its JSON checkpoint.
    fresh = GlobalBucketSchedule(dict(sizes), gb, seed)
    resumed = fresh.load_state(json.loads(json.dumps(state.to_dict())))
    assert take_global(fresh, resumed, m) == full[k:]
    # Same global batch, another (world, micro, accum): the global sample order is unchanged.
    world2, micro2 = data.draw(st.sampled_from(layouts(gb)), label="layout")
    assert (
        reassemble(sched, sched.initial_state(), world, micro, k)
        + reassemble(fresh, resumed, world2, micro2, m)
        == full
    )


@PROPS
@given(configs(trainable=True), st.integers(0, 30), st.integers(1, 5))
def test_state_round_trip_and_mismatch(cfg, k, bump) -> None:
    sizes, micro, world, accum, seed = cfg
    gb = micro * world * accum
    sched = GlobalBucketSchedule(sizes, gb, seed)
    state = sched.advance(sched.initial_state(), k)
    assert 0 <= state.step < sched.steps_per_epoch == sched.steps_in_epoch(state)
    assert all(0 < len(v) < gb for v in state.carry.values())
    assert SamplerState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert sched.load_state(state.to_dict()) == state
    for other in (GlobalBucketSchedule(sizes, gb + bump, seed), GlobalBucketSchedule(sizes, gb, seed + bump)):
        with pytest.raises(
            ValueError,
            match=rf"global_batch={gb}, seed={seed}\b.*global_batch={other.global_batch}, seed={other.seed}\b",
        ):
            other.load_state(state.to_dict())
        with pytest.raises(ValueError, match="global_batch="):
            other.global_batches(state)


def test_starved_and_exact_buckets() -> None:
    sched = GlobalBucketSchedule({(512, 512): 8, (512, 768): 3, (768, 512): 0, (640, 640): 13}, 8, seed=7)
    assert sched.starved_buckets == {(512, 768): 3}
    assert sched.steps_per_epoch == 2
    carry: dict[str, tuple[int, ...]] = {}
    for epoch in range(5):
        plan, carry = sched.epoch_plan(epoch, carry)
        exact = [items.tolist() for b, items in plan if b == (512, 512)]
        assert len(exact) == 1 and sorted(exact[0]) == list(range(8))
        assert "512x512" not in carry and "768x512" not in carry
        assert sorted(carry["512x768"]) == [0, 1, 2] and len(carry["640x640"]) == 5
    # Epochs reshuffle: the exact bucket's order changes between epochs (fixed seed, checked once).
    orders = {tuple(x.tolist()) for e in range(5) for b, x in sched.epoch_plan(e, {})[0] if b == (512, 512)}
    assert len(orders) > 1


def test_all_starved_and_invalid_inputs() -> None:
    sched = GlobalBucketSchedule({(512, 512): 3}, 4, seed=0)
    assert sched.epoch_plan(0, {})[0] == [] and sorted(sched.epoch_plan(0, {})[1]["512x512"]) == [0, 1, 2]
    assert sched.advance(sched.initial_state(), 0) == sched.initial_state()
    with pytest.raises(ValueError, match="no bucket holds"):
        sched.global_batches(sched.initial_state())
    with pytest.raises(ValueError, match="no bucket holds"):
        sched.advance(sched.initial_state())
    sched = GlobalBucketSchedule({(512, 512): 12}, 4, seed=0)
    with pytest.raises(ValueError, match="not a multiple"):
        sched.micro_batches(sched.initial_state(), 0, 3, 1)
    with pytest.raises(ValueError, match="rank"):
        sched.micro_batches(sched.initial_state(), 2, 2, 1)
    with pytest.raises(ValueError, match="not distinct items"):
        sched.epoch_plan(0, {"512x512": (3, 12)})
    with pytest.raises(ValueError, match="not distinct items"):
        sched.epoch_plan(0, {"512x512": (3, 3)})
    with pytest.raises(ValueError, match="not in the dataset"):
        sched.epoch_plan(0, {"64x64": (1,)})
    with pytest.raises(ValueError, match="out of range"):
        sched.global_batches(SamplerState(0, 3, {}, 4, 0))


def test_micro_batch_sampler_pickles_and_feeds_a_dataloader() -> None:
    sched = GlobalBucketSchedule({(512, 512): 10, (768, 512): 7}, 4, seed=3)
    sampler = MicroBatchSampler(sched, sched.advance(sched.initial_state(), 5), rank=1, world=2, micro=1)
    expected = list(itertools.islice(iter(sampler), 12))
    assert list(itertools.islice(iter(pickle.loads(pickle.dumps(sampler))), 12)) == expected
    assert Counter(type(x) for x in expected) == {MicroBatch: 12}
    torch = pytest.importorskip("torch")

    class Rows(torch.utils.data.Dataset):
        def __getitem__(self, mb: MicroBatch) -> tuple[tuple[int, int], np.ndarray]:
            return mb.bucket, np.asarray(mb.items)

    loader = torch.utils.data.DataLoader(Rows(), batch_size=None, sampler=sampler)
    got = [(tuple(b), x.tolist()) for b, x in itertools.islice(loader, 12)]
    assert got == [(mb.bucket, list(mb.items)) for mb in expected]
