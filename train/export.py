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
from .checkpoint_weights import DTYPES, read_trainer_state, trained_state_dict
from .export_base import export_base
from .families import adapter_for
from .lora import merge_lora
from .noise_options import sampling_scheduler
from .single_file import export_checkpoint_single_file, export_single_file

__all__ = ["DTYPES", "cli_entry", "configure", "export_pipeline", "trained_state_dict"]


def export_pipeline(checkpoint: Path, out: Path, *, use_ema: bool = False, dtype: str = "fp16",
                    base: str | None = None, merge: bool = False) -> Path:
    """Write the pipeline folder (LoRA runs: the adapter folder, or with `merge` a merged pipeline;
    ControlNet runs: a `ControlNetModel` folder, `export_controlnet.py`)."""
    state = read_trainer_state(checkpoint)
    if state["config"]["train"].get("controlnet", {}).get("enabled"):  # the ControlNet alone; the base is unchanged
        from .export_controlnet import export_controlnet

        return export_controlnet(checkpoint, out, state, use_ema=use_ema, dtype=dtype, base=base)
    model_cfg = state["config"]["model"]
    base, pins = export_base(model_cfg, base)
    adapter = adapter_for(model_cfg["family"])
    import diffusers

    model_cls = getattr(diffusers, adapter.model_class)
    weights = trained_state_dict(checkpoint, use_ema)
    pipe_cls = getattr(diffusers, adapter.pipeline_class)
    if state["config"]["train"].get("lora", {}).get("enabled"):
        model = _lora_model(model_cls, base, pins, adapter.model_subfolder, state, weights, checkpoint)
        if not merge:
            return _save_lora(pipe_cls, adapter.model_subfolder, model, out, state, checkpoint, use_ema)
        merge_lora(model)  # fold the low-rank update into the base weights, then drop the adapters
    else:
        model = model_cls.from_config(model_cls.load_config(base, subfolder=adapter.model_subfolder,
                                                            revision=pins.get("revision")))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or (missing and not use_ema):
            raise RuntimeError(f"{checkpoint}: weights do not fit {adapter.model_class} of {base} "
                               f"(missing {len(missing)}, unexpected {len(unexpected)})")
    try:
        pipe = pipe_cls.from_pretrained(base, **{adapter.model_subfolder: model.to(DTYPES[dtype])},
                                        torch_dtype=DTYPES[dtype], **pins)
    except (OSError, ValueError, TypeError) as exc:
        raise FileNotFoundError(f"export needs the full base pipeline ({base}) for the other components; "
                                f"pass --base with one ({exc.__class__.__name__}: {str(exc)[:160]})") from None
    from latentforge.shared.config import Config

    # EDM or zero terminal SNR: the pipeline samples with the scheduler the model was trained for.
    run = Config.model_validate(state["config"])
    if run.train.objective == "edm" or run.train.zero_terminal_snr:
        pipe.scheduler = sampling_scheduler(run, {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__})
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "latentforge_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "step": state["step"], "ema": use_ema, "dtype": dtype, "base": base, **pins},
        indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _lora_model(model_cls: Any, base: str, pins: dict[str, str], subfolder: str, state: dict[str, Any],
                weights: dict[str, torch.Tensor], checkpoint: Path) -> Any:
    """The base model with the run's LoRA layers, loaded with the trained adapter weights."""
    from latentforge.shared.config import Config

    from .lora import add_lora

    model = model_cls.from_pretrained(base, subfolder=subfolder, torch_dtype=torch.float32, **pins)
    add_lora(model, Config.model_validate(state["config"]))
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    _, unexpected = model.load_state_dict(lora, strict=False)
    expected = {n for n, _ in model.named_parameters() if "lora_" in n}
    if unexpected or set(lora) != expected:
        raise RuntimeError(f"{checkpoint}: LoRA weights do not fit the run's adapters "
                           f"({len(set(lora) & expected)} of {len(expected)} matched)")
    return model


