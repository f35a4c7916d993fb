"""Streaming a tar front to back (no seeks, so it works over http and s3) and grouping it into samples.

Grouping follows webdataset: a member's key is its path up to the first dot of its basename
(`dir/000000123.jpg` -> key `dir/000000123`, extension `jpg`), and consecutive members with the same
key form one sample. Unlike plain `tarfile`, a tar cut short is reported instead of ending quietly.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any


class NotATarError(Exception):
    """The stream is not a tar (or compressed tar) at all: nothing could be read from it."""


class TruncatedTarError(Exception):
    """The tar ended early or is corrupt after its first member; earlier groups were valid."""


class HashingReader:
    """A read-only file wrapper that feeds every byte read into a hash (tarfile only calls read())."""

    def __init__(self, raw: IO[bytes], digest: Any) -> None:
        self.raw, self.digest = raw, digest

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Hash the rest of the file: tarfile stops at the end marker, before the record padding, and a
        content hash of the whole file can be checked with any blake2b tool."""
        while self.read(1 << 20):
            pass


class _EndMarkerTarInfo(tarfile.TarInfo):
    """Records whether the archive ended with its all-zero end-of-archive block.

    In stream mode tarfile ends iteration silently on a missing, truncated or garbled header after the
    first member, so a tar cut at a member boundary would look complete. A real end marker raises
    EOFHeaderError here (then tarfile stops as usual); its absence at the end means truncation.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            tarfile_.latentforge_end_marker = True  # type: ignore[attr-defined]
            raise


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) by webdataset's rule, or None for names that are not sample parts."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "." not in base:  # ._x.jpg (macOS), README: never sample members
        return None
    dot = len(name) - len(base) + base.index(".")
    return name[:dot], name[dot + 1 :].lower()


def iter_tar_groups(
    fileobj: Any, on_duplicate: Callable[[str], None]
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample, in tar order.

    Raises NotATarError if the stream is not a tar, TruncatedTarError if it stops early; the group being
    read when that happens is dropped (it may be missing members). A repeated extension within one group
    keeps the first member and calls `on_duplicate(member_name)`.
    """
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndMarkerTarInfo)  # "r|*": gz/bz2/xz too
    except (tarfile.TarError, EOFError) as exc:
        raise NotATarError(str(exc) or type(exc).__name__) from None
    with tar:
        key: str | None = None
        files: dict[str, bytes] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue  # directories and links: webdataset ignores them too
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                if parts[0] != key:  # a new key closes the previous sample: hand it out before reading on
                    if key is not None:
                        yield key, files
                    key, files = parts[0], {}
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if parts[1] in files:
                    on_duplicate(member.name)
                else:
                    files[parts[1]] = data
        except (tarfile.TarError, EOFError) as exc:
            raise TruncatedTarError(str(exc) or type(exc).__name__) from None
        if not getattr(tar, "latentforge_end_marker", False):
            raise TruncatedTarError("no end-of-archive marker (cut at a member boundary?)")
        if key is not None:
            yield key, files
