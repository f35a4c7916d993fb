"""Upscaler with randomly initialised networks of the real architectures, saved as the usual .pth files.

No weights are downloaded: a small RRDBNet (Real-ESRGAN's architecture, fewer blocks) and a full-size
GFPGAN v1.4 architecture are initialised randomly, saved like the released checkpoints and loaded back
through spandrel, so the loading, tiling, face detection and pasting code paths are the real ones; only
the picture quality is not tested.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.GFPGAN import GFPGAN

from latentforge.devkit.esrgan_weights import basicsr_keys
from latentforge.preprocess.upscale import Upscaler

LOGGER = "latentforge.preprocess.upscale"


@pytest.fixture(scope="module")
def esrgan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=4)
    state = net.state_dict()
    # Random weights give a nearly flat dark output that hides tiling seams in uint8; more contrast in the
    # last conv makes the output depend visibly on its input (the tile_pad=0 check below proves it).
    state["model.10.weight"] *= 8
    state["model.10.bias"].fill_(0.5)
    state = basicsr_keys(state)
    assert {"conv_first.weight", "body.1.rdb3.conv5.bias", "conv_body.weight", "conv_last.weight"} <= set(
        state
    )
    path = tmp_path_factory.mktemp("weights") / "RealESRGAN_x4plus_tiny.pth"
    torch.save({"params_ema": state}, path)
    return path


@pytest.fixture(scope="module")
def gfpgan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # The hyper-parameters spandrel assumes for GFPGAN v1.3/v1.4 (and GFPGANer uses): a 348 MB file.
    net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                 fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                 sft_half=True)  # fmt: skip
    path = tmp_path_factory.mktemp("weights") / "GFPGANv1.4_random.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    return path


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _astronaut(side: int) -> Image.Image:
    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.origin is not None
    img = Image.open(Path(spec.origin).parent / "data" / "astronaut.png").convert("RGB")
    return img.resize((side, side), Image.Resampling.LANCZOS)


def test_realesrgan_upscale(esrgan_path: Path) -> None:
    up = Upscaler(str(esrgan_path), None, tile=1024, tile_pad=0)
    assert up.method == "realesrgan" and up.scale == 4
    img = _noise(24, 32)
    before = img.tobytes()
    out, method = up.upscale(img, (96, 128))
    assert method == "realesrgan"
    assert (out.height, out.width) == (96, 128) and out.mode == "RGB"
    assert img.tobytes() == before and img.size == (32, 24), "the input must not change"


def test_repeated_passes_cover_min_size(esrgan_path: Path) -> None:
    up = Upscaler(esrgan_path, None, tile=1024, tile_pad=0)
    out, method = up.upscale(_noise(12, 16), (96, 128))  # x8 needed: two x4 passes, the 2nd on 24x32
    assert method == "realesrgan" and (out.height, out.width) == (96, 128)
    out, _ = up.upscale(_noise(10, 17), (100, 60))
    assert out.height >= 100 and out.width >= 60


def test_tiled_matches_untiled(esrgan_path: Path) -> None:
    img = _noise(24, 32, seed=1)
    ref = np.asarray(Upscaler(esrgan_path, None, tile=1024, tile_pad=0).upscale(img, (96, 128))[0]).astype(
        int
    )
    tiled = np.asarray(Upscaler(esrgan_path, None, tile=16, tile_pad=8).upscale(img, (96, 128))[0]).astype(
        int
    )
    assert tiled.shape == ref.shape
    assert np.abs(tiled - ref).max() <= 2
    # Without overlap the tile borders show: the comparison above is sensitive to tiling.
    seams = np.asarray(Upscaler(esrgan_path, None, tile=16, tile_pad=0).upscale(img, (96, 128))[0]).astype(
        int
    )
    assert np.abs(seams - ref).max() > 10


def test_bfloat16_runs_close_to_float32(esrgan_path: Path) -> None:
    img = _noise(16, 16, seed=2)
    ref = np.asarray(Upscaler(esrgan_path, None, tile=0, tile_pad=0).upscale(img, (64, 64))[0]).astype(int)
    up = Upscaler(esrgan_path, None, tile=0, tile_pad=0, dtype=torch.bfloat16)
    out = np.asarray(up.upscale(img, (64, 64))[0]).astype(int)
    assert out.shape == ref.shape and np.abs(out - ref).mean() < 8


def test_already_large_enough_is_untouched(esrgan_path: Path) -> None:
    img = _noise(100, 130)
    out, method = Upscaler(esrgan_path, None, tile=64, tile_pad=8).upscale(img, (96, 128))
    assert out is img and method == "none"


def test_missing_weights_fall_back_to_lanczos_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "RealESRGAN_x4plus.pth"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        up = Upscaler(str(missing), None, tile=256, tile_pad=16)
        assert up.method == "lanczos"
        for _ in range(2):
            out, method = up.upscale(_noise(24, 32), (96, 128))
            assert method == "lanczos" and (out.height, out.width) == (96, 128)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert str(missing) in warnings[0].getMessage() and "Lanczos" in warnings[0].getMessage()


def test_no_model_path_is_lanczos(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        up = Upscaler(None, None, tile=256, tile_pad=16)
    assert up.method == "lanczos" and len(caplog.records) == 1
    out, method = up.upscale(_noise(10, 30), (40, 40))
    assert method == "lanczos" and out.size == (120, 40)  # aspect kept, both sides cover


def test_unusable_files_raise(tmp_path: Path, esrgan_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    torch.save({"params_ema": {"foo.weight": torch.zeros(1)}}, junk)
    with pytest.raises(ValueError, match="junk.pth"):
        Upscaler(junk, None, tile=256, tile_pad=16)
    with pytest.raises(ValueError, match="GFPGAN"):
        Upscaler(esrgan_path, esrgan_path, tile=256, tile_pad=16)  # an SR model given as face model


def test_missing_face_model_warns_and_keeps_realesrgan(
    tmp_path: Path, esrgan_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        up = Upscaler(esrgan_path, tmp_path / "GFPGANv1.4.pth", tile=256, tile_pad=16)
    assert up.method == "realesrgan"
    assert len(caplog.records) == 1 and "GFPGANv1.4.pth" in caplog.records[0].getMessage()


def test_face_detector_finds_the_astronaut() -> None:
    up = Upscaler(None, None, tile=256, tile_pad=16)
    faces = up.detect_faces(_astronaut(512))
    # Her face is at roughly rows 70-160, columns 175-265 of the 512x512 photo.
    assert any(60 <= top + h / 2 <= 170 and 170 <= left + w / 2 <= 270 for top, left, h, w in faces)
    assert up.detect_faces(_noise(64, 64)) == []


@pytest.mark.slow
def test_gfpgan_restores_the_astronaut_face(esrgan_path: Path, gfpgan_path: Path) -> None:
    img = _astronaut(256)
    up = Upscaler(esrgan_path, gfpgan_path, tile=128, tile_pad=16)
    assert up.method == "realesrgan+gfpgan"
    faces = up.detect_faces(img)
    assert len(faces) == 1
    top, left, h, w = (4 * v for v in faces[0])  # in output pixels (one x4 pass)
    out, method = up.upscale(img, (1024, 1024))
    assert method == "realesrgan+gfpgan" and out.size == (1024, 1024)

    plain, plain_method = Upscaler(esrgan_path, None, tile=128, tile_pad=16).upscale(img, (1024, 1024))
    assert plain_method == "realesrgan"
    changed = np.any(np.asarray(out) != np.asarray(plain), axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.size > 0, "the face region must have been replaced"
    # Only a square of about twice the detected box, containing the face, changed; the rest is untouched.
    assert rows.min() <= top + h / 2 <= rows.max() and cols.min() <= left + w / 2 <= cols.max()
    assert rows.max() - rows.min() < 2 * h + 2 and cols.max() - cols.min() < 2 * w + 2
    assert changed.mean() < 0.25
    # No face -> plain Real-ESRGAN, even with GFPGAN loaded.
    assert up.upscale(_noise(24, 32), (96, 128))[1] == "realesrgan"
