"""Which commit a hub revision names: both stages need it (the cache job pins its encoders to it, the
trainer checks that the model it trains is at the commit the cache was made from).

A revision (`main`, a branch such as `fp16`, a tag) can move. Resolution goes through the hub client's
own cache, so `HF_HOME` / `HF_HUB_CACHE` and `HF_HUB_OFFLINE` behave as for any `from_pretrained`:
offline, `refs/<revision>` of the local cache names the commit; online, the hub is asked (and only the
repo's small marker file is fetched).
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ConfigError

DEFAULT_REVISION = "main"
# The file every repo of the kind has at its top: it is what gets fetched to learn the commit.
PIPELINE_MARKER, VAE_MARKER = "model_index.json", "config.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_commit(revision: str) -> bool:
    """A full 40-hex commit hash: a revision that cannot move."""
    return bool(_COMMIT.match(revision))


def resolve_commit(hub_id: str, revision: str, marker: str, key: str) -> str:
    """The commit hash `revision` of hub repo `hub_id` names, from the hub client's cache (offline) or the
    hub (online, fetching `marker` into the cache). The file lands in `snapshots/<commit>/`, which is how
    the client itself tells which commit a branch or tag pointed to. A revision that cannot be resolved is
    a one-line `ConfigError` naming `key`."""
    if is_commit(revision):
        return revision
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(hub_id, marker, revision=revision))
    except Exception as exc:  # the client's errors (offline miss, unknown repo/revision, network) vary by version
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"config error: {key}: cannot resolve revision {revision!r} of hub model {hub_id!r} "
                          f"to a commit ({type(exc).__name__}: {first})") from None
    commit = path.parent.name
    if not is_commit(commit):
        raise ConfigError(f"config error: {key}: the hub client put {marker} of {hub_id!r} at {path}, not in a "
                          "snapshots/<commit> folder; cannot tell which commit revision "
                          f"{revision!r} names")
    return commit
