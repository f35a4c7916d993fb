"""Weighted mixing: quotas by hand, and hypothesis properties of the weighted schedule like the sampler's."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.train.mixing import (
    SourceCounter,
    WeightedBucketSchedule,
    build_schedule,
    source_quotas,
    stream_draws,
)
from latentforge.train.sampler import GlobalBucketSchedule

PROPS = settings(max_examples=40, deadline=None)
DIMS = [512, 640, 768, 1024]


def test_quotas_by_hand() -> None:
    # N = 100 + 20 = 120 slots; equal weights: 60 each; source 1 splits 60 as 15:5 of its 15/5 items.
    cells = {0: {(64, 64): 100}, 1: {(64, 64): 15, (64, 128): 5}}
    q = source_quotas(cells, {0: 1.0, 1: 1.0})
    assert q == {0: {(64, 64): 60}, 1: {(64, 64): 45, (64, 128): 15}}
    # 3:1 weights: 90 and 30; rounding keeps the total.
    q = source_quotas({0: {(64, 64): 7}, 1: {(64, 64): 3}}, {0: 1.0, 1: 2.0})
    assert sum(q[0].values()) + sum(q[1].values()) == 10 and q[1][(64, 64)] == 7  # 10 * 2/3 = 6.67 -> 7


def test_stream_draws_cover_every_item_equally() -> None:
    items = np.arange(10, 17)
    drawn = np.concatenate([stream_draws(items, e, 3, 5, (64, 64), 0) for e in range(7)])  # 21 = 3 cycles
    assert Counter(drawn.tolist()) == {int(i): 3 for i in items}
    again = stream_draws(items, 4, 3, 5, (64, 64), 0)
    assert again.tolist() == drawn[12:15].tolist()


@st.composite
def weighted(draw):
    micro, world, accum = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    gb = micro * world * accum
    n_sources = draw(st.integers(1, 3))
    buckets = draw(st.lists(st.tuples(st.sampled_from(DIMS), st.sampled_from(DIMS)), min_size=1, max_size=3,
                            unique=True))
    item_sources = {b: np.asarray(draw(st.lists(st.integers(0, n_sources - 1), min_size=gb, max_size=30)))
                    for b in buckets}
    weights = {s: draw(st.sampled_from([0.25, 0.5, 1.0, 3.0])) for s in range(n_sources)}
    return item_sources, weights, micro, world, accum, draw(st.integers(0, 2**32 - 1))


def _take(sched, state, n):
    return [(b, items.tolist()) for _, b, items in itertools.islice(sched.global_batches(state), n)]


@PROPS
@given(weighted())
def test_deterministic_layout_free_and_resumable(cfg) -> None:
    item_sources, weights, micro, world, accum, seed = cfg
    gb = micro * world * accum
    sched = WeightedBucketSchedule(item_sources, weights, gb, seed)
    again = WeightedBucketSchedule(item_sources, weights, gb, seed)
    n = min(3 * max(sched.steps_per_epoch, 1) + 1, 30)
    if not sched.steps_per_epoch:
        return
    batches = _take(sched, sched.initial_state(), n)
    assert batches == _take(again, again.initial_state(), n)  # a pure function of the seed
    for bucket, items in batches:
        assert len(items) == gb and all(0 <= i < len(item_sources[bucket]) for i in items)
    # Same global order whatever the (world, micro) layout: rebuild it from every rank's micro-batches.
    for w, m in [(1, 1), (gb, 1), (1, gb)]:
        acc = sched.grad_accum(w, m)
        per_rank = [list(itertools.islice(sched.micro_batches(sched.initial_state(), r, w, m), n * acc)) for r in range(w)]
        rebuilt = [(per_rank[0][k * acc].bucket, [i for a in range(acc) for r in range(w) for i in per_rank[r][k * acc + a].items])
                   for k in range(n)]
        assert rebuilt == batches
    # Resume anywhere, through a JSON round trip of the state: the same continuation.
    for cut in {1, min(sched.steps_per_epoch, n - 1), n - 1}:
        state = sched.load_state(sched.advance(sched.initial_state(), cut).to_dict())
        assert _take(sched, state, n - cut) == batches[cut:]


@PROPS
@given(weighted())
def test_epoch_length_is_items_times_repeats(cfg) -> None:
    item_sources, weights, *_ = cfg
    sched = WeightedBucketSchedule(item_sources, weights, 1, 0)
    assert sum(sched.bucket_sizes.values()) == sum(len(v) for v in item_sources.values())


def test_long_run_shares_follow_weights() -> None:
    # Source 0: 90 items, source 1: 10, in two buckets; weights 1:1 -> half the samples from each.
    rng = np.random.default_rng(0)
    item_sources = {(64, 64): rng.permutation(np.r_[np.zeros(60, int), np.ones(6, int)]),
                    (64, 128): rng.permutation(np.r_[np.zeros(30, int), np.ones(4, int)])}
    sched = WeightedBucketSchedule(item_sources, {0: 1.0, 1: 1.0}, 4, 7)
    counter = SourceCounter(sched, item_sources, 2)
    counter.advance(25 * sched.steps_per_epoch)
    assert counter.shares() == pytest.approx([0.5, 0.5], abs=0.01)
    # Source 1's items are each seen about equally often: the streams balance them exactly, only the carry
    # (which stands in for some of an epoch's fresh draws) jitters the counts, by a few percent.
    seen = Counter()
    for _, b, items in itertools.islice(sched.global_batches(sched.initial_state()), 25 * sched.steps_per_epoch):
        seen.update((b, i) for i in items.tolist() if item_sources[b][i] == 1)
    mean = np.mean(list(seen.values()))
    assert len(seen) == 10 and max(seen.values()) - min(seen.values()) <= 0.1 * mean


def test_counter_replay_matches_running_count() -> None:
    item_sources = {(64, 64): np.array([0, 1, 1, 0, 2, 2, 2])}
    sched = build_schedule(item_sources, {(64, 64): 7}, [1.0, 2.0, 0.5], 2, 3)
    assert isinstance(sched, WeightedBucketSchedule)
    a = SourceCounter(sched, item_sources, 3)
    for _ in range(11):
        a.advance()
    b = SourceCounter(sched, item_sources, 3)
    b.advance(11)
    assert a.counts.tolist() == b.counts.tolist() and a.counts.sum() == 22


def test_unweighted_config_keeps_the_plain_schedule() -> None:
    sched = build_schedule({(64, 64): np.zeros(5, int)}, {(64, 64): 5}, [None], 1, 0)
    assert type(sched) is GlobalBucketSchedule


def test_weights_all_or_none_is_one_line() -> None:
    from latentforge.shared.config_schema import DataConfig

    with pytest.raises(ValueError, match=r"data.sources.1.weight is unset"):
        DataConfig(sources=[{"type": "folder", "path": "a", "weight": 2.0}, {"type": "folder", "path": "b"}])


def test_resume_with_other_weights_is_one_line() -> None:
    from latentforge.shared.config import ConfigError
    from latentforge.shared.config_schema import SourceConfig
    from latentforge.train.mixing import check_resume_weights

    now = [SourceConfig(type="folder", path="a", weight=1.0), SourceConfig(type="folder", path="b", weight=3.0)]
    check_resume_weights([{"weight": 1.0}, {"weight": 3.0}], now)
    with pytest.raises(ConfigError, match=r"^data.sources.1.weight: the checkpoint was trained with weights \[1.0, 2.0\]"):
        check_resume_weights([{"weight": 1.0}, {"weight": 2.0}], now)
