"""The demo dataset must look like a real img2dataset crawl and hit every preprocessing branch."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image, ImageOps

from latentforge.devkit import demo_data
from latentforge.devkit.demo_data import DemoDataSummary, write_demo_data

IMAGE_EXTS = (".jpg", ".png")
META_KEYS = {
    "key", "caption", "url", "width", "height", "original_width", "original_height", "status", "exif",
    "aesthetic_score", "nsfw_probability",
}  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataSummary:
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data")


def _tar_samples(summary: DemoDataSummary) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with plain tarfile so nothing is decoded behind our back."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in summary.shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _image_bytes(sample: dict[str, bytes]) -> bytes:
    (data,) = [sample[e] for e in ("jpg", "png") if e in sample]
    return data


def _image(sample: dict[str, bytes]) -> Image.Image:
    return Image.open(io.BytesIO(_image_bytes(sample)))


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_webdataset_reads_every_sample(demo: DemoDataSummary) -> None:
    assert 24 <= demo.num_samples <= 32 and len(demo.shards) >= 2
    dataset = wds.WebDataset([str(s) for s in demo.shards], shardshuffle=False).decode("pil")
    keys = []
    for sample in dataset:
        image = sample.get("jpg") or sample.get("png")
        meta = sample["json"]
        assert image is not None and sample["txt"] and isinstance(meta, dict)
        assert META_KEYS <= meta.keys()
        assert (meta["width"], meta["height"]) == image.size  # stored pixels, before EXIF rotation
        assert meta["key"] == sample["__key__"] and re.fullmatch(r"\d{9}", meta["key"])
        assert meta["caption"] == sample["txt"] and meta["status"] == "success"
        assert meta["url"].startswith("https://example.invalid/")
        assert 3.0 <= meta["aesthetic_score"] <= 7.0 and 0.0 <= meta["nsfw_probability"] < 0.1
        assert meta["exif"] is None or isinstance(meta["exif"], str)
        keys.append(meta["key"])
    assert tuple(keys) == demo.keys and len(set(keys)) == demo.num_samples


def test_images_cover_preprocessing_edge_cases(demo: DemoDataSummary) -> None:
    small = alpha = gray = 0
    rotated, ratios = [], []
    for sample in _tar_samples(demo).values():
        image = _image(sample)
        small += min(image.size) < 256
        if image.mode in ("RGBA", "LA"):
            alpha += 1
            assert image.getchannel("A").getextrema()[0] < 128  # a real cut-out, not an opaque channel
        gray += image.mode in ("L", "LA")
        if image.getexif().get(0x0112, 1) != 1:
            rotated.append(image)
        upright = ImageOps.exif_transpose(image)
        ratios.append(upright.width / upright.height)
    assert small >= 4 and alpha >= 2 and gray >= 1
    assert len(rotated) == 1
    (image,) = rotated
    assert image.format == "JPEG" and ImageOps.exif_transpose(image).size == image.size[::-1]
    assert min(ratios) < 0.6 and max(ratios) > 1.7


def test_folder_copy_matches_shards(demo: DemoDataSummary) -> None:
    images = sorted(p for p in demo.folder.rglob("*") if p.suffix in IMAGE_EXTS)
    assert len(images) == demo.num_samples
    assert any(p.parent != demo.folder for p in images)  # a nested sub-folder exists
    json_sidecars = 0
    for path in images:
        txt, side = path.with_suffix(".txt"), path.with_suffix(".json")
        assert txt.is_file() != side.is_file(), path  # exactly one caption sidecar
        if side.is_file():
            json_sidecars += 1
            assert json.loads(side.read_text("utf-8"))["caption"]
    assert json_sidecars >= 2
    tar_images = {hashlib.sha256(_image_bytes(s)).hexdigest() for s in _tar_samples(demo).values()}
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in images} == tar_images


def test_captions_are_real_text(demo: DemoDataSummary) -> None:
    captions = []
    for sample in _tar_samples(demo).values():
        caption = sample["txt"].decode("utf-8")
        assert caption.strip() and caption == json.loads(sample["json"])["caption"]
        captions.append(caption)
    assert len(set(captions)) == len(captions)
    assert sum(len(c) > 300 and len(c.split()) > 77 for c in captions) >= 2  # past CLIP's 77 tokens


def test_deterministic_and_not_rewritten(tmp_path: Path) -> None:
    first = write_demo_data(tmp_path / "a", samples_per_shard=5)
    second = write_demo_data(tmp_path / "b", samples_per_shard=5)
    hashes = _file_hashes(first.root)
    assert hashes == _file_hashes(second.root)
    assert first.keys == second.keys and len(first.shards) == -(-first.num_samples // 5)
    mtimes = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    assert write_demo_data(tmp_path / "a", samples_per_shard=5) == first
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*")} == mtimes
    # A different seed replaces the old demo in place, with different crops.
    reseeded = write_demo_data(tmp_path / "a", samples_per_shard=5, seed=1)
    assert reseeded.seed == 1 and _file_hashes(reseeded.root) != hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folders left behind


def test_refuses_to_clobber_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_demo_data(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_missing_scikit_image_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        demo_data.importlib.util, "find_spec", lambda n, *a: None if n == "skimage" else real(n, *a)
    )
    with pytest.raises(RuntimeError, match="pip install scikit-image"):
        write_demo_data(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
