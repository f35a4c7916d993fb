"""sha256 of a local file, memoised by (path, size, mtime): model weights are hashed once per process."""

from __future__ import annotations

import hashlib
import os

_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file at `path`; a file rewritten since the last call is hashed again."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]
