"""Caption variants at train time: one of a sample's N cached captions per step, from the batch's generator.

The cache holds variant 0 in each text field (`prompt_embeds`, ...) and variants 1..N-1 in `<field>_alt`
(`preprocess/captions.py`). Each sample draws k uniformly in [0, N) from the micro-batch's seeded generator,
so the choice is the same whatever the number of ranks and is redrawn identically on resume; k > 0 swaps
variant k into the text fields. A cache without variants draws nothing, so such runs are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.families import ALT_SUFFIX


def pick_caption_variants(batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """`batch` with each sample's text fields replaced by a uniformly drawn caption variant (and the
    `*_alt` fields removed); `batch` itself is not modified."""
    alts = [k for k in batch if k.endswith(ALT_SUFFIX)]
    if not alts:
        return batch
    first = torch.as_tensor(batch[alts[0]])
    size, n = first.shape[0], first.shape[1] + 1
    k = torch.randint(0, n, (size,), generator=generator, device=generator.device).cpu()
    out = {key: value for key, value in batch.items() if key not in alts}
    for alt in alts:
        name = alt[: -len(ALT_SUFFIX)]
        base, variants = torch.as_tensor(batch[name]), torch.as_tensor(batch[alt])
        stacked = torch.cat([base.unsqueeze(1), variants.to(base.dtype)], dim=1)  # (B, N, ...)
        out[name] = stacked[torch.arange(size), k.to(stacked.device)]
    return out
