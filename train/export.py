"""`latentforge export CKPT --out DIR`: a diffusers pipeline folder with the trained weights.

The trained denoiser (consolidated from DeepSpeed's ZeRO partitions, or the fp32 EMA) replaces the base
pipeline's, and every other component (VAE, text encoders, tokenizers, scheduler) comes from the base
pipeline the run started from, so the folder loads with the family's pipeline class. Written to a
temporary folder and renamed, so a crash never leaves a half export at DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .checkpoint import COMPLETE, find_checkpoint
from .families import adapter_for

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def trained_state_dict(checkpoint: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """fp32 weights of the trained model from a checkpoint (EMA when asked and present)."""
    if use_ema:
        ema = checkpoint / "ema.safetensors"
        if not ema.is_file():
            raise FileNotFoundError(f"{checkpoint}: no ema.safetensors; the run did not keep an EMA (train.ema.enabled)")
        from safetensors.torch import load_file

        return load_file(str(ema))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    stage = int(state["config"]["deepspeed"].get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        blob = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def export_pipeline(checkpoint: Path, out: Path, *, use_ema: bool = False, dtype: str = "fp16",
                    base: str | None = None) -> Path:
    """Write the pipeline folder; returns `out`."""
    if not (checkpoint / COMPLETE).is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE} marker)")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    model_cfg = state["config"]["model"]
    base = base or model_cfg["pretrained"]
    adapter = adapter_for(model_cfg["family"])
    import diffusers

    model_cls = getattr(diffusers, adapter.model_class)
    model = model_cls.from_config(model_cls.load_config(base, subfolder=adapter.model_subfolder))
    weights = trained_state_dict(checkpoint, use_ema)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (missing and not use_ema):
        raise RuntimeError(f"{checkpoint}: weights do not fit {adapter.model_class} of {base} "
                           f"(missing {len(missing)}, unexpected {len(unexpected)})")
    pipe_cls = getattr(diffusers, adapter.pipeline_class)
    try:
        pipe = pipe_cls.from_pretrained(base, **{adapter.model_subfolder: model.to(DTYPES[dtype])}, torch_dtype=DTYPES[dtype])
    except (OSError, ValueError, TypeError) as exc:
        raise FileNotFoundError(f"export needs the full base pipeline ({base}) for the other components; "
                                f"pass --base with one ({exc.__class__.__name__}: {str(exc)[:160]})") from None
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "latentforge_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "step": state["step"], "ema": use_ema, "dtype": dtype, "base": base}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def cli_entry(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if not (path / COMPLETE).is_file():  # a run's output_dir: take its newest complete checkpoint
        found = find_checkpoint(path, "latest")
        if found is None:
            raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a run folder holding one")
        path = found
    out = export_pipeline(path, Path(args.out), use_ema=args.ema, dtype=args.dtype, base=args.base)
    print(f"exported {path} ({'EMA' if args.ema else 'trained'} weights, {args.dtype}) to {out}")
    return 0


def configure(p: Any) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder (step-N) or a run's output_dir (newest checkpoint)")
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--base", help="base pipeline for the other components (default: the run's model.pretrained)")
