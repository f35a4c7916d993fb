"""What counts as a credential in a config, and how to show a config without one.

Credentials (S3/R2 keys, tokens, passwords) come from the environment or a credentials file, never from
the config: a config is copied into checkpoints, cache manifests, TensorBoard and printed by
`latentforge config`. So the config refuses them wherever they hide (a key of `storage_options` at any
depth, the userinfo of a URL anywhere in the tree), and whatever is shown is redacted once more in case a
new place slips past the refusal.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# Option names credentials travel under (s3fs key/secret/token, botocore's aws_* names, adlfs
# account_key/sas_token, gcsfs token, DeepSpeed monitors' api_key). Matched on whole name parts, so
# `max_tokens` is not a token.
_SECRET_EXACT = {"key", "secret", "token", "password", "passwd", "credential", "credentials", "auth"}
_SECRET_PARTS = {"secret", "password", "passwd", "token", "credential", "credentials", "apikey", "auth"}
_SECRET_PAIRS = ("access_key", "account_key", "private_key", "api_key", "session_key", "secret_key")
# Query parameters of presigned URLs and token-in-URL schemes.
_SECRET_PARAM = re.compile(r"sig|token|key|secret|credential|password|auth", re.IGNORECASE)
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@?#]*)@")
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    """Whether an option name is one credentials travel under (`aws_secret_access_key`, `token`, ...)."""
    lowered = name.lower()
    parts = [p for p in re.split(r"[^a-z0-9]+", lowered) if p]
    joined = "_".join(parts)
    return lowered in _SECRET_EXACT or any(p in _SECRET_PARTS for p in parts) or any(x in joined for x in _SECRET_PAIRS)


def url_has_userinfo(value: str) -> bool:
    """`s3://key:secret@bucket/x`, `https://user:pass@host/x`: a credential written into the URL itself."""
    return bool(_URL_USERINFO.match(value))


def _walk(tree: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, key, value) for every entry of nested dicts and lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            sub = f"{path}.{k}" if path else str(k)
            yield sub, k, v
            yield from _walk(v, sub)
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            sub = f"{path}.{i}" if path else str(i)
            yield sub, i, v
            yield from _walk(v, sub)


def find_credential(tree: Any, *, names: bool, path: str = "") -> str | None:
    """The dotted path of the first credential in `tree`, or None.

    `names=True` also treats every credential-like option NAME as one (for `storage_options`, where any
    such key is a secret); URLs with userinfo are found at any depth either way. The value itself is never
    part of what is returned, so the caller can put the path in an error message.
    """
    if isinstance(tree, str):
        return path if url_has_userinfo(tree) else None
    for sub, key, value in _walk(tree, path):
        if names and isinstance(key, str) and is_secret_name(key) and value not in (None, "", False):
            return sub
        if isinstance(value, str) and url_has_userinfo(value):
            return sub
    return None


def credential_error(where: str, *, in_url: bool) -> str:
    """The one line for a refused credential: names the key path and the fix, never the value."""
    if in_url:
        return (f"{where}: a URL with a user name or password; credentials must not be written into the config: "
                "drop 'user:pass@' and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a credentials file")
    if where.startswith("train.wandb"):
        return f"{where}: the wandb API key must come from WANDB_API_KEY or ~/.netrc (wandb login), not the config"
    return (f"{where}: credentials must come from the environment or a credentials file, not the config "
            "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")


def redact_url(url: str) -> str:
    """A URL safe to log or store: userinfo and credential-like query values replaced by ***."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = f"{REDACTED}@" + host.rsplit("@", 1)[1]
    path, q, query = path.partition("?")
    if query:
        params = [p.partition("=") for p in query.split("&")]
        query = "&".join(k + eq + (REDACTED if _SECRET_PARAM.search(k) else v) for k, eq, v in params)
    return f"{scheme}://{host}{slash}{path}{q}{query}"


def redact_tree(tree: Any) -> Any:
    """A copy of a config tree with every value that could be a credential replaced by ***.

    Credential-like keys lose their value at any depth; URLs lose their userinfo and signed query values.
    """
    if isinstance(tree, dict):
        return {k: (REDACTED if isinstance(k, str) and is_secret_name(k) and v not in (None, "", False, {}, [])
                    else redact_tree(v)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact_tree(v) for v in tree]
    if isinstance(tree, str):
        return redact_url(tree)
    return tree
