"""Enlarge images that are smaller than their bucket: Real-ESRGAN, optional GFPGAN faces, Lanczos fallback.

Weights are loaded with spandrel (it reads the usual `.pth` files, basicsr `params_ema` checkpoints
included, and detects the architecture); the realesrgan/gfpgan/basicsr packages are not used because
they no longer import with current torchvision and download face-detector weights at start-up. Faces
are found with scikit-image's bundled LBP frontal-face cascade, so nothing is ever downloaded. See
docs/upscaling.md for the decision and its trade-offs.

Contract with the caller: record the sample's `original_size` BEFORE calling `Upscaler.upscale`. The
trainer conditions on the original size (SDXL micro-conditioning) so that it can learn that small
sources look soft; if the upscaled size were recorded instead, the model would learn Real-ESRGAN
artefacts as "what a large photo looks like". `upscale` therefore changes only pixels and size: it
never mutates its input and returns the method it used, which the caller stores per sample.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

    from latentforge.shared.config import UpscaleConfig

__all__ = ["FACE_SIZE", "Upscaler"]

log = logging.getLogger(__name__)

FACE_SIZE = 512  # GFPGAN v1.x works on 512x512 face crops
# Face crop = detector box x _FACE_EXPAND, centred a little below the box centre: a rough stand-in for
# the FFHQ framing GFPGAN was trained on (eyes at ~47 %, mouth at ~72 % of the crop height).
_FACE_EXPAND = 2.0
_FACE_CENTER_Y = 0.55
_FACE_MIN_PX = 24  # the LBP cascade's detection window; smaller faces cannot be found
_FACE_MIN_NEIGHBOURS = 6  # higher than skimage's 4: fewer false positives on textures


def _to_tensor01(img: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    arr = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype).div_(255.0)


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> (3, H, W) uint8 on the CPU (rounded in float32, whatever the dtype)."""
    return t[0].float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8).cpu()


