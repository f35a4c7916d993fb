"""Global aspect-ratio-bucket schedule: which cached items every rank trains on, step by step.

Every optimizer step consumes one *global batch* of ``global_batch = micro * world * accum`` items, all from
one bucket, so every micro-batch of that step on every rank has one latent shape and the DeepSpeed ranks stay
in lock-step. The schedule is a pure function of ``(seed, epoch, carry)`` (pure numpy: no torch.distributed,
no I/O), so each rank computes the same plan on its own and nothing has to be broadcast.

Per epoch and bucket the pool is the items carried over from the previous epoch (first, in their order), then
a seeded permutation of the bucket's other items; the pool is cut into global batches and the remainder
(< global_batch) is carried into the next epoch instead of being dropped. Because the pool always holds all
n_b items, each bucket yields n_b // global_batch batches and carries n_b % global_batch items every epoch,
so the number of steps per epoch never changes. A global batch is sliced over ranks and accumulation steps
in (accum, rank) order, so resuming at another world size with the same global batch continues the exact
same global sample order.

With a `ShardWindow` (caches on object stores) the seeded permutation is the shard-window order instead
(`shard_window.py`: shard files shuffled, rows shuffled within windows of a few files) and buckets
interleave window by window; everything above still holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Carries in checkpoints are keyed by the cache's own bucket names ("HxW"), so they read like the cache.
from latentforge.shared.cache_format import bucket_name

from .shard_window import ShardWindow, interleave_windows, shard_window_order

Bucket = tuple[int, int]


@dataclass(frozen=True)
class SamplerState:
    """Where the schedule stands: enough to resume exactly (JSON-able through ``to_dict``)."""

    epoch: int
    step: int  # global batches already consumed in this epoch
    carry: dict[str, tuple[int, ...]]  # carry INTO this epoch, keyed by "HxW"
    global_batch: int  # recorded so a resume with another global batch, seed or order fails loudly
    seed: int
    order: str = "global"  # "global" or `ShardWindow.name` (states from before the option read as global)

    def __post_init__(self) -> None:
        # Canonical form (sorted keys, int tuples, no empty entries): equal states compare equal, and the
        # frozen state cannot alias a caller's mutable lists.
        carry = {str(k): tuple(int(i) for i in v) for k, v in sorted(self.carry.items()) if len(v)}
        object.__setattr__(self, "carry", carry)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "carry": {k: list(v) for k, v in self.carry.items()},
            "global_batch": self.global_batch,
            "seed": self.seed,
            "order": self.order,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplerState:
        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            carry={str(k): tuple(v) for k, v in data["carry"].items()},
            global_batch=int(data["global_batch"]),
            seed=int(data["seed"]),
            order=str(data.get("order", "global")),
        )


@dataclass(frozen=True)
class MicroBatch:
    """One rank's micro-batch: item indices of one bucket, and the global optimizer step it belongs to."""

    bucket: Bucket
    items: tuple[int, ...]
    step: int  # global optimizer step, counted from 0 across epochs
    accum_index: int  # position in [0, grad_accum): the optimizer steps after the last one


