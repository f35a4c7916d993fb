"""Fault injection for the reliability tests: SIGKILL this process at a named point of a write protocol.

`LATENTFORGE_FAULT_KILL_AT` holds comma-separated `POINT` or `POINT@N` entries: the process kills itself
(SIGKILL, no cleanup, no flush) the Nth time it reaches POINT (default the first). Unset, a point costs one
environment lookup. The points, each placed where a crash is most likely to leave something half done:

    write:<file name>              an atomic text write: temp file durable, not yet renamed over the target
                                   (write:cache.json, write:summary.json, write:commit.json, write:COMPLETE,
                                   write:latest)
    group:files_written            a cache group's arrays are written, commit.json is not
    group:before_rename            commit.json written in shards/.tmp, group not yet renamed into place
    group:old_moved                a stale group of the same id moved aside, the new one not yet in place
    group:committed                a group is committed and visible
    prompts:files_written          prompt embeddings written, their commit.json not
    prompts:old_moved              old prompts moved aside, new ones not yet renamed into place
    dedup:rewrite                  a group is being rewritten without its cross-shard duplicate keys
    checkpoint:deepspeed_written   DeepSpeed's checkpoint files written, RNG/trainer state and COMPLETE not
    checkpoint:state_written       every file but COMPLETE written
    checkpoint:complete_written    COMPLETE written, `latest` not yet updated
    checkpoint:pruning             an old checkpoint is being deleted (its marker already gone)

Only the tests set the variable; see docs/reliability.md.
"""

from __future__ import annotations

import os
import signal

ENV = "LATENTFORGE_FAULT_KILL_AT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process if `LATENTFORGE_FAULT_KILL_AT` names this point (and this is its Nth hit)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(","):
        point, _, nth = entry.strip().partition("@")
        if point != name:
            continue
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
