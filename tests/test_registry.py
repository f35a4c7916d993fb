"""The family facts table is the one list of families: every registry, config and docs row follows it.

Cheap by design: it imports the registries and reads class attributes, configs and docs; it builds no
model. What a family must fill in is the checklist in docs/families.md "Adding a family".
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import diffusers
import pytest

from latentforge.devkit.tiny_models import TINY_BUILDERS
from latentforge.preprocess import effnet
from latentforge.preprocess.families import TEXT_ENCODERS
from latentforge.shared import config
from latentforge.shared.families import EFFNET_CLASS, FAMILY_FACTS
from latentforge.train.families import ADAPTERS, DenoiserAdapter

ROOT = Path(__file__).resolve().parents[1]
FAMILIES_DOC = ROOT / "docs" / "families.md"
# A family's row in docs/families.md: a table line that starts with the family name in backticks.
DOC_ROW = re.compile(r"^\|\s*`([a-z0-9_]+)`\s*\|", re.MULTILINE)


def config_path(family: str) -> Path:
    """`configs/<family>-finetune.yaml`, with underscores written as hyphens (pixart_sigma -> pixart-sigma)."""
    return ROOT / "configs" / f"{family.replace('_', '-')}-finetune.yaml"


def doc_rows() -> list[str]:
    return DOC_ROW.findall(FAMILIES_DOC.read_text(encoding="utf-8"))


def _class_name(annotation: object) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))


def test_config_families_are_the_facts_table():
    assert config.FAMILIES == tuple(FAMILY_FACTS)


def test_facts_entries_are_named_by_their_key():
    for name, facts in FAMILY_FACTS.items():
        assert facts.name == name


@pytest.mark.parametrize("family", list(FAMILY_FACTS))
def test_family_has_text_encoder(family):
    assert family in TEXT_ENCODERS, f"add {family} to TEXT_ENCODERS in preprocess/families/__init__.py"
    encoder = TEXT_ENCODERS[family]
    pipeline_class = getattr(encoder, "pipeline_class", "")
    if pipeline_class:  # encoders that go through a pipeline's encode_prompt name it; it must exist
        assert hasattr(diffusers, pipeline_class), pipeline_class


@pytest.mark.parametrize("family", list(FAMILY_FACTS))
def test_family_has_denoiser_adapter(family):
    assert family in ADAPTERS, f"add {family} to ADAPTERS in train/families/__init__.py"
    adapter = ADAPTERS[family]
    assert issubclass(adapter, DenoiserAdapter)
    assert adapter.family == family
    assert adapter.objective in ("diffusion", "flow", "gdf")

    # The pipeline the adapter validates and exports with takes the facts' autoencoder and the
    # adapter's model class (read from the pipeline's constructor signature, nothing is built).
    params = inspect.signature(getattr(diffusers, adapter.pipeline_class).__init__).parameters
    if FAMILY_FACTS[family].vae_class == EFFNET_CLASS:
        # Stable Cascade's prior pipeline has no autoencoder: the Stage C encoder is ours, the decoder a second pipeline.
        assert "vae" not in params and hasattr(effnet, EFFNET_CLASS)
    else:
        assert _class_name(params["vae"].annotation) == FAMILY_FACTS[family].vae_class
    assert _class_name(params[adapter.model_subfolder].annotation) == adapter.model_class

    # Both stages use the same pipeline where the text side names one (SDXL's encoder has its own code).
    encoder_pipeline = getattr(TEXT_ENCODERS.get(family), "pipeline_class", "")
    if encoder_pipeline:
        assert encoder_pipeline == adapter.pipeline_class


@pytest.mark.parametrize("family", list(FAMILY_FACTS))
def test_family_has_tiny_builder(family):
    assert family in TINY_BUILDERS, f"add {family} to TINY_BUILDERS in devkit/tiny_models.py"
    assert callable(TINY_BUILDERS[family])


@pytest.mark.parametrize("family", list(FAMILY_FACTS))
def test_family_has_config(family):
    path = config_path(family)
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    assert config.load_config(path).model.family == family


@pytest.mark.parametrize("family", list(FAMILY_FACTS))
def test_family_has_docs_row(family):
    assert family in doc_rows(), f"docs/families.md needs a table row starting with | `{family}` |"


def test_no_registry_names_a_family_the_facts_lack():
    facts = set(FAMILY_FACTS)
    for registry, names in (("TEXT_ENCODERS", TEXT_ENCODERS), ("ADAPTERS", ADAPTERS),
                            ("TINY_BUILDERS", TINY_BUILDERS), ("docs/families.md rows", doc_rows())):
        assert set(names) <= facts, f"{registry} has {sorted(set(names) - facts)}, not in FAMILY_FACTS"


def test_every_finetune_config_names_a_known_family():
    paths = sorted((ROOT / "configs").glob("*-finetune.yaml"))
    assert paths
    for path in paths:
        family = config.load_config(path).model.family
        assert family in FAMILY_FACTS and path == config_path(family), path.name
