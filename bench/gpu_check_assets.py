"""What `bench.gpu_check` needs on disk before it caches or trains: the model folder, the images, and a
Real-ESRGAN checkpoint, all made locally (the GPU machine has no internet).

* `build_model_folder`: a diffusers SDXL pipeline folder with random weights at the real sizes, built from
  the configs shipped in `devkit/real-configs/sdxl/` directly on the GPU (random init of 3.4 B parameters
  takes seconds there, minutes on a CPU), then saved: UNet and both text encoders in bf16 (half the bytes
  to write, and to hash: the cache fingerprints the encoder files), the VAE in fp32. The real CLIP
  vocabularies are not shipped and cannot be downloaded, so tokenizer/ and tokenizer_2/ hold the devkit's
  code-built CLIP BPE tokenizer (`devkit.clip_tokenizer`, ~900 tokens, SDXL's two pad tokens); the text
  encoders keep the real 49,408-row embedding tables and take the tokenizer's special-token ids.
  `--tiny` uses the devkit's tiny SDXL pipeline instead.
* `make_images`: N distinct images made from the demo photos (rotated, mirrored, cropped to three aspect
  ratios and resized); a quarter of them smaller than the bucket, so the upscaler runs.
* `write_esrgan`: a randomly initialised RRDBNet with Real-ESRGAN x4plus's hyper-parameters, saved with
  the basicsr key names of `RealESRGAN_x4plus.pth`, so the cache job loads it through spandrel like the
  real file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from latentforge.devkit.esrgan_weights import basicsr_keys

MARKER = "gpu_check_assets.json"
ASSETS_VERSION = 1  # bump when what is written changes, so reruns on a warm machine rebuild
# (width, height) ratios: three shapes keep every bucket populated enough for a global batch.
ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4))
TOKENIZER_NOTE = ("tokenizer/ and tokenizer_2/ hold the devkit's code-built CLIP BPE tokenizer "
                  "(devkit/clip_tokenizer.py: ~900-token vocabulary, pads <|endoftext|> and '!'); the real CLIP "
                  "vocabulary files are not shipped and this machine has no internet. The text encoders keep "
                  "the real 49,408-entry embedding tables.")


def _marker_ok(folder: Path, want: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == want
    except (OSError, ValueError):
        return False


def _write_marker(folder: Path, doc: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps(doc, indent=1) + "\n")  # written last: the folder is complete


# ---- the model folder ----------------------------------------------------------------------------------
def build_model_folder(workdir: Path, tiny: bool, device: str) -> tuple[Path, dict[str, Any]]:
    """The SDXL pipeline folder to cache and train with, and how it was made (seconds per component).

    Reused when a complete folder of the same kind is already there (a rerun on a warm machine)."""
    if tiny:
        from latentforge.devkit.tiny_models import build_tiny_pipeline

        t = time.perf_counter()
        out = build_tiny_pipeline("sdxl", workdir / "model-tiny")
        return out, {"kind": "devkit tiny SDXL pipeline", "seconds": round(time.perf_counter() - t, 2),
                     "tokenizers": "the tiny pipeline's code-built CLIP tokenizers"}
    out = workdir / "model-sdxl"
    want = {"kind": "sdxl real-size random", "version": ASSETS_VERSION}
    if _marker_ok(out, want):
        return out, {"kind": "SDXL real-size, random weights", "reused": True, "seconds": 0.0, "tokenizers": TOKENIZER_NOTE}
    t = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = _build_real_sdxl(tmp, device)
    _write_marker(tmp, want)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    info.update(kind="SDXL real-size, random weights", reused=False, seconds=round(time.perf_counter() - t, 2),
                tokenizers=TOKENIZER_NOTE)
    return out, info


def _build_real_sdxl(out: Path, device: str) -> dict[str, Any]:
    """Init every component on `device` from the shipped configs, cast, save; time init and save apart."""
    import torch
    from transformers import AutoConfig

    from latentforge.devkit import real_sizes
    from latentforge.devkit.clip_tokenizer import EOS_TOKEN, make_clip_tokenizer

    real = real_sizes.config_folder("sdxl")
    out.mkdir(parents=True)
    shutil.copy(real / "model_index.json", out / "model_index.json")
    (out / "scheduler").mkdir()
    shutil.copy(real / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    tokenizers = {"tokenizer": make_clip_tokenizer(pad_token=EOS_TOKEN), "tokenizer_2": make_clip_tokenizer(pad_token="!")}
    for sub, tok in tokenizers.items():
        tok.save_pretrained(out / sub)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    parts: dict[str, Any] = {}
    for i, (sub, dtype) in enumerate((("unet", torch.bfloat16), ("vae", torch.float32),
                                      ("text_encoder", torch.bfloat16), ("text_encoder_2", torch.bfloat16))):
        torch.manual_seed(i)
        t = time.perf_counter()
        if sub.startswith("text_encoder"):
            # The real config, with the special-token ids of the tokenizer it will be fed by (pooling looks
            # for the eos id).
            tok = tokenizers["tokenizer" + sub.removeprefix("text_encoder")]
            cfg = AutoConfig.from_pretrained(real / sub)
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
            with torch.device(device):
                model = real_sizes.model_class("sdxl", sub)(cfg)
        else:
            model = real_sizes.build_component("sdxl", sub, device)
        sync()
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        model = model.to(dtype)
        model.save_pretrained(out / sub)
        parts[sub] = {"parameters": sum(p.numel() for p in model.parameters()), "saved_dtype": str(dtype).split(".")[-1],
                      "init_s": round(init_s, 2), "save_s": round(time.perf_counter() - t, 2), "init_device": device}
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"components": parts, "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


# ---- Real-ESRGAN -----------------------------------------------------------------------------------------
def write_esrgan(workdir: Path, tiny: bool) -> tuple[Path, dict[str, Any]]:
    """RRDBNet x4 with random weights as `{"params_ema": ...}`: Real-ESRGAN x4plus sizes (64 filters, 23
    blocks, 16.7 M parameters); --tiny: 16 filters, 2 blocks, so the CPU run stays short."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    filters, blocks = (16, 2) if tiny else (64, 23)
    path = workdir / f"RealESRGAN_x4plus_random_{filters}f{blocks}b.pth"
    if not path.is_file():
        torch.manual_seed(0)
        net = ESRGAN(in_nc=3, out_nc=3, num_filters=filters, num_blocks=blocks, scale=4)
        tmp = path.with_suffix(".tmp")
        torch.save({"params_ema": basicsr_keys(net.state_dict())}, tmp)
        os.replace(tmp, path)
    return path, {"path": str(path), "architecture": f"RRDBNet x4, {filters} filters, {blocks} blocks, random weights",
                  "bytes": path.stat().st_size}