def _from_uint8(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _cover_size(h: int, w: int, min_h: int, min_w: int) -> tuple[int, int]:
    """Smallest aspect-preserving size (within rounding) with both sides >= the minimum."""
    f = max(min_h / h, min_w / w)
    return max(min_h, round(h * f)), max(min_w, round(w * f))


def _feather_mask(side: int) -> Image.Image:
    """Square mask: 255 inside, linear ramp to 0 over the outer 10 % so pasted faces have no seam."""
    ramp = max(1, side // 10)
    idx = np.arange(side)
    edge = np.minimum(np.minimum(idx, idx[::-1]) + 1, ramp) / ramp
    return Image.fromarray(np.rint(np.minimum.outer(edge, edge) * 255).astype(np.uint8), "L")


class Upscaler:
    """Enlarges small RGB images; construct once per worker (loading weights takes seconds).

    `model_path`: Real-ESRGAN (or any spandrel super-resolution) `.pth`/`.safetensors`. None or a
    missing file logs ONE warning naming it and every image is enlarged with Lanczos instead; nothing
    is downloaded. A file that exists but is not a usable SR model raises `ValueError`.
    `face_model_path`: optional GFPGAN v1.x weights, used only on top of Real-ESRGAN.
    `tile`/`tile_pad`: the network runs on `tile`-pixel input tiles, each padded by `tile_pad` pixels of
    real neighbouring context that is cropped off again, so large images fit in memory without seams.
    `tile <= 0` disables tiling.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None,
        face_model_path: str | os.PathLike[str] | None = None,
        tile: int = 256,
        tile_pad: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if tile_pad < 0:
            raise ValueError(f"tile_pad must be >= 0, got {tile_pad}")
        self.tile = int(tile)
        self.tile_pad = int(tile_pad)
        self.device = torch.device(device)
        self.dtype = dtype
        self._sr: ImageModelDescriptor | None = None
        self._face: ImageModelDescriptor | None = None
        self._cascade = None  # skimage.feature.Cascade, created on first use
        self.scale = 1

        missing = None
        if model_path is None:
            missing = "upscale.model_path is not set"
        elif not os.path.isfile(model_path):
            missing = f"Real-ESRGAN weights {os.fspath(model_path)!r} not found"
        if missing is not None:
            ignored = f"; face model {os.fspath(face_model_path)!r} ignored" if face_model_path else ""
            log.warning(
                "%s: small images are enlarged with Lanczos instead (nothing is downloaded; put e.g. "
                "RealESRGAN_x4plus.pth on disk and set upscale.model_path)%s",
                missing,
                ignored,
            )
            return

        self._sr = self._load(model_path, self.dtype)
        if self._sr.purpose != "SR" or self._sr.scale < 2 or self._sr.input_channels != 3:
            raise ValueError(
                f"{os.fspath(model_path)}: {self._sr.architecture.name} is a {self._sr.scale}x "
                f"{self._sr.purpose} model; upscale.model_path needs a 3-channel super-resolution "
                "model such as RealESRGAN_x4plus.pth"
            )
        self.scale = int(self._sr.scale)
        log.info("upscaler: %s x%d from %s", self._sr.architecture.name, self.scale, os.fspath(model_path))

        if face_model_path is None:
            return
        if not os.path.isfile(face_model_path):
            log.warning("GFPGAN weights %r not found: faces are not restored", os.fspath(face_model_path))
            return
        face = self._load(face_model_path, self.dtype)
        if face.architecture.id != "GFPGAN":
            raise ValueError(
                f"{os.fspath(face_model_path)}: is {face.architecture.name}; upscale.face_model_path needs "
                "GFPGAN v1.x weights such as GFPGANv1.4.pth"
            )
        self._face = face

    @property
    def uses_model(self) -> bool:
        """Whether a super-resolution network was loaded (else small images are enlarged with Lanczos)."""
        return self._sr is not None

    @classmethod
    def from_config(
        cls, config: UpscaleConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Upscaler:
        return cls(config.model_path, config.face_model_path, config.tile, config.tile_pad, device, dtype)

    def _load(self, path: str | os.PathLike[str], dtype: torch.dtype) -> ImageModelDescriptor:
        import spandrel  # lazy: keeps `import latentforge.preprocess.upscale` cheap for Lanczos-only runs

        from .model_load import built_on

        loader = spandrel.ModelLoader(device=self.device)
        try:
            # spandrel reads the weights onto the device but builds the network on the host and moves it after;
            # built under torch.device, the network is allocated on the device too (no host copy).
            state = loader.load_state_dict_from_file(os.fspath(path))
            with built_on(self.device, os.fspath(path)):
                desc = loader.load_from_state_dict(state)
        except spandrel.UnsupportedModelError:
            raise ValueError(
                f"{os.fspath(path)}: spandrel does not recognise this model's architecture"
            ) from None
        except Exception as exc:
            raise ValueError(
                f"{os.fspath(path)}: cannot load model ({exc.__class__.__name__}: {exc})"
            ) from None
        if not isinstance(desc, spandrel.ImageModelDescriptor):
            raise ValueError(f"{os.fspath(path)}: {desc.architecture.name} is not an image-to-image model")
        supported = dtype == torch.float32 or (
            desc.supports_bfloat16 if dtype == torch.bfloat16 else desc.supports_half
        )
        if not supported:
            log.info("%s does not support %s; running it in float32", desc.architecture.name, dtype)
        return desc.to(dtype if supported else torch.float32).eval()

    @property
    def method(self) -> str:
        """What this upscaler can do: "realesrgan+gfpgan", "realesrgan" or "lanczos"."""
        if self._sr is None:
            return "lanczos"
        return "realesrgan+gfpgan" if self._face is not None else "realesrgan"

    def upscale(self, img: Image.Image, min_size: tuple[int, int]) -> tuple[Image.Image, str]:
        """Enlarge `img` until it covers `min_size` = (height, width); returns (image, method).

        The method is "realesrgan+gfpgan" only when a face was actually restored, "realesrgan" or
        "lanczos" otherwise, and "none" if `img` already covers `min_size` (returned unchanged). The
        result may be larger than `min_size` (a x4 network gives x4); the caller's resize/crop
        brings it to the bucket. The input image is never modified.
        """
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {img.mode}")
        min_h, min_w = min_size
        if img.height >= min_h and img.width >= min_w:
            return img, "none"
        if self._sr is None:
            new_h, new_w = _cover_size(img.height, img.width, min_h, min_w)
            return img.resize((new_w, new_h), Image.Resampling.LANCZOS), "lanczos"

        out = img
        while out.height < min_h or out.width < min_w:
            if out is not img:
                # Later passes run on synthetic pixels: shrink them first to just what the last pass needs
                # instead of paying for (and then throwing away) a much larger output.
                need_h, need_w = _cover_size(
                    out.height, out.width, math.ceil(min_h / self.scale), math.ceil(min_w / self.scale)
                )
                if need_h < out.height:
                    out = out.resize((need_w, need_h), Image.Resampling.LANCZOS)
            out = self._run_sr(out)
        if self._face is not None and self._restore_faces(img, out) > 0:
            return out, "realesrgan+gfpgan"
        return out, "realesrgan"

    @torch.inference_mode()
    def _run_sr(self, img: Image.Image) -> Image.Image:
        """One network pass, tiled in the standard Real-ESRGAN way."""
        x = _to_tensor01(img, self.device, self._sr.dtype)
        _, _, h, w = x.shape
        s = self.scale
        if self.tile <= 0 or (h <= self.tile and w <= self.tile):
            return _from_uint8(_to_uint8(self._sr(x)))
        out = torch.empty((3, h * s, w * s), dtype=torch.uint8)  # assembled on the CPU: saves GPU memory
        pad, tile = self.tile_pad, self.tile
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                # Pad with real neighbouring pixels (clamped at the border) so the network sees context...
                py0, py1 = max(y0 - pad, 0), min(y1 + pad, h)
                px0, px1 = max(x0 - pad, 0), min(x1 + pad, w)
                y = self._sr(x[:, :, py0:py1, px0:px1])
                # ...then keep only the output of the unpadded tile.
                oy, ox = (y0 - py0) * s, (x0 - px0) * s
                out[:, y0 * s : y1 * s, x0 * s : x1 * s] = _to_uint8(
                    y[:, :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
                )
        return _from_uint8(out)

    def detect_faces(self, img: Image.Image) -> list[tuple[int, int, int, int]]:
        """Frontal faces as (top, left, height, width) boxes, using the bundled LBP cascade."""
        if self._cascade is None:
            # Imported lazily: scikit-image is only needed when faces are restored.
            from skimage.data import lbp_frontal_face_cascade_filename
            from skimage.feature import Cascade

            self._cascade = Cascade(lbp_frontal_face_cascade_filename())
        side = min(img.height, img.width)
        if side < _FACE_MIN_PX:
            return []
        gray = np.asarray(img.convert("L"))
        found = self._cascade.detect_multi_scale(
            img=gray,
            scale_factor=1.2,
            step_ratio=1,
            min_size=(_FACE_MIN_PX, _FACE_MIN_PX),
            max_size=(side, side),
            min_neighbor_number=_FACE_MIN_NEIGHBOURS,
        )
        return [(int(d["r"]), int(d["c"]), int(d["height"]), int(d["width"])) for d in found]

    @torch.inference_mode()
    def _restore_faces(self, src: Image.Image, out: Image.Image) -> int:
        """Detect faces on the source, restore each with GFPGAN and paste it into `out` in place.

        Like GFPGANer, the network input is cut from the degraded source (what GFPGAN was trained on),
        not from the Real-ESRGAN output; the restored face replaces the same region of the output.
        """
        sx, sy = out.width / src.width, out.height / src.height
        restored = 0
        for top, left, height, width in self.detect_faces(src):
            size = max(height * sy, width * sx) * _FACE_EXPAND
            side = int(min(round(size), out.width, out.height))
            cx, cy = (left + width / 2) * sx, (top + height / 2) * sy
            x0 = int(min(max(round(cx - side / 2), 0), out.width - side))
            y0 = int(min(max(round(cy - side * _FACE_CENTER_Y), 0), out.height - side))
            box = (x0 / sx, y0 / sy, (x0 + side) / sx, (y0 + side) / sy)  # same region in source pixels
            crop = src.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BICUBIC, box=box)
            x = _to_tensor01(crop, self.device, self._face.dtype).mul_(2).sub_(1)  # GFPGAN works in [-1, 1]
            # Stored noise buffers instead of fresh random noise: the same input gives the same cache.
            y = self._face.model(x, return_rgb=False, randomize_noise=False)[0]
            face = _from_uint8(_to_uint8(y.add(1).div(2)))
            if side != FACE_SIZE:
                face = face.resize((side, side), Image.Resampling.LANCZOS)
            out.paste(face, (x0, y0), _feather_mask(side))
            restored += 1
        return restored
