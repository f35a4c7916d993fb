"""Reading a finished training checkpoint for export: its recorded state and the trained weights in fp32.

Shared by both exports (`export.py`: a diffusers pipeline folder, `single_file.py`: one original-layout
file), so neither needs the other to read a checkpoint. Reads only what `checkpoint.save_checkpoint`
wrote; never DeepSpeed's engine, no process group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import COMPLETE, EMA_FILE, STATE_FILE

# `--dtype` of both exports.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """trainer_state.json of a COMPLETE checkpoint (step, config snapshot, ...); anything else is refused."""
    if not (checkpoint / COMPLETE).is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE} marker)")
    return json.loads((checkpoint / STATE_FILE).read_text())


def trained_state_dict(checkpoint: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """fp32 weights of the trained model from a checkpoint (EMA when asked and present).

    LoRA runs hold only the trainable (adapter) weights; so does an EMA, which shadows what trains.
    ZeRO 1-3 checkpoints hold the weights only as each rank's slice of the fp32 master copy in the
    optimizer files (under ZeRO-3 the module files hold empty placeholders): DeepSpeed's
    `zero_to_fp32` joins the slices. That needs nothing at save time (no gather, no 16-bit copy) and
    gives the exact fp32 masters, not their bf16 rounding. The EMA file is whole at every stage.
    """
    if use_ema:
        ema = checkpoint / EMA_FILE
        if not ema.is_file():
            raise FileNotFoundError(f"{checkpoint}: no {EMA_FILE}; the run did not keep an EMA (train.ema.enabled)")
        from safetensors.torch import load_file

        return load_file(str(ema))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    stage = int(state["config"]["deepspeed"].get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        blob = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
