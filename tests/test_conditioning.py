"""Control images in the cache (`cache.conditioning`): they line up with the latent pixel for pixel.

A white square is drawn into each image and a red one at the same place into its sidecar map (at another
resolution); after caching with random crops and flips, the square must be in the stored control image
exactly where the recorded crop says, and Canny edges must outline it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.preprocess.buckets import plan_crop
from latentforge.preprocess.job import run_cache
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# (height, width, square top, square left, square side) in the original image
SHAPES = {"wide": (150, 260, 40, 170, 50), "tall": (260, 150, 150, 20, 60), "square": (180, 180, 30, 30, 70),
          "big": (400, 300, 220, 60, 90)}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _pair(h: int, w: int, top: int, left: int, side: int, map_scale: float) -> tuple[bytes, bytes]:
    """The image (grey, white square) and its sidecar (black, red square) at `map_scale` of its size."""
    image = np.full((h, w, 3), 60, np.uint8)
    image[top:top + side, left:left + side] = 255
    mh, mw = round(h * map_scale), round(w * map_scale)
    side_map = np.zeros((mh, mw, 3), np.uint8)
    t, lft, s = (round(v * map_scale) for v in (top, left, side))
    side_map[t:t + s, lft:lft + s, 0] = 255
    return _png(image), _png(side_map)


def write_sources(root: Path) -> tuple[Path, Path]:
    """A folder (maps at half size, beside each image) and a tar (maps at full size, as members)."""
    folder = root / "folder"
    folder.mkdir(parents=True)
    for name, (h, w, top, left, side) in SHAPES.items():
        image, side_map = _pair(h, w, top, left, side, 0.5)
        (folder / f"{name}.png").write_bytes(image)
        (folder / f"{name}.pose.png").write_bytes(side_map)
        (folder / f"{name}.txt").write_text(f"a square in a {name} picture")
    (folder / "nomap.png").write_bytes(_pair(120, 120, 10, 10, 20, 1.0)[0])  # no sidecar: skipped
    (folder / "nomap.txt").write_text("no map")
    tar_path = root / "shard-00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        members = []
        for name, (h, w, top, left, side) in SHAPES.items():
            image, side_map = _pair(h, w, top, left, side, 1.0)
            members += [(f"tar-{name}.png", image), (f"tar-{name}.pose.png", side_map), (f"tar-{name}.txt", b"a square")]
        members += [("broken.png", _pair(120, 120, 10, 10, 20, 1.0)[0]), ("broken.pose.png", b"not a png"),
                    ("broken.txt", b"broken map")]
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder, tar_path


def expected_box(key: str, original: tuple[int, int], crop: tuple[int, int], bucket: tuple[int, int]) -> tuple[float, ...]:
    """(top, left, bottom, right) of the square in the crop, from the recorded sizes and crop alone."""
    h, w, top, left, side = SHAPES[key.split("#")[0].removeprefix("tar-")]
    if key.endswith("#flip"):  # the flipped sample's crop is recorded in the mirrored image
        left = w - left - side
    rh, rw = plan_crop(h, w, bucket, "center").resized
    assert tuple(original) == (h, w)
    return (top * rh / h - crop[0], left * rw / w - crop[1], (top + side) * rh / h - crop[0], (left + side) * rw / w - crop[1])


def found_box(mask: np.ndarray) -> tuple[int, ...]:
    ys, xs = np.nonzero(mask)
    return ys.min(), xs.min(), ys.max() + 1, xs.max() + 1


def cache_with(tiny_sdxl: Path, root: Path, cache: Path, *extra: str) -> CacheReader:
    folder, tar_path = write_sources(root)
    sources = f"data.sources=[{{type: folder, path: '{folder}'}}, {{type: webdataset, path: '{tar_path}'}}]"
    config = load_config(DEMO, [f"model.pretrained={tiny_sdxl}", sources, f"cache.path={cache}", "buckets.resolutions=[128]",
                                "buckets.crop=random", "cache.flip=true", "upscale.enabled=false",
                                "train.output_dir=unused", *extra])
    assert run_cache(config) == 0
    return CacheReader(str(cache))


def test_sidecar_maps_follow_the_crop_and_flip_of_their_image(tiny_sdxl, tmp_path):
    reader = cache_with(tiny_sdxl, tmp_path / "data", tmp_path / "cache", "cache.conditioning.kind=sidecar",
                        "cache.conditioning.sidecar=pose")
    assert reader.spec.conditioning == "sidecar"
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert summary["samples"] == 2 * 2 * len(SHAPES)  # folder + tar, each flipped
    assert summary["skip_reasons"] == {"no_sidecar": 1, "bad_sidecar": 1}
    checked = 0
    for bucket, n in reader.bucket_counts().items():
        rows = reader.read_rows(bucket, range(n))
        assert rows["conditioning"].shape == (n, 3, *bucket)
        for i, key in enumerate(rows["key"]):
            want = expected_box(key, rows["original_size"][i].tolist(), rows["crop_top_left"][i].tolist(), bucket)
            red = rows["conditioning"][i, 0].numpy() > 127
            assert red.any(), key
            # Clipped to the crop: a square partly cut off is found where the crop keeps it.
            clipped = (max(want[0], 0), max(want[1], 0), min(want[2], bucket[0]), min(want[3], bucket[1]))
            assert np.allclose(found_box(red), clipped, atol=2.0), (key, found_box(red), want)
            checked += 1
    assert checked == 16 and summary["samples"] == 16


def test_canny_edges_outline_the_square(tiny_sdxl, tmp_path):
    reader = cache_with(tiny_sdxl, tmp_path / "data", tmp_path / "cache", "cache.conditioning.kind=canny")
    assert reader.spec.conditioning == "canny" and reader.spec.field("conditioning").shape == (1, "H", "W")
    for bucket, n in reader.bucket_counts().items():
        rows = reader.read_rows(bucket, range(n))
        for i, key in enumerate(rows["key"]):
            if key.split("#")[0] in ("nomap", "broken"):  # no square to find (no sidecar needed for canny)
                continue
            want = expected_box(key, rows["original_size"][i].tolist(), rows["crop_top_left"][i].tolist(), bucket)
            edges = rows["conditioning"][i, 0].numpy()
            assert set(np.unique(edges)) <= {0, 255}
            inside = (slice(max(int(want[0]) + 4, 0), max(int(want[2]) - 4, 0)),
                      slice(max(int(want[1]) + 4, 0), max(int(want[3]) - 4, 0)))
            assert not edges[inside].any(), key  # flat inside the square: no edges
            top, left, bottom, right = found_box(edges > 0)
            clipped = (max(want[0], 0), max(want[1], 0), min(want[2], bucket[0]), min(want[3], bucket[1]))
            # The edges lie on the square's border (within a pixel or two of it), where the crop keeps it.
            assert np.allclose((top, left, bottom, right), clipped, atol=3.0), (key, (top, left, bottom, right), want)


def test_a_cache_without_conditioning_keeps_its_fingerprint_and_json():
    from latentforge.shared.cache_fingerprint import fingerprint_inputs

    base = {"latent_mode": "mean", "store_dtype": "bfloat16", "vae_dtype": "float32", "text_dtype": "float32",
            "clip_skip": 0, "max_tokens": None, "flip": False, "max_pixels": 1, "missing_caption": "skip",
            "deterministic": True}
    args = {"pipeline_version": 1, "family": "sdxl", "model": {}, "buckets": {}, "upscale": {}, "upscale_weights": {}}
    off = fingerprint_inputs(cache={**base, "conditioning": {"kind": "none", "canny_low": 1}}, **args)
    assert off == fingerprint_inputs(cache=base, **args)
    canny = fingerprint_inputs(cache={**base, "conditioning": {"kind": "canny", "canny_low": 1.0, "canny_high": 2.0,
                                                                "canny_sigma": 1.0, "sidecar": "depth"}}, **args)
    assert canny["cache"]["conditioning"] == {"kind": "canny", "canny_low": 1.0, "canny_high": 2.0, "canny_sigma": 1.0}
    resized = fingerprint_inputs(cache={**base, "conditioning": {"kind": "canny", "canny_low": 1.0, "canny_high": 2.0,
                                                                  "canny_sigma": 1.0, "canny_resize": 224}}, **args)
    assert resized["cache"]["conditioning"]["canny_resize"] == 224  # counted only when set


def test_canny_at_a_fixed_size_is_enlarged_back_softly():
    """cache.conditioning.canny_resize (Stable Cascade's CannyFilter(resize=224)): edges found on the squashed
    image, enlarged bilinearly to the crop's size: soft values, on the square's border within one small pixel."""
    from PIL import Image

    from latentforge.preprocess.conditioning import canny_edges

    img = Image.new("RGB", (768, 512))  # W x H: squashed to 224 x 224, one small pixel is 3.4 x 2.3 pixels
    img.paste((255, 255, 255), (200, 100, 500, 400))  # x0, y0, x1, y1
    edges = canny_edges(img, 100.0, 200.0, 1.0, resize=224)[0]
    assert edges.shape == (512, 768) and edges.dtype == np.uint8
    assert len(set(np.unique(edges)) - {0, 255}) > 10  # bilinear enlargement: soft, not binary
    assert not edges[130:370, 240:460].any() and not edges[:60].any() and not edges[:, :150].any()
    top, left, bottom, right = found_box(edges > 0)
    assert np.allclose((top, left, bottom, right), (100, 200, 400, 500), atol=8)
    assert set(np.unique(canny_edges(img, 100.0, 200.0, 1.0)[0])) == {0, 255}  # unset: at the crop's size, binary


@pytest.mark.parametrize("bad", ["cache.conditioning.kind=edges", "cache.conditioning.sidecar=Depth.Map",
                                 "cache.conditioning.canny_low=300"])
def test_bad_conditioning_settings_are_one_line_errors(bad):
    from latentforge.shared.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [bad])
    assert "conditioning" in str(err.value) and "\n" not in str(err.value).strip()


def test_sidecar_skip_reasons():
    from latentforge.preprocess.conditioning import decode_sidecar
    from latentforge.preprocess.images import SkipSample

    half = _png(np.zeros((50, 100, 3), np.uint8))
    assert decode_sidecar(half, "k", "depth", (100, 200), 10**8).size == (100, 50)  # another size, same aspect
    for data, reason in ((None, "no_sidecar"), (b"not an image", "bad_sidecar"),
                         (_png(np.zeros((100, 100, 3), np.uint8)), "sidecar_size_mismatch")):
        with pytest.raises(SkipSample) as err:
            decode_sidecar(data, "k", "depth", (100, 200), 10**8)
        assert err.value.reason == reason and "k" in err.value.detail
