"""Decoding and pixel operations for the cache job.

Everything here works on one sample's bytes or one PIL image and has no knowledge of buckets or
configs: the caller decides sizes (see `latentforge.preprocess.buckets`) and passes explicit numbers.

A sample that cannot be used raises `SkipSample` with a short, stable `reason` code. The job counts
skips per reason and logs `detail`; one broken file must never stop a shard.

Sizes are always `(height, width)`, like tensors, never PIL's `(width, height)`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "SkipSample",
    "content_hash",
    "decode_image",
    "hflip",
    "image_info",
    "resize_and_crop",
    "stack_images",
    "to_tensor",
]

# EXIF orientations 5-8 rotate by 90 degrees, so height and width swap after transposition.
_SWAPS_AXES = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112
# Modes whose alpha must be flattened. "P"/"L"/"RGB" can also carry a tRNS transparency in img.info.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class SkipSample(Exception):
    """A sample the cache job skips and counts.

    `reason` is a stable snake_case code (`empty_file`, `not_an_image`, `too_many_pixels`, `truncated`,
    `decode_error`, and `too_small` which callers raise after sizing); `detail` is one human line.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _failure(name: str, what: str, exc: Exception) -> SkipSample:
    """Map a PIL exception to a skip: data that simply stops is `truncated`, anything else `decode_error`."""
    message = str(exc) or "unexpected end of data"
    if "truncated" in message.lower() or isinstance(exc, EOFError):
        return SkipSample("truncated", f"{name}: {what}: {message}")
    return SkipSample("decode_error", f"{name}: {what}: {exc.__class__.__name__}: {message}")


def _open(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Open lazily (header only) and apply the pixel limit before any pixel is decoded."""
    if not data:
        raise SkipSample("empty_file", f"{name}: file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own guard (Image.MAX_IMAGE_PIXELS) fired inside open(); the Warning is only raised
        # when someone turned warnings into errors, but it means the same thing.
        raise SkipSample("too_many_pixels", f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise SkipSample("not_an_image", f"{name}: not a recognised image format") from None
    except Exception as exc:  # any parser failure on untrusted bytes is a skip
        raise _failure(name, "cannot read header", exc) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise SkipSample("decode_error", f"{name}: header claims a {width}x{height} image")
    if max_pixels is not None and width * height > max_pixels:
        raise SkipSample(
            "too_many_pixels",
            f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )
    return img


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation known from the header, without decoding pixels."""
    try:
        if img.format == "PNG" and "exif" not in img.info:
            # PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after IDAT.
            # Such late chunks are rare; decode_image() still honours them, so its size is the truth.
            return 1
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # broken EXIF must not cost the sample; treat as upright
        return 1


def image_info(data: bytes, *, name: str = "<bytes>", max_pixels: int | None = None) -> tuple[int, int]:
    """`(height, width)` as `decode_image` will return it (EXIF orientation applied), from the header only.

    Cheap enough to bucket a whole shard before decoding. Raises `SkipSample` like `decode_image` for
    empty, unrecognised or oversized files; truncated pixel data is only found by `decode_image`.
    """
    img = _open(data, name, max_pixels)
    width, height = img.size
    if _header_orientation(img) in _SWAPS_AXES:
        return width, height
    return height, width


def _high_bit_to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits over its range (clipping would turn most
    16-bit photos pure white)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    elif img.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        lo, hi = 0.0, 65535.0  # PNG/TIFF 16-bit data that PIL widened to 32-bit "I"
    elif img.mode == "F" and arr.size and arr.min() >= 0 and arr.max() <= 1:
        lo, hi = 0.0, 1.0  # float images conventionally hold [0, 1]
    else:
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited onto white (the usual look of cut-outs on
    the web), never dropped, because dropped alpha exposes arbitrary colours under transparent pixels."""
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # applies palette/tRNS transparency and un-premultiplies RGBa/La
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    # CMYK (incl. Adobe-inverted JPEGs, handled by PIL's plugin), YCbCr, L, 1, P without alpha...
    return img.convert("RGB")


def decode_image(data: bytes, *, name: str, max_pixels: int) -> Image.Image:
    """Decode untrusted bytes into an upright 8-bit RGB image.

    Order matters: the pixel limit is checked from the header before any decoding (a 100k x 100k PNG
    is a few KB on disk), then pixels are fully loaded so truncation shows up here and not later in a
    worker, then EXIF orientation and the mode conversion are applied.

    Raises `SkipSample` with reason `empty_file`, `not_an_image`, `too_many_pixels`, `truncated` or
    `decode_error`.
    """
    img = _open(data, name, max_pixels)
    try:
        # ImageFile.LOAD_TRUNCATED_IMAGES stays False: a half-grey JPEG would poison the cache.
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample("too_many_pixels", f"{name}: {exc}") from None
    except MemoryError:
        raise SkipSample("too_many_pixels", f"{name}: out of memory while decoding {img.size}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad data
        raise _failure(name, "cannot decode pixels", exc) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF: keep stored orientation, as image_info does
        pass
    try:
        return _to_rgb(img)
    except Exception as exc:  # e.g. a mode PIL cannot convert
        raise SkipSample("decode_error", f"{name}: cannot convert mode {img.mode} to RGB ({exc})") from None


def resize_and_crop(
    img: Image.Image,
    resized: tuple[int, int],
    crop_top_left: tuple[int, int],
    target: tuple[int, int],
) -> Image.Image:
    """Resize to `resized` then cut the `target` window whose top-left corner is `crop_top_left`.

    All pairs are `(height, width)`. Lanczos with `reducing_gap=3.0` first box-reduces by an integer
    factor when shrinking a lot, which is faster than and visually indistinguishable from a full
    Lanczos pass, and still avoids the aliasing of a plain reduce.
    """
    rh, rw = resized
    top, left = crop_top_left
    th, tw = target
    if min(rh, rw, th, tw) <= 0:
        raise ValueError(f"sizes must be positive: resized={resized}, target={target}")
    if top < 0 or left < 0 or top + th > rh or left + tw > rw:
        raise ValueError(f"crop {target} at {crop_top_left} does not fit inside resized {resized}")
    if (img.height, img.width) != (rh, rw):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if (th, tw) == (rh, rw):
        return img
    return img.crop((left, top, left + tw, top + th))


def hflip(img: Image.Image) -> Image.Image:
    """Mirror left-right (the flip augmentation; callers must also mirror the crop offset they record)."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image to a float32 `(3, H, W)` tensor in [-1, 1], the input range of diffusers VAEs."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}; decode with decode_image()")
    # np.array (not asarray) gives a writable copy, which torch.from_numpy requires to avoid a warning.
    return u8_to_tensor(np.array(img, dtype=np.uint8))


def u8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """`(H, W, 3)` uint8 pixels (writable) to `to_tensor`'s float32 `(3, H, W)` in [-1, 1], bit for bit: the
    one conversion both the thread and the process preparation paths use."""
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def stack_images(imgs: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB images to one `(B, 3, H, W)` float32 batch in [-1, 1]."""
    if not imgs:
        raise ValueError("stack_images needs at least one image")
    sizes = {im.size for im in imgs}
    if len(sizes) != 1:
        raise ValueError(f"all images in a batch must have the same size, got (w, h) {sorted(sizes)}")
    return torch.stack([to_tensor(im) for im in imgs])


def content_hash(data: bytes) -> bytes:
    """16-byte BLAKE2b digest of the raw file bytes: dedup key and cache provenance."""
    return hashlib.blake2b(data, digest_size=16).digest()
