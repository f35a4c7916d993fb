"""Each family's denoiser adapter in the trainer, one module per family; the registry below is the list.

The training loop only talks to `DenoiserAdapter`; adding a family adds one module here (and one in
`preprocess/families/`), never a branch in the loop. Nothing here imports a text encoder.
"""

from __future__ import annotations

from .base import DenoiserAdapter
from .pixart_sigma import PixArtSigmaAdapter
from .sana import SanaAdapter
from .sd import Sd1Adapter, Sd2Adapter
from .sdxl import SdxlAdapter
from .stable_cascade import StableCascadeAdapter

__all__ = ["ADAPTERS", "DenoiserAdapter", "adapter_for"]

ADAPTERS: dict[str, type[DenoiserAdapter]] = {"sdxl": SdxlAdapter, "sd1": Sd1Adapter, "sd2": Sd2Adapter,
                                              "pixart_sigma": PixArtSigmaAdapter, "sana": SanaAdapter,
                                              "stable_cascade": StableCascadeAdapter}


def adapter_for(family: str) -> DenoiserAdapter:
    """A fresh adapter for `family`; an unknown family is a one-line error naming the supported ones."""
    try:
        return ADAPTERS[family]()
    except KeyError:
        raise ValueError(f"model.family {family!r}: the trainer supports {', '.join(ADAPTERS)} so far") from None
