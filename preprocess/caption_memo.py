"""Each distinct caption of a shard encoded once: the same tensors for every sample that shares it.

Many samples share a caption (DreamBooth instance and class prompts, templated or tag captions). Encoding
each distinct caption once saves the text encoder's time, and gives every sample of that caption the very
same bytes, which the shard writer then stores once (`shard_writer.py`). The memo lives for one shard:
what a shard's rows hold then depends on the shard alone, never on which shards a process saw before,
so one process and many still write the same cache. It holds at most `max_bytes` of tensors (least
recently used dropped first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Encode = Callable[[list[str]], dict[str, Any]]
MAX_BYTES = 256 << 20


def _nbytes(row: Any) -> int:
    return row.numel() * row.element_size() if isinstance(row, torch.Tensor) else np.asarray(row).nbytes


class CaptionMemo:
    """`encode(captions)` as the text encoder's, encoding only captions not seen in this shard yet."""

    def __init__(self, encode: Encode, max_bytes: int = MAX_BYTES) -> None:
        self._encode, self.max_bytes = encode, max_bytes
        self._rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._bytes = 0
        self.encoded = self.reused = 0  # captions sent to the encoder / answered from the memo

    def reset(self) -> None:
        """Forget every caption: called at the start of each shard."""
        self._rows.clear()
        self._bytes = 0

    def encode(self, captions: Sequence[str]) -> dict[str, Any]:
        """The text fields of `captions` (leading dim = len(captions)), as the encoder returns them."""
        new = [c for c in dict.fromkeys(captions) if c not in self._rows]
        fresh: dict[str, dict[str, Any]] = {}
        if new:
            out = self._encode(list(new))
            fresh = {c: {k: v[i].clone() if isinstance(v, torch.Tensor) else np.array(v[i]) for k, v in out.items()}
                     for i, c in enumerate(new)}
        self.encoded += len(new)
        self.reused += len(captions) - len(new)
        rows = [fresh.get(c) or self._rows[c] for c in captions]
        for c, row in fresh.items():
            self._remember(c, row)
        for c in captions:
            if c in self._rows:
                self._rows.move_to_end(c)
        first = rows[0]
        return {k: torch.stack([r[k] for r in rows]) if isinstance(first[k], torch.Tensor)
                else np.stack([r[k] for r in rows]) for k in first}

    def _remember(self, caption: str, row: dict[str, Any]) -> None:
        size = sum(_nbytes(v) for v in row.values())
        if size > self.max_bytes:
            return
        self._rows[caption] = row
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self._bytes -= sum(_nbytes(v) for v in old.values())
