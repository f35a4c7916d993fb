"""The base of every config section and the types several sections share."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from .families import FAMILY_FACTS

FAMILIES = tuple(FAMILY_FACTS)
Family = Literal[FAMILIES]  # type: ignore[valid-type]  # the facts table is the one list of families
StoreDtype = Literal["bfloat16", "float16"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    """A config section. Strict: a misspelt key must fail loudly, and "1e-5" in YAML must not silently
    become a string."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)
