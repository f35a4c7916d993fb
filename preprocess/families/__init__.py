"""Each family's text side in the cache job, one module per family; the registry below is the list.

A family module holds the class that turns captions into that family's cached text fields, through the
family pipeline's own `encode_prompt` where diffusers has one. The latent side is shared (`VaeEncoder`,
with the autoencoder class from the family facts).
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from .pixart_sigma import PixArtText
from .sana import SanaText
from .sd import SdText
from .sdxl import SdxlText
from .stable_cascade import StableCascadeText

TEXT_ENCODERS: dict[str, type] = {"sdxl": SdxlText, "sd1": SdText, "sd2": SdText, "pixart_sigma": PixArtText,
                                  "sana": SanaText, "stable_cascade": StableCascadeText}


def load_text_encoder(config: Config, device: torch.device) -> Any:
    """The family's text encoder for this config, loaded on `device`."""
    try:
        cls = TEXT_ENCODERS[config.model.family]
    except KeyError:
        raise ValueError(
            f"model.family {config.model.family!r}: the cache job supports {', '.join(TEXT_ENCODERS)}"
        ) from None
    return cls(config, device)
