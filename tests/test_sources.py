"""Input shards: listing (brace ranges, globs, folders, http, s3), streaming, skip reasons, hashes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from reliability_support import write_tar

from latentforge.devkit.demo_data import CAPTIONS, DemoDataSummary, write_demo_data
from latentforge.preprocess.source_checks import SKIP_REASONS, redact_url
from latentforge.preprocess.sources import (
    RawSample,
    SkipCounter,
    iter_shard,
    list_shards,
)
from latentforge.shared.cache_format import check_group_id
from latentforge.shared.config import SourceConfig

SECRET = "lf-test-SECRET-wJalrXUtnFEMI-K7MDENG"


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataSummary:
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data")


@functools.cache
def _jpeg(shade: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (shade, 64, 32)).save(buf, "JPEG")
    return buf.getvalue()




def _sample(key: str, caption: str | None = "a photo", meta: dict[str, Any] | None = None,
            image: bytes | None = None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    out = [(f"{key}.{ext}", image if image is not None else _jpeg())]
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode()))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    return out


def _src(path: Path | str, **kw: Any) -> SourceConfig:
    return SourceConfig(type=kw.pop("type", "webdataset"), path=str(path), **kw)


def _read(sources: list[SourceConfig], stats: SkipCounter | None = None) -> tuple[list[RawSample], SkipCounter]:
    """What a cache job does: every shard of every source, one counter, never stopping on bad data."""
    stats = stats if stats is not None else SkipCounter()
    samples: list[RawSample] = []
    for ref in list_shards(sources):
        samples.extend(iter_shard(ref, sources[ref.source_index], stats))
    return samples, stats


def _b2(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


# ------------------------------------------------------------------------------------ tar listing


def test_demo_tars_brace_range_read_back_everything(demo: DemoDataSummary) -> None:
    n = len(demo.shards)
    src = _src(f"{demo.root}/webdataset/{{00000..{n - 1:05d}}}.tar")
    refs = list_shards([src])
    assert [r.group_id for r in refs] == [f"s0-{i:05d}" for i in range(n)]
    assert all(r.kind == "tar" and r.repeats == 1 and check_group_id(r.group_id) for r in refs)
    samples, stats = _read([src])
    assert stats.total == 0
    assert [s.key for s in samples] == list(demo.keys)
    by_caption = {c: slug for slug, c in CAPTIONS.items()}
    assert all(s.caption in by_caption and s.metadata["caption"] == s.caption for s in samples)
    assert {s.image_ext for s in samples} == {"jpg", "png"}
    assert all(s.image[:2] == b"\xff\xd8" or s.image[:4] == b"\x89PNG" for s in samples)


def test_glob_and_json_caption_field(demo: DemoDataSummary) -> None:
    src = _src(f"{demo.root}/webdataset/*.tar", caption_field="caption", repeats=3)
    refs = list_shards([src])
    assert [r.url for r in refs] == [str(p) for p in demo.shards]  # sorted, absolute
    assert {r.repeats for r in refs} == {3}
    samples, stats = _read([src])
    assert len(samples) == demo.num_samples and stats.total == 0
    assert all(s.caption == s.metadata["caption"] for s in samples)


def test_listing_is_deterministic_and_identity_is_stat_only(demo: DemoDataSummary) -> None:
    src = _src(f"{demo.root}/webdataset/*.tar")
    a, b = list_shards([src]), list_shards([src])
    assert a == b and [r.identity_hash for r in a] == [r.identity_hash for r in b]
    ident = a[0].identity
    assert set(ident) == {"url", "size", "mtime"} and ident["size"] == demo.shards[0].stat().st_size
    assert a[0].identity_hash == hashlib.sha256(
        json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_nested_glob_ids_are_relative_to_the_pattern_and_unique(tmp_path: Path) -> None:
    for rel in ("a/shard-0.tar", "a/shard-1.tar", "b/shard-0.tar", "a_b.tar", "a/b.tar"):
        write_tar(tmp_path / "root" / rel, _sample("000000001"))
    refs = list_shards([_src(tmp_path / "root/*/shard-*.tar"), _src(tmp_path / "root/{a_b,a/b}.tar")])
    ids = [r.group_id for r in refs]
    assert ids[:3] == ["s0-a_shard-0", "s0-a_shard-1", "s0-b_shard-0"]
    assert len(set(ids)) == len(ids) and all(check_group_id(i) for i in ids)
    assert ids[3].startswith("s1-a_b-") and ids[4].startswith("s1-a_b-")  # clash disambiguated by url hash
    # Ids depend on the pattern's folder, not on what else matched: adding a shard renames nothing.
    write_tar(tmp_path / "root/c/shard-0.tar", _sample("000000001"))
    assert [r.group_id for r in list_shards([_src(tmp_path / "root/*/shard-*.tar")])][:3] == ids[:3]


def test_sources_that_match_nothing_fail_in_one_line(tmp_path: Path) -> None:
    write_tar(tmp_path / "wds/00000.tar", _sample("000000001"))
    (tmp_path / "empty").mkdir()
    cases = [
        (_src(tmp_path / "nope/*.tar"), "matched no tar shards"),
        (_src(tmp_path / "wds/{00005..00009}.tar"), "matched no tar shards"),
        (_src(tmp_path / "wds"), "is a directory"),
        (_src(tmp_path / "missing", type="folder"), "is not a directory"),
        (_src(tmp_path / "empty", type="folder"), "holds no images"),
    ]
    for src, words in cases:
        with pytest.raises(ValueError) as err:
            list_shards([_src(tmp_path / "wds/*.tar"), src])
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("data.sources[1].path") and words in msg, msg
        assert src.path in msg


def test_brace_range_with_missing_member_is_listed_then_reported(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    write_tar(tmp_path / "00000.tar", _sample("000000001"))
    write_tar(tmp_path / "00002.tar", _sample("000000003"))
    src = _src(tmp_path / "{00000..00002}.tar")
    refs = list_shards([src])
    assert [r.group_id for r in refs] == ["s0-00000", "s0-00001", "s0-00002"]
    assert refs[1].identity.get("missing") is True and "missing" not in refs[0].identity
    assert "1 of 3 listed shards do not exist" in caplog.text
    samples, stats = _read([src])
    assert [s.key for s in samples] == ["000000001", "000000003"]  # the job went on past the hole
    assert stats.as_dict()["shard_unreadable"]["count"] == 1
    assert "FileNotFoundError" in stats.as_dict()["shard_unreadable"]["examples"][0]


def test_gzipped_tar_streams(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar.gz", _sample("000000001") + _sample("000000002"), gz=True)
    refs = list_shards([_src(tmp_path / "*.tar.gz")])
    assert refs[0].group_id == "s0-00000"
    samples, stats = _read([_src(tmp_path / "*.tar.gz")])
    assert [s.key for s in samples] == ["000000001", "000000002"] and stats.total == 0


# ------------------------------------------------------------------------------------------ folders


def _folder(root: Path) -> None:
    (root / "sub/deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i, rel in enumerate(["b.jpg", "a.png", "sub/c.JPG", "sub/deeper/d.webp", "sub/e.jpeg", "f.jpg", "g.jpg"]):
        ext = rel.rsplit(".", 1)[1].lower()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
        buf = io.BytesIO()
        Image.new("RGB", (4 + i, 4), (i * 30, 0, 0)).save(buf, fmt)
        (root / rel).write_bytes(buf.getvalue())
        stem = rel.rsplit(".", 1)[0]
        if rel == "sub/e.jpeg":
            (root / f"{stem}.json").write_text(json.dumps({"caption": "from json", "score": 5}))
        elif rel != "g.jpg":
            (root / f"{stem}.txt").write_text(f"caption of {stem}\n")
    (root / "notes.md").write_text("not an image")
    (root / ".hidden/x.jpg").write_bytes(_jpeg())
    (root / "._b.jpg").write_bytes(b"macOS resource fork")


def test_folder_virtual_shards_sorted_stable_with_sidecars(tmp_path: Path) -> None:
    _folder(tmp_path / "imgs")
    src = _src(tmp_path / "imgs", type="folder", shard_size=3)
    refs = list_shards([src])
    assert [r.group_id for r in refs] == ["s0-v000000", "s0-v000001", "s0-v000002"]
    assert all(r.kind == "folder" for r in refs)
    members = [m[0] for r in refs for m in r.identity["members"]]
    assert members == ["a.png", "a.txt", "b.jpg", "b.txt", "f.jpg", "f.txt", "g.jpg", "sub/c.JPG", "sub/c.txt",
                       "sub/deeper/d.webp", "sub/deeper/d.txt", "sub/e.jpeg", "sub/e.json"]
    assert list_shards([src]) == refs
    samples, stats = _read([src])
    assert [s.key for s in samples] == ["a", "b", "f", "sub/c", "sub/deeper/d", "sub/e"]
    assert samples[0].caption == "caption of a" and samples[0].image_ext == "png"
    assert samples[-1].caption == "from json" and samples[-1].metadata == {"caption": "from json", "score": 5}
    assert samples[3].image_ext == "jpg"  # upper-case .JPG
    assert stats.as_dict() == {"no_caption": {"count": 1, "examples": ["s0-v000001/g: no .txt or 'caption' is "
                                                                       "empty or missing"]}}


def test_folder_identity_changes_only_for_the_shard_whose_file_changed(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _folder(root)
    src = _src(root, type="folder", shard_size=3)
    before = list_shards([src])
    (root / "sub/c.txt").write_text("an edited, longer caption for c\n")  # a sidecar in shard 1
    after = list_shards([src])
    assert [b.identity_hash == a.identity_hash for b, a in zip(before, after, strict=True)] == [True, False, True]
    st = (root / "a.png").stat()
    os.utime(root / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch, same bytes
    assert list_shards([src])[0].identity_hash != before[0].identity_hash


def test_folder_json_caption_field_and_unreadable_file(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _folder(root)
    samples, stats = _read([_src(root, type="folder", caption_field="caption")])
    assert [s.key for s in samples] == ["sub/e"]
    assert stats["no_caption"] == 6
    src = _src(root, type="folder", shard_size=100)
    ref = list_shards([src])[0]
    (root / "b.jpg").unlink()  # vanished between listing and reading
    stats = SkipCounter()
    reader = iter_shard(ref, src, stats)
    assert [s.key for s in reader] == ["a", "f", "sub/c", "sub/deeper/d", "sub/e"]
    assert stats["unreadable_file"] == 1 and "FileNotFoundError" in stats.as_dict()["unreadable_file"]["examples"][0]
    assert reader.content_hash is not None and reader.error is None


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
    members = [m for i in range(1, 6) for m in _sample(str(i), meta={"score": i, "lang": langs[i]})]
    members += _sample("6", meta={"lang": "en"})  # no score
    members += _sample("7", meta={"score": None, "lang": None})  # null
    members += _sample("8", meta={"score": "n/a", "lang": "en"})  # incomparable with 3
    members += _sample("9")  # no json at all
    write_tar(tmp_path / "00000.tar", members)
    filt = [{"field": field, "op": op, "value": value}]
    samples, stats = _read([_src(tmp_path / "00000.tar", filters=filt)])
    extra = {"score": {"==": [], "!=": ["8"]}, "lang": {"in": ["6", "8"], "not in": []}}[field].get(op, [])
    assert [s.key for s in samples] == kept + extra
    missing = {"score": 3, "lang": 2}[field]  # 6 (score only), 7 and 9
    assert stats["filtered_missing_field"] == missing
    assert stats["filtered"] == 9 - len(kept) - len(extra) - missing


def test_filter_in_needs_a_list(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", _sample("1"))
    with pytest.raises(ValueError, match=r"data.sources\[0\].filters\[0\]: op 'in' needs a list"):
        list_shards([_src(tmp_path / "00000.tar", filters=[{"field": "lang", "op": "in", "value": "en"}])])


# ------------------------------------------------------------------------------------- bad inputs


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    members = (
        _sample("000000001")
        + [("000000002.txt", b"caption, no image"), ("000000002.json", b"{}")]
        + _sample("000000003", caption=None)
        + _sample("000000004", caption="   \n")
        + _sample("000000005", caption=None) + [("000000005.txt", b"caf\xe9 latin-1")]
        + _sample("000000006", meta=None) + [("000000006.json", b"{not json")]
        + _sample("000000007", meta=None) + [("000000007.json", b"[1, 2]")]
        + _sample("000000001", caption="same key again, later")
        + _sample("000000008") + [("000000008.txt", b"second txt member")]
        + [("README", b"no dot"), ("._000000009.jpg", b"mac junk")]
        + _sample("000000010", image=_jpeg(7), ext="webp")
    )
    write_tar(tmp_path / "00000.tar", members)
    samples, stats = _read([_src(tmp_path / "00000.tar")])
    assert [s.key for s in samples] == ["000000001", "000000008", "000000010"]
    assert samples[1].caption == "a photo"  # the first .txt wins
    counts = {r: e["count"] for r, e in stats.as_dict().items()}
    assert counts == {"no_image": 1, "no_caption": 2, "caption_not_utf8": 1, "bad_json": 2, "duplicate_key": 2}
    assert set(counts) <= set(SKIP_REASONS)


def _good_members(n: int) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in _sample(f"{i:09d}", caption=f"caption {i}")]


def test_truncated_tars_keep_earlier_samples(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", _good_members(4)).read_bytes()
    # Cut inside the third sample's image data, and exactly at a member boundary (no end marker).
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = tar.getmember("000000002.jpg")
    (tmp_path / "mid.tar").write_bytes(whole[: third.offset_data + 100])
    (tmp_path / "boundary.tar").write_bytes(whole[: third.offset])
    # Mid-member: samples 0 and 1 were closed by the next key. At a boundary the last sample read (1)
    # cannot be known complete, so it is dropped too.
    for name, kept in (("mid", 2), ("boundary", 1)):
        stats = SkipCounter()
        src = _src(tmp_path / f"{name}.tar")
        reader = iter_shard(list_shards([src])[0], src, stats)
        assert [s.key for s in reader] == ["000000000", "000000001"][:kept], name
        assert reader.error == "truncated_tar" and reader.content_hash is None
        assert stats.as_dict()["truncated_tar"]["count"] == 1


def test_not_a_tar_and_empty_file_skip_the_shard_and_the_job_goes_on(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(_jpeg() * 40)
    (tmp_path / "00001.tar").write_bytes(b"")
    write_tar(tmp_path / "00002.tar", _good_members(2))
    samples, stats = _read([_src(tmp_path / "*.tar")])
    assert [s.key for s in samples] == ["000000000", "000000001"]
    assert stats["not_a_tar"] == 2 and stats.total == 2


def test_unreadable_shard_names_the_error_class_only(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", _good_members(1))
    src = _src(tmp_path / "00000.tar")
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
    src = _src(tmp_path / "00000.tar")
    ref = list_shards([src])[0]
    reader = iter_shard(ref, src, SkipCounter())
    with pytest.raises(RuntimeError, match="only after full iteration"):
        _ = reader.content_hash
    assert len(list(reader)) == 8
    assert reader.content_hash == _b2(demo.shards[0].read_bytes())
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
    _folder(root)
    src = _src(root, type="folder", shard_size=100)

    def digest() -> str | None:
        reader = iter_shard(list_shards([src])[0], src, SkipCounter())
        list(reader)
        return reader.content_hash

    first = digest()
    assert first is not None and digest() == first
    (root / "a.txt").write_text("caption of A\n")  # same length, different bytes
    assert digest() != first


# ----------------------------------------------------------------------------------- http and s3


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def test_http_brace_range(http_root: tuple[str, Path], demo: DemoDataSummary) -> None:
    base, root = http_root
    for shard in demo.shards[:2]:
        shutil.copy(shard, root / shard.name)
    src = _src(f"{base}/{{00000..00002}}.tar?sig=abc123")
    refs = list_shards([src])
    assert [r.group_id for r in refs] == ["s0-00000", "s0-00001", "s0-00002"]
    assert refs[0].identity["size"] == demo.shards[0].stat().st_size and "Last-Modified" in refs[0].identity
    assert refs[2].identity["missing"] is True
    assert all("abc123" not in json.dumps(r.identity) for r in refs)
    stats = SkipCounter()
    readers = [iter_shard(r, src, stats) for r in refs]
    keys = [s.key for reader in readers for s in reader]
    assert len(keys) == 16 and stats["shard_unreadable"] == 1
    assert readers[0].content_hash == _b2(demo.shards[0].read_bytes())


def test_redact_url() -> None:
    assert redact_url("https://user:pw@host/a.tar?X-Amz-Signature=s&x=1&token=t") == \
        "https://***@host/a.tar?X-Amz-Signature=***&x=1&token=***"
    assert redact_url("/local/path.tar") == "/local/path.tar"


def test_s3_through_local_server(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                 demo: DemoDataSummary) -> None:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed: s3 path untested")
    s3fs = pytest.importorskip("s3fs")
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIDLATENTFORGETEST", "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    caplog.set_level(logging.DEBUG, logger="latentforge")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("crawl")
        for shard in demo.shards:
            fs.pipe(f"crawl/wds/{shard.name}", shard.read_bytes())
        n = len(demo.shards)
        opts = {"endpoint_url": endpoint}
        sources = [_src("s3://crawl/wds/*.tar", storage_options=opts),
                   _src(f"s3://crawl/wds/{{00000..{n:05d}}}.tar", storage_options=opts)]
        refs = list_shards(sources)
        assert [r.group_id for r in refs] == [f"s0-{i:05d}" for i in range(n)] + [f"s1-{i:05d}" for i in range(n + 1)]
        assert refs[0].url == "s3://crawl/wds/00000.tar" and "ETag" in refs[0].identity
        assert refs[0].identity["endpoint"] == endpoint and refs[-1].identity["missing"] is True
        samples, stats = _read(sources)
        assert len(samples) == 2 * demo.num_samples and stats["shard_unreadable"] == 1
        reader = iter_shard(refs[0], sources[0], SkipCounter())
        list(reader)
        assert reader.content_hash == _b2(demo.shards[0].read_bytes())
        with pytest.raises(ValueError, match="matched no tar shards") as err:
            list_shards([_src("s3://no-such-bucket/x/*.tar", storage_options=opts)])
        shown = [json.dumps(r.identity) + r.group_id + repr(r) for r in refs]
        for text in [*shown, caplog.text, str(err.value), json.dumps(stats.as_dict())]:
            assert SECRET not in text
    finally:
        server.stop()
