"""The rows of a validation grid beside `current`: the base model's, kept in the run folder, and the EMA's.

`base`: what the model drew before any training, rendered once and kept as OUTPUT/validation/base.png,
so every later grid (and a resumed run's) shows the very same pixels. The PNG carries a key of what it was
rendered from (cache fingerprint, prompts, sampling settings); a mismatch counts as no base row. A full
fine-tune can render it only at step 0; LoRA (adapters disabled) and ControlNet (the frozen UNet without
the ControlNet) runs still hold their base weights and can render it at any step. ControlNet's base is the
UNet alone, not the ControlNet pipeline at step 0: that is the model the control images are meant to steer.

`ema`: the EMA weights swapped into the module for one render and swapped back (`ema_weights`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

BASE_FILE = Path("validation") / "base.png"
_KEY = "latentforge-base"  # the PNG text chunk holding the key


def base_key(config: Any, fingerprint: str, prompts: list[str]) -> str:
    """What the base row depends on, hashed: the cache (model and embeddings), prompts and sampling settings."""
    t = config.train
    parts = {"cache": fingerprint, "prompts": prompts, "steps": t.validation_inference_steps,
             "objective": t.objective, "zero_terminal_snr": t.zero_terminal_snr, "prediction": t.prediction_type,
             "flow_shift": t.flow_shift, "controlnet": t.controlnet.enabled, "vae": config.model.vae,
             "decoder": getattr(config.model, "decoder", None)}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def load_base_row(out_dir: Path, key: str) -> np.ndarray | None:
    """The kept base row (HxWx3 uint8) when it was rendered under `key`, else None."""
    from PIL import Image

    path = out_dir / BASE_FILE
    if not path.is_file():
        return None
    with Image.open(path) as img:
        if img.text.get(_KEY) != key:  # type: ignore[attr-defined]
            return None
        return np.asarray(img.convert("RGB"))


def run_folders(out_dir: Path, resume: str | None) -> list[Path]:
    """Where a base row may be kept: the output folder, then the run folder of a resumed checkpoint path
    (OUTPUT/checkpoints/step-N), which a resume into a new output folder takes it from."""
    folders = [out_dir]
    if resume and resume != "latest" and "://" not in resume:
        folders.append(Path(resume).resolve().parent.parent)
    return folders


def save_base_row(out_dir: Path, row: np.ndarray, key: str) -> Path:
    """Keep the labelled base row as OUTPUT/validation/base.png (lossless), tagged with `key`."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = out_dir / BASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(_KEY, key)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(row).save(tmp, pnginfo=info)
    tmp.replace(path)  # a crash mid-write leaves no half file that a resume would read
    return path


def base_renders_later(config: Any) -> bool:
    """Whether the base weights are still in the model after training started (LoRA and ControlNet runs)."""
    return bool(config.train.lora.enabled or config.train.controlnet.enabled)


@contextmanager
def base_weights(model: torch.nn.Module, adapter: Any, config: Any) -> Iterator[tuple[torch.nn.Module, Any]]:
    """(module, adapter) that render the base model: the UNet alone for ControlNet, LoRA adapters disabled."""
    if config.train.controlnet.enabled:
        yield model.frozen_denoiser(), adapter.base  # type: ignore[operator]
        return
    if not config.train.lora.enabled:
        yield model, adapter
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model, adapter
    finally:
        for layer in layers:  # also gives the adapter weights back their requires_grad
            layer.enable_adapters(True)


@contextmanager
def ema_weights(model: torch.nn.Module, ema: Any, sharded: bool) -> Iterator[None]:
    """The EMA's weights in `model` for the duration, the trained ones restored exactly afterwards.

    Without ZeRO-3 the whole module is on the main rank; its weights are kept on the CPU meanwhile. Under
    ZeRO-3 every rank swaps its own slice (`param.ds_tensor`, what `ShardedEma` averages): no communication
    beyond re-gathering the parameters ZeRO-3 keeps whole (`ds_persist`, small ones), as DeepSpeed itself
    does after a step, so the swap costs about what the EMA update does.
    """
    params = dict(model.named_parameters())
    local = (lambda p: p.ds_tensor) if sharded else (lambda p: p.data)  # noqa: E731
    names = [n for n in ema.shadow if n in params]
    kept = {n: local(params[n]).detach().to("cpu" if not sharded else local(params[n]).device, copy=True)
            for n in names}
    _put(model, {n: ema.shadow[n] for n in names}, params, local, sharded)
    try:
        yield
    finally:
        _put(model, kept, params, local, sharded)


@torch.no_grad()
def _put(model: torch.nn.Module, values: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter],
         local: Any, sharded: bool) -> None:
    if not sharded:
        for n, v in values.items():
            params[n].data.copy_(v)
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = [p for p in model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE]  # type: ignore[attr-defined]
    if whole:  # drop the gathered copies (slices unchanged): they would show the old weights
        whole[0].partition(whole)  # type: ignore[attr-defined]
    for n, v in values.items():
        local(params[n]).copy_(v)
    persist = [p for p in model.parameters() if getattr(p, "ds_persist", False)]
    if persist:
        persist[0].all_gather(persist)  # type: ignore[attr-defined]