# ---- images ----------------------------------------------------------------------------------------------
def _photos(workdir: Path) -> list[tuple[Path, str]]:
    """(image, caption) of every demo photo in the demo data's folder copy."""
    from latentforge.devkit.demo_data import write_demo_data

    demo = write_demo_data(workdir / "demo-data")
    out = []
    for p in sorted(demo.folder.rglob("*")):
        if p.suffix.lower() not in (".jpg", ".png"):
            continue
        txt, side = p.with_suffix(".txt"), p.with_suffix(".json")
        caption = txt.read_text() if txt.is_file() else json.loads(side.read_text())["caption"]
        out.append((p, caption.strip()))
    return out


def _variant(i: int, photo: Path, caption: str, resolution: int, out: Path) -> dict[str, Any]:
    """Image i: rotated by a multiple of 90 degrees, maybe mirrored, a random crop of one of three aspect
    ratios, resized so its short side is >= the bucket side (3 in 4) or 55-90 % of it (1 in 4: upscaled)."""
    from PIL import Image, ImageOps

    rng = random.Random(1_000_003 * i + 17)
    with Image.open(photo) as im:
        img = ImageOps.exif_transpose(im).convert("L" if im.mode == "L" else "RGB")
    turns = rng.randrange(4)
    if turns:
        img = img.rotate(90 * turns, expand=True)
    mirrored = rng.random() < 0.5
    if mirrored:
        img = ImageOps.mirror(img)
    aw, ah = ASPECTS[i % len(ASPECTS)]
    scale = rng.uniform(0.7, 1.0)
    cw = min(img.width, img.height * aw / ah) * scale
    ch = cw * ah / aw
    x0, y0 = rng.uniform(0, img.width - cw), rng.uniform(0, img.height - ch)
    small = i % 4 == 3
    short = rng.randint(int(0.55 * resolution), int(0.9 * resolution)) if small else \
        rng.randint(resolution, int(1.35 * resolution))
    size = (short * aw // ah, short) if aw >= ah else (short, short * ah // aw)
    img = img.resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    img.save(out / f"{i:05d}.jpg", "JPEG", quality=92)
    what = f"rotated {90 * turns} degrees{', mirrored' if mirrored else ''}, {aw}:{ah} crop"
    (out / f"{i:05d}.txt").write_text(f"{caption}, {what}")
    return {"size": size, "small": small}


def make_images(workdir: Path, count: int, resolution: int) -> tuple[Path, dict[str, Any]]:
    """`count` distinct JPEGs with .txt captions in one folder (the cache job's `folder` source)."""
    out = workdir / f"images-{count}-{resolution}"
    want = {"count": count, "resolution": resolution, "version": ASSETS_VERSION}
    t = time.perf_counter()
    if not _marker_ok(out, want):
        photos = _photos(workdir)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        # PIL releases the GIL while it resizes and encodes, so threads use every core.
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            made = list(pool.map(lambda i: _variant(i, *photos[i % len(photos)], resolution, out), range(count)))
        summary = {"images": count, "from_photos": len(photos), "smaller_than_bucket": sum(m["small"] for m in made),
                   "short_side_px": [min(min(m["size"]) for m in made), max(min(m["size"]) for m in made)]}
        (out / "made.json").write_text(json.dumps(summary, indent=1) + "\n")
        _write_marker(out, want)
    summary = json.loads((out / "made.json").read_text())
    return out, {**summary, "seconds": round(time.perf_counter() - t, 2), "folder": str(out)}
