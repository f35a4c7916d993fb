"""The baseline `bench.gpu_check` compares the cache against: training with the VAE and both text encoders
inside the loop, as trainers without a latent cache do (diffusers' train_text_to_image_sdxl, kohya without
--cache_latents).

Per step: decode `micro` images from disk with PIL (EXIF-rotated, cover-resized with Lanczos and
centre-cropped to one square bucket; a thread pool decodes the next batch while this one trains, which
favours this baseline), encode them with the VAE in fp32 (latent_dist.sample() x scaling factor) and the
captions with both CLIP encoders in fp32 (penultimate hidden states concatenated, pooled from the second),
then one UNet step: the model's scheduler config as DDPM noise, epsilon MSE, gradient checkpointing,
bf16 autocast over fp32 weights, gradient clipping 1.0 and plain `torch.optim.AdamW` (fused on CUDA). No
DeepSpeed: `unet_step_s` is reported apart, so the encoders' cost can be set against the DeepSpeed step
too. On the CPU (--tiny) everything runs in fp32.

    python -m bench.gpu_check_inloop --model DIR --images DIR --out FILE [--steps 30] [--micro 4] [--resolution 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any


def decode(path: Path, side: int) -> Any:
    """One image as a (3, side, side) float tensor in [-1, 1]: cover-resize, centre crop."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    scale = side / min(img.size)
    w, h = max(side, round(img.width * scale)), max(side, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class Models:
    """The pipeline folder's UNet (trained), VAE and text encoders (frozen), tokenizers and noise schedule."""

    def __init__(self, folder: Path, device: Any, cuda: bool) -> None:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.device = device
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).to(device)
        self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).to(device).eval()
        self.tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
        self.encoders = [
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32).to(device).eval(),
            CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                        torch_dtype=torch.float32).to(device).eval(),
        ]
        for frozen in (self.vae, *self.encoders):
            frozen.requires_grad_(False)
        self.noise = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=1e-2, **({"fused": True} if cuda else {}))
        self.cuda = cuda

    def encode(self, pixels: Any, captions: list[str]) -> tuple[Any, Any, Any]:
        """Latents (scaled), prompt embeddings (B, 77, 2048) and pooled embeddings (B, 1280)."""
        import torch

        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.device)).latent_dist.sample() * self.vae.config.scaling_factor
            hidden, pooled = [], None
            for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
                ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                out = enc(ids.to(self.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", pooled)
        return latents, torch.cat(hidden, dim=-1), pooled

    def unet_step(self, latents: Any, embeds: Any, pooled: Any, side: int) -> float:
        """Noise, predict, epsilon MSE, backward, clip, AdamW step; returns the loss."""
        import torch

        b = latents.shape[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (b,), device=self.device)
        noisy = self.noise.add_noise(latents, noise, t)
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * b, device=self.device, dtype=torch.float32)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            pred = self.unet(noisy, t, encoder_hidden_states=embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def run(model: Path, images: Path, steps: int, micro: int, side: int, window: int) -> dict[str, Any]:
    """Train `steps` steps; figures over the last `window` steps (the same window the trainer's log uses)."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t = time.perf_counter()
    models = Models(model, device, cuda)
    load_s = time.perf_counter() - t
    files = sorted(images.glob("*.jpg"))
    captions = {p: p.with_suffix(".txt").read_text() for p in files}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    pool = ThreadPoolExecutor(micro)

    def submit(step: int) -> list[Future]:
        return [pool.submit(decode, files[(step * micro + j) % len(files)], side) for j in range(micro)]

    pending = submit(0)
    rows, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        paths = [files[(step * micro + j) % len(files)] for j in range(micro)]
        pixels = torch.stack([f.result() for f in pending])
        pending = submit(step + 1) if step + 1 < steps else []
        t1 = time.perf_counter()
        latents, embeds, pooled = models.encode(pixels, [captions[p] for p in paths])
        sync()
        t2 = time.perf_counter()
        losses.append(models.unet_step(latents, embeds, pooled, side))
        sync()
        t3 = time.perf_counter()
        rows.append({"decode_wait_s": t1 - t0, "encode_s": t2 - t1, "unet_step_s": t3 - t2, "total_s": t3 - t0})
    pool.shutdown()
    last = rows[-window:]
    mean = {k: statistics.fmean(r[k] for r in last) for k in last[0]}
    return {
        "steps": steps, "micro_batch": micro, "resolution": side, "window_steps": len(last),
        "steps_per_s": 1 / mean["total_s"], "images_per_s": micro / mean["total_s"],
        "seconds_per_step": {k: round(v, 4) for k, v in mean.items()},
        "encode_share": mean["encode_s"] / mean["total_s"], "load_s": round(load_s, 2),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "unet_parameters": sum(p.numel() for p in models.unet.parameters()),
        "loss_last": losses[-1], "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "what": "per step: PIL decode (thread pool, one batch ahead), VAE encode fp32, both text encoders fp32, "
                "then the UNet step: " + ("bf16 autocast over fp32 weights, fused torch AdamW" if cuda else
                                          "fp32 (CPU), torch AdamW") + ", gradient checkpointing, clip 1.0; no DeepSpeed",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check_inloop", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="diffusers SDXL pipeline folder")
    p.add_argument("--images", type=Path, required=True, help="folder of NAME.jpg + NAME.txt")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--window", type=int, default=10, help="steps at the end the figures are averaged over")
    args = p.parse_args(argv)
    doc = run(args.model, args.images, args.steps, args.micro, args.resolution, max(1, min(args.window, args.steps)))
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"in-loop: {doc['steps_per_s']:.3f} steps/s, {doc['images_per_s']:.2f} images/s, encoders "
          f"{100 * doc['encode_share']:.0f} % of the step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
