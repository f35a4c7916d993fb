"""Input shards, listing: brace ranges, globs, folders, http and s3 (stable group ids, stat-only
identities, one-line errors). Streaming the samples is `test_sources_reading.py`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import write_tar
from sources_support import SECRET, b2, make_folder, make_source, read_all, sample

from latentforge.devkit.demo_data import CAPTIONS, DemoDataSummary, write_demo_data
from latentforge.preprocess.sources import SkipCounter, iter_shard, list_shards
from latentforge.shared.cache_format import check_group_id
from latentforge.shared.secrets import redact_url


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataSummary:
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data")


# ------------------------------------------------------------------------------------ tar listing


def test_demo_tars_brace_range_read_back_everything(demo: DemoDataSummary) -> None:
    n = len(demo.shards)
    src = make_source(f"{demo.root}/webdataset/{{00000..{n - 1:05d}}}.tar")
    refs = list_shards([src])
    assert [r.group_id for r in refs] == [f"s0-{i:05d}" for i in range(n)]
    assert all(r.kind == "tar" and r.repeats == 1 and check_group_id(r.group_id) for r in refs)
    samples, stats = read_all([src])
    assert stats.total == 0
    assert [s.key for s in samples] == list(demo.keys)
    by_caption = {c: slug for slug, c in CAPTIONS.items()}
    assert all(s.caption in by_caption and s.metadata["caption"] == s.caption for s in samples)
    assert {s.image_ext for s in samples} == {"jpg", "png"}
    assert all(s.image[:2] == b"\xff\xd8" or s.image[:4] == b"\x89PNG" for s in samples)


def test_glob_and_json_caption_field(demo: DemoDataSummary) -> None:
    src = make_source(f"{demo.root}/webdataset/*.tar", caption_field="caption", repeats=3)
    refs = list_shards([src])
    assert [r.url for r in refs] == [str(p) for p in demo.shards]  # sorted, absolute
    assert {r.repeats for r in refs} == {3}
    samples, stats = read_all([src])
    assert len(samples) == demo.num_samples and stats.total == 0
    assert all(s.caption == s.metadata["caption"] for s in samples)


def test_listing_is_deterministic_and_identity_is_stat_only(demo: DemoDataSummary) -> None:
    src = make_source(f"{demo.root}/webdataset/*.tar")
    a, b = list_shards([src]), list_shards([src])
    assert a == b and [r.identity_hash for r in a] == [r.identity_hash for r in b]
    ident = a[0].identity
    assert set(ident) == {"url", "size", "mtime"} and ident["size"] == demo.shards[0].stat().st_size
    assert a[0].identity_hash == hashlib.sha256(
        json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_nested_glob_ids_are_relative_to_the_pattern_and_unique(tmp_path: Path) -> None:
    for rel in ("a/shard-0.tar", "a/shard-1.tar", "b/shard-0.tar", "a_b.tar", "a/b.tar"):
        write_tar(tmp_path / "root" / rel, sample("000000001"))
    refs = list_shards([make_source(tmp_path / "root/*/shard-*.tar"), make_source(tmp_path / "root/{a_b,a/b}.tar")])
    ids = [r.group_id for r in refs]
    assert ids[:3] == ["s0-a_shard-0", "s0-a_shard-1", "s0-b_shard-0"]
    assert len(set(ids)) == len(ids) and all(check_group_id(i) for i in ids)
    assert ids[3].startswith("s1-a_b-") and ids[4].startswith("s1-a_b-")  # clash disambiguated by url hash
    # Ids depend on the pattern's folder, not on what else matched: adding a shard renames nothing.
    write_tar(tmp_path / "root/c/shard-0.tar", sample("000000001"))
    assert [r.group_id for r in list_shards([make_source(tmp_path / "root/*/shard-*.tar")])][:3] == ids[:3]


def test_sources_that_match_nothing_fail_in_one_line(tmp_path: Path) -> None:
    write_tar(tmp_path / "wds/00000.tar", sample("000000001"))
    (tmp_path / "empty").mkdir()
    cases = [
        (make_source(tmp_path / "nope/*.tar"), "matched no tar shards"),
        (make_source(tmp_path / "wds/{00005..00009}.tar"), "matched no tar shards"),
        (make_source(tmp_path / "wds"), "is a directory"),
        (make_source(tmp_path / "missing", type="folder"), "is not a directory"),
        (make_source(tmp_path / "empty", type="folder"), "holds no images"),
    ]
    for src, words in cases:
        with pytest.raises(ValueError) as err:
            list_shards([make_source(tmp_path / "wds/*.tar"), src])
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("data.sources[1].path") and words in msg, msg
        assert src.path in msg


def test_brace_range_with_missing_member_is_listed_then_reported(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    write_tar(tmp_path / "00000.tar", sample("000000001"))
    write_tar(tmp_path / "00002.tar", sample("000000003"))
    src = make_source(tmp_path / "{00000..00002}.tar")
    refs = list_shards([src])
    assert [r.group_id for r in refs] == ["s0-00000", "s0-00001", "s0-00002"]
    assert refs[1].identity.get("missing") is True and "missing" not in refs[0].identity
    assert "1 of 3 listed shards do not exist" in caplog.text
    samples, stats = read_all([src])
    assert [s.key for s in samples] == ["000000001", "000000003"]  # the job went on past the hole
    assert stats.as_dict()["shard_unreadable"]["count"] == 1
    assert "FileNotFoundError" in stats.as_dict()["shard_unreadable"]["examples"][0]


def test_gzipped_tar_streams(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar.gz", sample("000000001") + sample("000000002"), gz=True)
    refs = list_shards([make_source(tmp_path / "*.tar.gz")])
    assert refs[0].group_id == "s0-00000"
    samples, stats = read_all([make_source(tmp_path / "*.tar.gz")])
    assert [s.key for s in samples] == ["000000001", "000000002"] and stats.total == 0


# ------------------------------------------------------------------------------------------ folders


def test_folder_virtual_shards_sorted_stable_with_sidecars(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs")
    src = make_source(tmp_path / "imgs", type="folder", shard_size=3)
    refs = list_shards([src])
    assert [r.group_id for r in refs] == ["s0-v000000", "s0-v000001", "s0-v000002"]
    assert all(r.kind == "folder" for r in refs)
    members = [m[0] for r in refs for m in r.identity["members"]]
    assert members == ["a.png", "a.txt", "b.jpg", "b.txt", "f.jpg", "f.txt", "g.jpg", "sub/c.JPG", "sub/c.txt",
                       "sub/deeper/d.webp", "sub/deeper/d.txt", "sub/e.jpeg", "sub/e.json"]
    assert list_shards([src]) == refs
    samples, stats = read_all([src])
    assert [s.key for s in samples] == ["a", "b", "f", "sub/c", "sub/deeper/d", "sub/e"]
    assert samples[0].caption == "caption of a" and samples[0].image_ext == "png"
    assert samples[-1].caption == "from json" and samples[-1].metadata == {"caption": "from json", "score": 5}
    assert samples[3].image_ext == "jpg"  # upper-case .JPG
    assert stats.as_dict() == {"no_caption": {"count": 1, "examples": ["s0-v000001/g: no .txt or 'caption' is "
                                                                       "empty or missing"]}}


def test_folder_identity_changes_only_for_the_shard_whose_file_changed(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_folder(root)
    src = make_source(root, type="folder", shard_size=3)
    before = list_shards([src])
    (root / "sub/c.txt").write_text("an edited, longer caption for c\n")  # a sidecar in shard 1
    after = list_shards([src])
    assert [b.identity_hash == a.identity_hash for b, a in zip(before, after, strict=True)] == [True, False, True]
    st = (root / "a.png").stat()
    os.utime(root / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch, same bytes
    assert list_shards([src])[0].identity_hash != before[0].identity_hash


def test_folder_json_caption_field_and_unreadable_file(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_folder(root)
    samples, stats = read_all([make_source(root, type="folder", caption_field="caption")])
    assert [s.key for s in samples] == ["sub/e"]
    assert stats["no_caption"] == 6
    src = make_source(root, type="folder", shard_size=100)
    ref = list_shards([src])[0]
    (root / "b.jpg").unlink()  # vanished between listing and reading
    stats = SkipCounter()
    reader = iter_shard(ref, src, stats)
    assert [s.key for s in reader] == ["a", "f", "sub/c", "sub/deeper/d", "sub/e"]
    assert stats["unreadable_file"] == 1 and "FileNotFoundError" in stats.as_dict()["unreadable_file"]["examples"][0]
    assert reader.content_hash is not None and reader.error is None


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
    src = make_source(f"{base}/{{00000..00002}}.tar?sig=abc123")
    refs = list_shards([src])
    assert [r.group_id for r in refs] == ["s0-00000", "s0-00001", "s0-00002"]
    assert refs[0].identity["size"] == demo.shards[0].stat().st_size and "Last-Modified" in refs[0].identity
    assert refs[2].identity["missing"] is True
    assert all("abc123" not in json.dumps(r.identity) for r in refs)
    stats = SkipCounter()
    readers = [iter_shard(r, src, stats) for r in refs]
    keys = [s.key for reader in readers for s in reader]
    assert len(keys) == 16 and stats["shard_unreadable"] == 1
    assert readers[0].content_hash == b2(demo.shards[0].read_bytes())


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
        sources = [make_source("s3://crawl/wds/*.tar", storage_options=opts),
                   make_source(f"s3://crawl/wds/{{00000..{n:05d}}}.tar", storage_options=opts)]
        refs = list_shards(sources)
        assert [r.group_id for r in refs] == [f"s0-{i:05d}" for i in range(n)] + [f"s1-{i:05d}" for i in range(n + 1)]
        assert refs[0].url == "s3://crawl/wds/00000.tar" and "ETag" in refs[0].identity
        assert refs[0].identity["endpoint"] == endpoint and refs[-1].identity["missing"] is True
        samples, stats = read_all(sources)
        assert len(samples) == 2 * demo.num_samples and stats["shard_unreadable"] == 1
        reader = iter_shard(refs[0], sources[0], SkipCounter())
        list(reader)
        assert reader.content_hash == b2(demo.shards[0].read_bytes())
        with pytest.raises(ValueError, match="matched no tar shards") as err:
            list_shards([make_source("s3://no-such-bucket/x/*.tar", storage_options=opts)])
        shown = [json.dumps(r.identity) + r.group_id + repr(r) for r in refs]
        for text in [*shown, caplog.text, str(err.value), json.dumps(stats.as_dict())]:
            assert SECRET not in text
    finally:
        server.stop()
