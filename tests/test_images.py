"""decode_image and the pixel helpers on the awkward files real crawls contain, all generated here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from latentforge.preprocess.images import (
    SkipSample,
    content_hash,
    decode_image,
    hflip,
    image_info,
    resize_and_crop,
    stack_images,
    to_tensor,
)

MAX_PIXELS = 178_956_970  # CacheConfig.max_pixels default


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _skip_reason(data: bytes, name: str = "x.jpg", max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(SkipSample) as info:
        decode_image(data, name=name, max_pixels=max_pixels)
    assert info.value.detail and "\n" not in info.value.detail
    assert name in info.value.detail
    return info.value.reason


def _png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims width x height but carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# -- files that must be skipped ----------------------------------------------------------------------


def test_empty_file() -> None:
    assert _skip_reason(b"") == "empty_file"


def test_text_named_jpg() -> None:
    assert _skip_reason(b"<html><body>403 Forbidden</body></html>\n", name="photo.jpg") == "not_an_image"


def test_truncated_jpeg() -> None:
    data = _encode(_noise(64, 64), "JPEG", quality=90)
    assert _skip_reason(data[: len(data) // 2]) == "truncated"
    # Cut inside the header: also reported as truncation, not as a generic error.
    assert _skip_reason(data[:300]) == "truncated"


def test_corrupt_jpeg_body_is_decode_error_or_truncated() -> None:
    data = bytearray(_encode(_noise(32, 32), "JPEG"))
    data[200:] = b"\xff" * (len(data) - 200)
    assert _skip_reason(bytes(data)) in {"decode_error", "truncated"}


def test_decompression_bomb_header_is_rejected_before_decoding() -> None:
    # 100k x 100k: PIL's own guard fires inside Image.open.
    assert _skip_reason(_png_header_only(100_000, 100_000), name="bomb.png") == "too_many_pixels"
    # 5k x 5k is under PIL's limit, so our max_pixels check decides; had pixels been decoded, the tiny
    # IDAT would have failed as truncated instead.
    small_limit = 1_000_000
    assert _skip_reason(_png_header_only(5000, 5000), "bomb.png", small_limit) == "too_many_pixels"
    with pytest.raises(SkipSample) as info:
        image_info(_png_header_only(5000, 5000), max_pixels=small_limit)
    assert info.value.reason == "too_many_pixels"


def test_real_image_over_max_pixels() -> None:
    data = _encode(_noise(64, 64), "PNG")
    assert _skip_reason(data, "big.png", max_pixels=64 * 64 - 1) == "too_many_pixels"
    assert decode_image(data, name="big.png", max_pixels=64 * 64).size == (64, 64)


# -- modes ---------------------------------------------------------------------------------------------


def test_palette_with_transparency_composites_on_white() -> None:
    img = Image.new("P", (8, 4))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 red (transparent), 1 blue
    img.paste(1, (4, 0, 8, 4))
    out = decode_image(_encode(img, "PNG", transparency=0), name="p.png", max_pixels=MAX_PIXELS)
    assert out.mode == "RGB"
    arr = np.asarray(out)
    assert (arr[:, :4] == 255).all(), "transparent pixels must become white, not the palette colour"
    assert (arr[:, 4:] == [0, 0, 255]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composites_on_white(mode: str) -> None:
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (2, 0, 4, 2))
    rgba.putpixel((1, 1), (0, 0, 0, 128))
    img = rgba if mode == "RGBA" else rgba.convert("LA")
    arr = np.asarray(decode_image(_encode(img, "PNG"), name="a.png", max_pixels=MAX_PIXELS)).astype(int)
    assert (arr[0, :2] == 255).all() and (arr[:, 2:] == 0).all()
    assert abs(arr[1, 1, 0] - 127) <= 1  # half-transparent black over white


def test_cmyk_jpeg() -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(img, "JPEG", quality=95), name="c.jpg", max_pixels=MAX_PIXELS)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr16)
    assert img.mode == "I;16"
    out = decode_image(_encode(img, "PNG"), name="d.png", max_pixels=MAX_PIXELS)
    arr = np.asarray(out)
    assert out.mode == "RGB"
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]  # clipping would give [0, 255, 255, 255]
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_to_rgb(mode: str) -> None:
    gray = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1)))
    img = gray.convert(mode)
    out = decode_image(_encode(img, "PNG"), name="g.png", max_pixels=MAX_PIXELS)
    arr = np.asarray(out)
    assert out.mode == "RGB" and out.size == (16, 4)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    assert (arr[..., 0] == np.asarray(img.convert("L"))).all()


def test_exif_orientation_6_swaps_dims_and_rotates() -> None:
    stored = Image.new("RGB", (40, 20), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, name="r.jpg", max_pixels=MAX_PIXELS)
    assert (out.height, out.width) == (40, 20)
    assert image_info(data) == (40, 20)  # header-only answer agrees
    r, g, b = out.getpixel((out.width - 3, 2))  # stored top-left lands at the top-right
    assert r > 200 and g < 60 and b < 60


def test_1x1_decodes() -> None:
    out = decode_image(_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), name="1.png", max_pixels=1)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (10, 20, 30)


def test_image_info_plain() -> None:
    assert image_info(_encode(_noise(24, 40), "JPEG")) == (24, 40)
    with pytest.raises(SkipSample) as info:
        image_info(b"not an image")
    assert info.value.reason == "not_an_image"


# -- pixel helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "resized", "top_left", "target"),
    [
        ((300, 200), (96, 64), (0, 0), (96, 64)),  # exact fit
        ((300, 200), (120, 80), (12, 8), (96, 64)),  # downscale then crop
        ((30, 20), (96, 64), (0, 0), (64, 64)),  # upscale then crop
        ((64, 64), (64, 64), (8, 16), (32, 48)),  # no resize, crop only
    ],
)
def test_resize_and_crop_sizes(src, resized, top_left, target) -> None:
    out = resize_and_crop(_noise(*src), resized, top_left, target)
    assert (out.height, out.width) == target


def test_resize_and_crop_window_content() -> None:
    img = _noise(40, 50)
    out = resize_and_crop(img, (40, 50), (5, 7), (20, 30))
    assert np.array_equal(np.asarray(out), np.asarray(img)[5:25, 7:37])
    with pytest.raises(ValueError):
        resize_and_crop(img, (40, 50), (25, 0), (20, 30))


@settings(max_examples=40, deadline=None)
@given(st.integers(8, 80), st.integers(8, 80), st.integers(8, 80), st.integers(8, 80), st.data())
def test_resize_and_crop_property(h: int, w: int, rh: int, rw: int, data: st.DataObject) -> None:
    th, tw = data.draw(st.integers(1, rh)), data.draw(st.integers(1, rw))
    top, left = data.draw(st.integers(0, rh - th)), data.draw(st.integers(0, rw - tw))
    out = resize_and_crop(Image.new("RGB", (w, h), (1, 2, 3)), (rh, rw), (top, left), (th, tw))
    assert (out.height, out.width) == (th, tw) and out.mode == "RGB"


def test_hflip() -> None:
    img = _noise(3, 5)
    assert np.array_equal(np.asarray(hflip(img)), np.asarray(img)[:, ::-1])


def test_to_tensor_and_stack() -> None:
    img = Image.new("RGB", (6, 4), (0, 255, 0))
    t = to_tensor(img)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert t[0].eq(-1).all() and t[1].eq(1).all()
    mid = to_tensor(Image.new("RGB", (1, 1), (128, 128, 128)))
    assert torch.allclose(mid, torch.full_like(mid, 128 / 127.5 - 1), atol=1e-6)
    batch = stack_images([img, hflip(img)])
    assert batch.shape == (2, 3, 4, 6)
    with pytest.raises(ValueError):
        stack_images([img, Image.new("RGB", (4, 6))])
    with pytest.raises(ValueError):
        to_tensor(img.convert("L"))


def test_content_hash_stable() -> None:
    assert content_hash(b"latentforge") == content_hash(b"latentforge")
    assert len(content_hash(b"")) == 16
    assert content_hash(b"a") != content_hash(b"b")
    # Pinned: a change of algorithm or digest size would silently invalidate every cache's dedup keys.
    assert content_hash(b"latentforge").hex() == PINNED_HASH


PINNED_HASH = "35aa86ecad57ad596c03417e4820f6b8"  # blake2b(b"latentforge", digest_size=16)
