"""`make dataset`: img2dataset against a local http server, read back by the source reader."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from latentforge.preprocess import dataset_download as dd
from latentforge.preprocess.sources import SkipCounter, iter_shard, list_shards
from latentforge.shared.config import SourceConfig

HAVE_IMG2DATASET = dd.DEFAULT_IMG2DATASET.is_file()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture()
def image_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Serves a few PNG/JPEG images made here; yields (base url, {name: (width, height)})."""
    root = tmp_path / "www"
    root.mkdir()
    sizes = {"red.jpg": (64, 48), "green.png": (40, 80), "blue.jpg": (96, 32)}
    for i, (name, size) in enumerate(sizes.items()):
        buf = io.BytesIO()
        Image.new("RGB", size, [(200, 10, 10), (10, 200, 10), (10, 10, 200)][i]).save(
            buf, "PNG" if name.endswith(".png") else "JPEG", quality=90)
        (root / name).write_bytes(buf.getvalue())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sizes
    finally:
        server.shutdown()
        server.server_close()


def test_build_command_has_latentforge_settings(tmp_path: Path) -> None:
    cmd = dd.build_command(Path("/x/img2dataset"), tmp_path / "u.csv", tmp_path / "out", extra_cols=["score"],
                           passthrough=["--min_image_size", "64"])
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert flags["--resize_mode"] == "no" and flags["--skip_reencode"] == "True"
    assert flags["--output_format"] == "webdataset" and flags["--enable_wandb"] == "False"
    assert flags["--encode_format"] == "jpg" and flags["--caption_col"] == "caption"
    assert json.loads(flags["--save_additional_columns"]) == ["score"]
    assert cmd[-2:] == ["--min_image_size", "64"]
    png = dd.build_command(Path("/x/i2d"), tmp_path / "u.txt", tmp_path / "o", input_format="txt", encode_format="png")
    assert "--caption_col" not in png and png[png.index("--encode_quality") + 1] == "9"


def test_input_columns_and_missing_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "u.csv").write_text("url,caption,score\nhttp://x/a.jpg,a,1\n")
    assert dd.input_columns(tmp_path / "u.csv", "csv", Path("/unused")) == ["url", "caption", "score"]
    monkeypatch.setattr(dd, "DEFAULT_IMG2DATASET", tmp_path / "nope")
    monkeypatch.delenv("LATENTFORGE_IMG2DATASET", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make install"):
        dd.find_img2dataset()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_IMG2DATASET, reason=f"{dd.DEFAULT_IMG2DATASET} missing: run `make install`")
def test_download_and_read_back(tmp_path: Path, image_server: tuple[str, dict[str, tuple[int, int]]],
                                capsys: pytest.CaptureFixture[str]) -> None:
    base, sizes = image_server
    captions = {name: f"a plain {name.split('.')[0]} rectangle, café" for name in sizes}
    urls = tmp_path / "urls.csv"
    with open(urls, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption", "score"])
        for i, name in enumerate(sizes):
            writer.writerow([f"{base}/{name}", captions[name], 5 + i])
        writer.writerow([f"{base}/missing.jpg", "never downloaded", 1])
    out = tmp_path / "crawl"
    rc = dd.main(["--urls", str(urls), "--out", str(out), "--processes", "1", "--threads", "4", "--timeout", "5",
                  "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert stdout.count("\n") == 1 and "3/4 images downloaded, 1 failed" in stdout and "1 shard in" in stdout

    src = SourceConfig(type="webdataset", path=f"{out}/*.tar")
    refs = list_shards([src])
    assert [r.group_id for r in refs] == ["s0-00000"]
    stats = SkipCounter()
    samples = list(iter_shard(refs[0], src, stats))
    assert stats.total == 0
    by_url = {s.metadata["url"].rsplit("/", 1)[1]: s for s in samples}
    assert set(by_url) == set(sizes)
    for name, sample in by_url.items():
        assert sample.caption == captions[name] and sample.image_ext == "jpg"
        assert sample.metadata["score"] == 5 + list(sizes).index(name)  # extra column kept for filters
        with Image.open(io.BytesIO(sample.image)) as im:
            assert im.size == sizes[name]  # original size: no resize
    red = (tmp_path / "www/red.jpg").read_bytes()
    assert by_url["red.jpg"].image == red  # JPEG originals are kept byte-for-byte
