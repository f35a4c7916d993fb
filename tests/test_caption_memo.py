"""Each distinct caption of a shard is encoded once; repeats get the very same tensors."""

from __future__ import annotations

import torch

from latentforge.preprocess.caption_memo import CaptionMemo


def _encoder(calls: list[list[str]]):
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        calls.append(list(captions))
        # A stand-in whose rows depend on the batch (as a real encoder's may, in the last bits).
        base = torch.tensor([float(sum(map(ord, c))) for c in captions])
        return {"prompt_embeds": base[:, None, None] + 0.001 * len(captions) * torch.ones(len(captions), 2, 3),
                "pooled_prompt_embeds": base[:, None].repeat(1, 4)}
    return encode


def test_repeats_are_encoded_once_and_share_identical_rows():
    calls: list[list[str]] = []
    memo = CaptionMemo(_encoder(calls))
    out = memo.encode(["a dog", "a cat", "a dog", "a dog"])
    assert calls == [["a dog", "a cat"]]
    assert torch.equal(out["prompt_embeds"][0], out["prompt_embeds"][2]) and out["prompt_embeds"].shape == (4, 2, 3)
    again = memo.encode(["a cat", "a bird"])
    assert calls[-1] == ["a bird"] and torch.equal(again["prompt_embeds"][0], out["prompt_embeds"][1])
    assert (memo.encoded, memo.reused) == (3, 3)
    memo.reset()
    memo.encode(["a cat"])
    assert calls[-1] == ["a cat"]


def test_memory_bound_drops_the_least_recently_used():
    calls: list[list[str]] = []
    row_bytes = (2 * 3 + 4) * 4
    memo = CaptionMemo(_encoder(calls), max_bytes=2 * row_bytes)
    memo.encode(["a", "b"])
    memo.encode(["a"])  # a is now the most recent
    memo.encode(["c"])  # b goes
    memo.encode(["a", "b"])
    assert calls[-1] == ["b"]
