"""Credentials never enter a config: refused at any depth of storage_options, inside URLs anywhere, and
`latentforge config` prints nothing that could be one (issue: secrets come from the environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentforge.app.cli import main
from latentforge.shared.config import Config, ConfigError, load_config, printable_config
from latentforge.shared.secrets import is_secret_name, redact_tree, redact_url

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SECRET = "wJalrXUtnFEMI-lf-test-SECRET"


@pytest.mark.parametrize("override,where", [
    (f"data.sources.0.storage_options={{client_kwargs: {{aws_secret_access_key: {SECRET}}}}}",
     "data.sources.0.storage_options.client_kwargs.aws_secret_access_key"),
    (f"cache.storage_options={{config_kwargs: {{s3: {{session_token: {SECRET}}}}}}}",
     "cache.storage_options.config_kwargs.s3.session_token"),
    (f"cache.storage_options={{key: AKID, secret: {SECRET}}}", "cache.storage_options.key"),
    (f"data.sources.1.storage_options={{token: {SECRET}}}", "data.sources.1.storage_options.token"),
    (f"deepspeed.comet={{enabled: true, api_key: {SECRET}}}", "deepspeed.comet.api_key"),
    (f"data.sources.0.path='s3://AKID:{SECRET}@bucket/shards/{{0..3}}.tar'", "data.sources.0.path"),
    (f"cache.path='https://user:{SECRET}@host/cache'", "cache.path"),
    (f"cache.storage_options={{endpoint_url: 'https://me:{SECRET}@r2.example.com'}}", "cache.storage_options.endpoint_url"),
    (f"model.pretrained='https://me:{SECRET}@host/model'", "model.pretrained"),
])
def test_credentials_are_refused_with_one_line_naming_the_key_not_the_value(override, where):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [override])
    msg = str(info.value)
    assert "\n" not in msg and where in msg and SECRET not in msg
    assert "environment" in msg or "credentials file" in msg


def test_a_config_snapshot_with_a_credential_is_refused_too():
    tree = load_config(DEMO).model_dump(mode="json")
    tree["cache"]["storage_options"] = {"client_kwargs": {"aws_secret_access_key": SECRET}}
    with pytest.raises(ValueError, match="credentials") as info:
        Config.model_validate(tree)
    assert SECRET not in str(info.value)


def test_names_that_look_like_tokens_but_are_not_pass():
    for name in ("max_tokens", "text_max_tokens", "endpoint_url", "client_kwargs", "anon", "caption_field", "region_name"):
        assert not is_secret_name(name), name
    for name in ("key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "session_token", "sas_token",
                 "account_key", "api_key", "password", "client_secret"):
        assert is_secret_name(name), name
    ok = load_config(DEMO, ["cache.storage_options={endpoint_url: 'https://r2.example.com', anon: false}",
                            "cache.max_tokens=150"])
    assert ok.cache.storage_options["endpoint_url"] == "https://r2.example.com"


def test_presigned_and_userinfo_urls_are_redacted():
    assert redact_url("https://u:p@host/a.tar?X-Amz-Signature=s&x=1&token=t") == "https://***@host/a.tar?X-Amz-Signature=***&x=1&token=***"
    assert redact_url("/local/path.tar") == "/local/path.tar"
    tree = {"a": [{"storage_options": {"client_kwargs": {"aws_secret_access_key": SECRET}}}],
            "u": f"s3://k:{SECRET}@b/x", "max_tokens": 150}
    shown = redact_tree(tree)
    assert SECRET not in repr(shown) and shown["max_tokens"] == 150


def test_latentforge_config_prints_no_credential(capsys):
    signed = f"https://cdn.example.com/shards/{{0..3}}.tar?X-Amz-Credential=AKID&X-Amz-Signature={SECRET}"
    assert main(["config", "--config", str(DEMO), f"data.sources.0.path='{signed}'"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "X-Amz-Signature=***" in out
    shown = printable_config(load_config(DEMO, [f"data.sources.0.path='{signed}'"]))
    assert SECRET not in repr(shown)
    rc = main(["config", "--config", str(DEMO), f"cache.storage_options={{client_kwargs: {{aws_secret_access_key: {SECRET}}}}}"])
    captured = capsys.readouterr()
    assert rc == 2 and SECRET not in captured.out + captured.err
    assert "cache.storage_options.client_kwargs.aws_secret_access_key" in captured.err
