"""Input shards, streaming: samples out of tars and folders, filters, skip reasons, shard-level errors
and content hashes. Listing the shards is `test_sources.py`."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from reliability_support import write_tar
from sources_support import b2, good_members, jpeg, make_folder, make_source, read_all, sample

from latentforge.devkit.demo_data import DemoDataSummary, write_demo_data
from latentforge.preprocess.source_checks import SKIP_REASONS
from latentforge.preprocess.sources import SkipCounter, iter_shard, list_shards


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataSummary:
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data")


# ------------------------------------------------------------------------------------------ filters


@pytest.mark.parametrize(
    ("field", "op", "value", "kept"),
    [
        ("score", ">", 3, ["4", "5"]),
        ("score", ">=", 3, ["3", "4", "5"]),
        ("score", "<", 3, ["1", "2"]),
        ("score", "<=", 3, ["1", "2", "3"]),
        ("score", "==", 3, ["3"]),
        ("score", "!=", 3, ["1", "2", "4", "5"]),
        ("lang", "in", ["en", "de"], ["1", "2", "4"]),
        ("lang", "not in", ["en", "de"], ["3", "5"]),
    ],
)
def test_filters(tmp_path: Path, field: str, op: str, value: Any, kept: list[str]) -> None:
    langs = {1: "en", 2: "de", 3: "fr", 4: "en", 5: "ja"}
    members = [m for i in range(1, 6) for m in sample(str(i), meta={"score": i, "lang": langs[i]})]
    members += sample("6", meta={"lang": "en"})  # no score
    members += sample("7", meta={"score": None, "lang": None})  # null
    members += sample("8", meta={"score": "n/a", "lang": "en"})  # incomparable with 3
    members += sample("9")  # no json at all
    write_tar(tmp_path / "00000.tar", members)
    filt = [{"field": field, "op": op, "value": value}]
    samples, stats = read_all([make_source(tmp_path / "00000.tar", filters=filt)])
    extra = {"score": {"==": [], "!=": ["8"]}, "lang": {"in": ["6", "8"], "not in": []}}[field].get(op, [])
    assert [s.key for s in samples] == kept + extra
    missing = {"score": 3, "lang": 2}[field]  # 6 (score only), 7 and 9
    assert stats["filtered_missing_field"] == missing
    assert stats["filtered"] == 9 - len(kept) - len(extra) - missing


def test_filter_in_needs_a_list(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", sample("1"))
    with pytest.raises(ValueError, match=r"data.sources\[0\].filters\[0\]: op 'in' needs a list"):
        list_shards([make_source(tmp_path / "00000.tar", filters=[{"field": "lang", "op": "in", "value": "en"}])])


# ------------------------------------------------------------------------------------- bad inputs


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    members = (
        sample("000000001")
        + [("000000002.txt", b"caption, no image"), ("000000002.json", b"{}")]
        + sample("000000003", caption=None)
        + sample("000000004", caption="   \n")
        + sample("000000005", caption=None) + [("000000005.txt", b"caf\xe9 latin-1")]
        + sample("000000006", meta=None) + [("000000006.json", b"{not json")]
        + sample("000000007", meta=None) + [("000000007.json", b"[1, 2]")]
        + sample("000000001", caption="same key again, later")
        + sample("000000008") + [("000000008.txt", b"second txt member")]
        + [("README", b"no dot"), ("._000000009.jpg", b"mac junk")]
        + sample("000000010", image=jpeg(7), ext="webp")
    )
    write_tar(tmp_path / "00000.tar", members)
    samples, stats = read_all([make_source(tmp_path / "00000.tar")])
    assert [s.key for s in samples] == ["000000001", "000000008", "000000010"]
    assert samples[1].caption == "a photo"  # the first .txt wins
    counts = {r: e["count"] for r, e in stats.as_dict().items()}
    assert counts == {"no_image": 1, "no_caption": 2, "caption_not_utf8": 1, "bad_json": 2, "duplicate_key": 2}
    assert set(counts) <= set(SKIP_REASONS)


def test_keys_the_cache_cannot_store_are_skipped_with_a_reason(tmp_path: Path) -> None:
    """A key is cached as at most KEY_BYTES of UTF-8 (room left for "#flip"): longer or non-UTF-8 member
    names are skipped and counted like any bad sample, and the rest of the shard is read."""
    from latentforge.shared.cache_format import MAX_SOURCE_KEY_BYTES

    longest = "k" * MAX_SOURCE_KEY_BYTES
    members = (sample("000000001") + sample("é" * (MAX_SOURCE_KEY_BYTES // 2 + 1)) + sample(longest)
               + sample(b"caf\xe9".decode("utf-8", "surrogateescape")))  # a latin-1 name in a tar
    # GNU format: member names over ustar's 255 bytes, and raw (non-UTF-8) name bytes.
    with tarfile.open(tmp_path / "00000.tar", "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, stats = read_all([make_source(tmp_path / "00000.tar")])
    assert [s.key for s in samples] == ["000000001", longest]
    counts = {r: e["count"] for r, e in stats.as_dict().items()}
    assert counts == {"key_too_long": 1, "key_not_utf8": 1} and set(counts) <= set(SKIP_REASONS)
    assert f"at most {MAX_SOURCE_KEY_BYTES} are cached" in stats.as_dict()["key_too_long"]["examples"][0]


def test_truncated_tars_keep_earlier_samples(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", good_members(4)).read_bytes()
    # Cut inside the third sample's image data, and exactly at a member boundary (no end marker).
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = tar.getmember("000000002.jpg")
    (tmp_path / "mid.tar").write_bytes(whole[: third.offset_data + 100])
    (tmp_path / "boundary.tar").write_bytes(whole[: third.offset])
    # Mid-member: samples 0 and 1 were closed by the next key. At a boundary the last sample read (1)
    # cannot be known complete, so it is dropped too.
    for name, kept in (("mid", 2), ("boundary", 1)):
        stats = SkipCounter()
        src = make_source(tmp_path / f"{name}.tar")
        reader = iter_shard(list_shards([src])[0], src, stats)
        assert [s.key for s in reader] == ["000000000", "000000001"][:kept], name
        assert reader.error == "truncated_tar" and reader.content_hash is None
        assert stats.as_dict()["truncated_tar"]["count"] == 1


def test_not_a_tar_and_empty_file_skip_the_shard_and_the_job_goes_on(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(jpeg() * 40)
    (tmp_path / "00001.tar").write_bytes(b"")
    write_tar(tmp_path / "00002.tar", good_members(2))
    samples, stats = read_all([make_source(tmp_path / "*.tar")])
    assert [s.key for s in samples] == ["000000000", "000000001"]
    assert stats["not_a_tar"] == 2 and stats.total == 2


def test_unreadable_shard_names_the_error_class_only(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", good_members(1))
    src = make_source(tmp_path / "00000.tar")
    ref = list_shards([src])[0]
    (tmp_path / "00000.tar").unlink()
    stats = SkipCounter()
    reader = iter_shard(ref, src, stats)
    assert list(reader) == [] and reader.error == "shard_unreadable" and reader.content_hash is None
    assert "FileNotFoundError" in stats.as_dict()["shard_unreadable"]["examples"][0]


def test_skip_counter_merge_and_examples_cap() -> None:
    a, b = SkipCounter(max_examples=2), SkipCounter(max_examples=2)
    for i in range(3):
        a.skip("no_image", f"a{i}")
    b.skip("no_image", "b0")
    b.skip("bad_json", "b1")
    merged = SkipCounter(max_examples=2).merge(a).merge(b.as_dict())
    assert merged.as_dict() == {"bad_json": {"count": 1, "examples": ["b1"]},
                                "no_image": {"count": 4, "examples": ["a0", "a1"]}}
    assert merged.total == 5 and json.loads(json.dumps(merged.as_dict())) == merged.as_dict()


# ------------------------------------------------------------------------------------ content hash


def test_content_hash_is_the_file_hash_and_tracks_content(tmp_path: Path, demo: DemoDataSummary) -> None:
    shutil.copy(demo.shards[0], tmp_path / "00000.tar")
    src = make_source(tmp_path / "00000.tar")
    ref = list_shards([src])[0]
    reader = iter_shard(ref, src, SkipCounter())
    with pytest.raises(RuntimeError, match="only after full iteration"):
        _ = reader.content_hash
    assert len(list(reader)) == 8
    assert reader.content_hash == b2(demo.shards[0].read_bytes())
    again = iter_shard(ref, src, SkipCounter())
    list(again)
    assert again.content_hash == reader.content_hash
    # Flip one byte inside an image, same size and mtime: identity is blind to it, the content hash not.
    data = bytearray(demo.shards[0].read_bytes())
    st = (tmp_path / "00000.tar").stat()
    data[2000] ^= 0xFF
    (tmp_path / "00000.tar").write_bytes(bytes(data))
    os.utime(tmp_path / "00000.tar", ns=(st.st_atime_ns, st.st_mtime_ns))
    ref2 = list_shards([src])[0]
    assert ref2.identity_hash == ref.identity_hash
    changed = iter_shard(ref2, src, SkipCounter())
    list(changed)
    assert changed.content_hash not in (None, reader.content_hash)


def test_folder_content_hash_tracks_captions(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_folder(root)
    src = make_source(root, type="folder", shard_size=100)

    def digest() -> str | None:
        reader = iter_shard(list_shards([src])[0], src, SkipCounter())
        list(reader)
        return reader.content_hash

    first = digest()
    assert first is not None and digest() == first
    (root / "a.txt").write_text("caption of A\n")  # same length, different bytes
    assert digest() != first