def _save_lora(pipe_cls: Any, subfolder: str, model: Any, out: Path, state: dict[str, Any], checkpoint: Path,
               use_ema: bool) -> Path:
    """The adapter in the diffusers/peft layout `pipeline.load_lora_weights(out)` reads."""
    from peft.utils import get_peft_model_state_dict

    if not hasattr(pipe_cls, "save_lora_weights"):
        raise FileNotFoundError(f"{pipe_cls.__name__} has no LoRA loader in diffusers; export with --merge instead")
    import inspect

    layers = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(model).items()}
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    kwargs: dict[str, Any] = {f"{subfolder}_lora_layers": layers}
    # Without its metadata a loader assumes alpha == rank; store the run's LoraConfig so the scale survives.
    meta = f"{subfolder}_lora_adapter_metadata"
    if meta in inspect.signature(pipe_cls.save_lora_weights).parameters:
        kwargs[meta] = model.peft_config["default"].to_dict()
    else:  # no metadata slot: fold alpha / rank into the up projection instead
        scale = model.peft_config["default"].lora_alpha / model.peft_config["default"].r
        kwargs[f"{subfolder}_lora_layers"] = {k: v * scale if "lora_B" in k else v for k, v in layers.items()}
    pipe_cls.save_lora_weights(tmp, **kwargs, safe_serialization=True)
    (tmp / "latentforge_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "step": state["step"], "ema": use_ema, "lora": state["config"]["train"]["lora"]},
        indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def cli_entry(args: argparse.Namespace) -> int:
    """`latentforge export`: a checkpoint, a run folder or (with --single-file) a pipeline folder -> an export."""
    path = Path(args.checkpoint)
    single = getattr(args, "single_file", False)
    if not single and (getattr(args, "with_vae", False) or getattr(args, "with_text_encoders", False)):
        from latentforge.shared.config import ConfigError

        raise ConfigError("--with-vae and --with-text-encoders go with --single-file (a pipeline folder has them all)")
    if single and (path / "model_index.json").is_file():  # a diffusers pipeline folder, e.g. an earlier export
        if args.ema or args.base:
            from latentforge.shared.config import ConfigError

            raise ConfigError(f"--ema and --base apply to training checkpoints; {path} is a diffusers pipeline folder")

        out = export_single_file(path, args.out, with_vae=args.with_vae, with_text_encoders=args.with_text_encoders,
                                 dtype=args.dtype)
        print(f"exported {path} ({_parts(args)}, {args.dtype}) to {out}")
        return 0
    if not (path / COMPLETE).is_file():  # a run's output_dir: take its newest complete checkpoint
        found = find_checkpoint(path, "latest")
        if found is None:
            raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a run folder holding one")
        path = found
    if single:
        out = export_checkpoint_single_file(path, Path(args.out), use_ema=args.ema, dtype=args.dtype, base=args.base,
                                            with_vae=args.with_vae, with_text_encoders=args.with_text_encoders)
        print(f"exported {path} ({'EMA' if args.ema else 'trained'} weights; {_parts(args)}, {args.dtype}) "
              f"to the single file {out}")
        return 0
    out = export_pipeline(path, Path(args.out), use_ema=args.ema, dtype=args.dtype, base=args.base, merge=args.merge)
    print(f"exported {path} ({'EMA' if args.ema else 'trained'} weights, {args.dtype}) to {out}")
    return 0


def _parts(args: argparse.Namespace) -> str:
    return "UNet" + (" + VAE" if args.with_vae else "") + (" + text encoders" if args.with_text_encoders else "")


def configure(p: Any) -> None:
    """The arguments of `latentforge export`."""
    p.add_argument("checkpoint", help="a checkpoint folder (step-N) or a run's output_dir (newest checkpoint)")
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline (a .safetensors file with --single-file)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--base", help="base pipeline for the other components (default: the run's model.pretrained)")
    p.add_argument("--merge", action="store_true",
                   help="LoRA runs: write a full pipeline with the adapter merged in (default: the adapter alone)")
    p.add_argument("--single-file", action="store_true",
                   help="write one .safetensors in the original (ComfyUI / AUTOMATIC1111) layout, SDXL or SD 1.x; "
                        "CHECKPOINT may also be a diffusers pipeline folder")
    p.add_argument("--with-vae", action="store_true", help="--single-file: include the base pipeline's VAE")
    p.add_argument("--with-text-encoders", action="store_true",
                   help="--single-file: include the base pipeline's text encoders")