class GlobalBucketSchedule:
    """The global batch schedule over aspect-ratio buckets (see the module docstring)."""

    def __init__(self, bucket_sizes: Mapping[Bucket, int], global_batch: int, seed: int,
                 shard_window: ShardWindow | None = None) -> None:
        """`shard_window`: use the shard-window order (`shard_window.py`) instead of a global shuffle."""
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if seed < 0:  # SeedSequence entropy must be non-negative
            raise ValueError(f"seed must be >= 0, got {seed}")
        sizes: dict[Bucket, int] = {}
        for (h, w), n in sorted(bucket_sizes.items()):
            if h < 1 or w < 1 or n < 0:
                raise ValueError(f"bad bucket {h}x{w} with {n} items")
            sizes[(int(h), int(w))] = int(n)
        self.bucket_sizes = sizes
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.steps_per_epoch = sum(n // self.global_batch for n in sizes.values())
        self.shard_window = shard_window
        self.order = shard_window.name if shard_window is not None else "global"
        if shard_window is not None:
            for b, n in sizes.items():
                if len(shard_window.blocks.get(b, ())) != n:
                    raise ValueError(f"shard window: bucket {bucket_name(b)} has {n} items but "
                                     f"{len(shard_window.blocks.get(b, ()))} shard numbers")

    @property
    def starved_buckets(self) -> dict[Bucket, int]:
        """Non-empty buckets that can never fill a global batch: their items are carried forever, never seen."""
        return {b: n for b, n in self.bucket_sizes.items() if 0 < n < self.global_batch}

    def initial_state(self) -> SamplerState:
        return SamplerState(epoch=0, step=0, carry={}, global_batch=self.global_batch, seed=self.seed,
                            order=self.order)

    def check_state(self, state: SamplerState) -> None:
        """Raise ValueError if ``state`` was not produced by a schedule with this global batch, seed and order."""
        if (state.global_batch, state.seed) != (self.global_batch, self.seed):
            raise ValueError(
                f"sampler state has global_batch={state.global_batch}, seed={state.seed} but the schedule "
                f"has global_batch={self.global_batch}, seed={self.seed}; resume with the same values"
            )
        if state.order != self.order:
            raise ValueError(
                f"sampler state has order {state.order} but the schedule has {self.order}; resume with the "
                "same train.shuffle and train.shuffle_window_shards (and a cache with the same shard_rows)"
            )
        if state.epoch < 0 or not 0 <= state.step < max(self.steps_per_epoch, 1):
            raise ValueError(f"sampler state epoch={state.epoch}, step={state.step} is out of range")

    def load_state(self, data: Mapping[str, Any]) -> SamplerState:
        """``SamplerState.from_dict`` plus ``check_state``: the checkpoint-resume entry point."""
        state = SamplerState.from_dict(data)
        self.check_state(state)
        return state

    def grad_accum(self, world: int, micro: int) -> int:
        """Accumulation steps per optimizer step for this layout; the layout must tile the global batch."""
        if world < 1 or micro < 1 or self.global_batch % (world * micro):
            raise ValueError(
                f"global_batch={self.global_batch} is not a multiple of world*micro={world}*{micro}"
            )
        return self.global_batch // (world * micro)

    def _check_epoch_carry(self, epoch: int, carry: Mapping[str, Sequence[int]]) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        unknown = set(carry) - {bucket_name(b) for b in self.bucket_sizes}
        if unknown:
            raise ValueError(f"carry names buckets that are not in the dataset: {sorted(unknown)}")

    def _pools(self, epoch: int, carry: Mapping[str, Sequence[int]]) -> dict[Bucket, np.ndarray]:
        self._check_epoch_carry(epoch, carry)
        pools: dict[Bucket, np.ndarray] = {}
        for bucket, n in self.bucket_sizes.items():
            carried = np.asarray(carry.get(bucket_name(bucket), ()), dtype=np.int64)
            # A carry that does not fit (e.g. the dataset changed since the checkpoint) would silently
            # duplicate or invent items; refuse it instead.
            if carried.size and (
                carried.min() < 0 or carried.max() >= n or np.unique(carried).size < carried.size
            ):
                raise ValueError(
                    f"carry for bucket {bucket_name(bucket)} is not distinct items of 0..{n - 1}"
                )
            rest = np.ones(n, dtype=bool)
            rest[carried] = False
            # SeedSequence entropy, not Python's salted hash(): identical on every rank and every run.
            rng = np.random.default_rng([self.seed, epoch, *bucket])
            if self.shard_window is None:
                fresh = rng.permutation(np.flatnonzero(rest))
            else:
                fresh = self.arrange(bucket, np.flatnonzero(rest), len(carried), rng)
            pools[bucket] = np.concatenate([carried, fresh])
        return pools

    def arrange(self, bucket: Bucket, items: np.ndarray, offset: int, rng: np.random.Generator) -> np.ndarray:
        """Shard-window order of a bucket's fresh items that follow `offset` carried ones in the pool."""
        assert self.shard_window is not None
        sw = self.shard_window
        blocks = np.asarray(sw.blocks[bucket])[items]
        return shard_window_order(items, blocks, sw.window_items(self.global_batch), offset, rng)

    def _carry_out(self, pools: Mapping[Bucket, np.ndarray]) -> dict[str, tuple[int, ...]]:
        gb = self.global_batch
        return {
            bucket_name(b): tuple(p[len(p) - len(p) % gb :].tolist()) for b, p in pools.items() if len(p) % gb
        }

    def epoch_plan(
        self, epoch: int, carry: Mapping[str, Sequence[int]]
    ) -> tuple[list[tuple[Bucket, np.ndarray]], dict[str, tuple[int, ...]]]:
        """The epoch's global batches ``(bucket, items)`` in training order, and the carry into the next epoch."""
        pools = self._pools(epoch, carry)
        gb = self.global_batch
        if self.shard_window is not None:  # each bucket's batches stay in window order
            per_bucket = {b: list(p[: len(p) - len(p) % gb].reshape(-1, gb)) for b, p in pools.items()}
            per_window = self.shard_window.window_items(gb) // gb
            plan = interleave_windows(per_bucket, per_window, np.random.default_rng([self.seed, epoch]))
            return plan, self._carry_out(pools)
        batches: list[tuple[Bucket, np.ndarray]] = []
        for bucket, pool in pools.items():
            full = len(pool) - len(pool) % gb
            batches.extend((bucket, rows) for rows in pool[:full].reshape(-1, gb))
        # Interleave buckets; [seed, epoch] never equals [seed, epoch, h, w] since h, w >= 1 (SeedSequence
        # pads short entropy with zeros, so a bucket of 0 could have collided).
        order = np.random.default_rng([self.seed, epoch]).permutation(len(batches))
        return [batches[i] for i in order], self._carry_out(pools)

    def steps_in_epoch(self, state: SamplerState) -> int:
        """Optimizer steps in ``state``'s epoch (the same for every epoch); ``state.step`` of them are done."""
        self.check_state(state)
        return self.steps_per_epoch

    def advance(self, state: SamplerState, steps: int = 1) -> SamplerState:
        """The state after ``steps`` more optimizer steps; crossing an epoch costs one O(n) pool build."""
        self.check_state(state)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps and not self.steps_per_epoch:
            raise ValueError(self._starved_message())
        epoch, step, carry = state.epoch, state.step + steps, state.carry
        while self.steps_per_epoch and step >= self.steps_per_epoch:
            carry = self._carry_out(self._pools(epoch, carry))
            epoch, step = epoch + 1, step - self.steps_per_epoch
        return SamplerState(epoch, step, carry, self.global_batch, self.seed, self.order)

    def _starved_message(self) -> str:
        return f"no bucket holds a full global batch of {self.global_batch} items: nothing to train on"

    def global_batches(self, state: SamplerState) -> Iterator[tuple[SamplerState, Bucket, np.ndarray]]:
        """Infinite ``(state before the batch, bucket, items)`` from ``state`` on; one plan per epoch."""
        self.check_state(state)  # eagerly, not at the first next()
        if not self.steps_per_epoch:
            raise ValueError(self._starved_message())

        def walk() -> Iterator[tuple[SamplerState, Bucket, np.ndarray]]:
            epoch, step, carry = state.epoch, state.step, state.carry
            while True:
                plan, carry_out = self.epoch_plan(epoch, carry)
                for i in range(step, len(plan)):
                    yield SamplerState(epoch, i, carry, self.global_batch, self.seed, self.order), *plan[i]
                epoch, step, carry = epoch + 1, 0, carry_out

        return walk()

    def micro_batches(self, state: SamplerState, rank: int, world: int, micro: int) -> Iterator[MicroBatch]:
        """Infinite: rank ``rank``'s micro-batches in order; accumulation index a gets global-batch slice
        ``(a * world + rank) * micro`` onwards, so the global order does not depend on the layout."""
        accum = self.grad_accum(world, micro)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        batches = self.global_batches(state)

        def walk() -> Iterator[MicroBatch]:
            for before, bucket, items in batches:
                step = before.epoch * self.steps_per_epoch + before.step
                for a in range(accum):
                    lo = (a * world + rank) * micro
                    yield MicroBatch(bucket, tuple(items[lo : lo + micro].tolist()), step, a)

        return walk()


@dataclass
class MicroBatchSampler:
    """Sampler for ``DataLoader(batch_size=None, sampler=...)`` that yields this rank's ``MicroBatch``es.

    Holds only plain data (no live generator) so it pickles into DataLoader workers; every ``iter()``
    restarts from ``state``, so set ``state`` before building a new iterator on resume.
    """

    schedule: GlobalBucketSchedule
    state: SamplerState
    rank: int
    world: int
    micro: int

    def __post_init__(self) -> None:
        self.schedule.grad_accum(self.world, self.micro)
        self.schedule.check_state(self.state)

    def __iter__(self) -> Iterator[MicroBatch]:
        return self.schedule.micro_batches(self.state, self.rank, self.world, self.micro)
