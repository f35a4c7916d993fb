"""The config contract: typed, validated, one-line errors naming the key, dotted overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.shared.config import ConfigError, describe_config, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.model.pretrained and config.data.sources and config.cache.path and config.train.output_dir


def test_public_contract_keys_keep_their_names():
    config = load_config(ROOT / "configs" / "demo.yaml")
    for dotted in ["model.pretrained", "model.family", "data.sources", "cache.path", "train.output_dir",
                   "train.max_steps", "train.seed"]:
        node = config
        for part in dotted.split("."):
            node = getattr(node, part)
    assert config.model.family == "sdxl"


def test_overrides_apply_and_parse_yaml_scalars():
    config = load_config(ROOT / "configs" / "demo.yaml",
                         ["train.lr=1e-5", "cache.path=out/c", "buckets.resolutions=[512, 768]", "cache.flip=true",
                          "data.sources.0.repeats=3"])
    assert config.train.lr == 1e-5 and config.cache.path == "out/c"
    assert config.buckets.resolutions == [512, 768] and config.cache.flip is True
    assert config.data.sources[0].repeats == 3


@pytest.mark.parametrize("override,words", [
    ("trian.lr=1", ["trian", "did you mean 'train'"]),
    ("train.max_stepz=3", ["train.max_stepz", "did you mean 'max_steps'"]),
    ("train.max_steps=-5", ["train.max_steps", "greater than 0", "-5"]),
    ("train.lr=fast", ["train.lr", "valid number"]),
    ("model.family=sd9", ["model.family", "sd9"]),
    ("data.sources.0.type=zip", ["data.sources[0].type", "zip"]),
    ("buckets.min_aspect=5", ["buckets", "min_aspect"]),
    ("buckets.resolutions=[1000]", ["resolutions", "multiple of step"]),
    ("cache.latent_mode=sample", ["cache.latent_mode"]),
    ("data.sources.0.storage_options={secret: x}", ["storage_options.secret", "environment"]),
    ("data.sources.0.filters=[{field: a, op: '~', value: 1}]", ["data.sources[0].filters[0].op"]),
    ("train.max_steps", ["expected key.path=value"]),
    ("data.sources.7.type=folder", ["data.sources.7", "list index"]),
])
def test_errors_are_one_line_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_missing_required_section_and_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .* not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"model": {"pretrained": "x"}}))
    with pytest.raises(ConfigError, match="required key is missing"):
        load_config(bad)
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


def test_every_field_is_documented():
    text = describe_config()
    for line in text.splitlines():
        if line.startswith("  "):
            assert line.split("): ", 1)[1].strip(), f"undocumented: {line}"
    for key in ["model.pretrained", "cache.path", "train.max_steps", "data.sources[].type", "upscale.model_path"]:
        assert key in text


@settings(max_examples=50, deadline=None)
@given(value=st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)))
def test_override_values_round_trip_through_yaml(value):
    (key, parsed), = parse_overrides([f"a.b={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
    assert key == "a.b"
    assert parsed == value or (isinstance(value, str) and str(parsed) == value)
