"""`latentforge evaluate RUN_OR_CHECKPOINT [key=value ...]`: evaluate a finished checkpoint, as training does.

The run's config comes from the checkpoint's snapshot (trainer_state.json), with dotted overrides on top
(e.g. `train.eval.num_images=500`, `train.eval.hps_checkpoint=/models/HPS_v2.1_compressed.pt`); the model
is the run's base with the checkpoint's trained (or, with --ema, EMA) weights; no DeepSpeed engine, no
optimizer. Figures go to the run folder as training writes them: RUN/eval/<step>.json, `eval/*` scalars in
RUN/tensorboard, and the `eval` entry of RUN/run_summary.json when the run wrote one. Under torchrun
(RANK set) generation is split over the processes and rank 0 scores.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from latentforge.shared.config import Config, config_from_tree

from ..checkpoint import COMPLETE, find_checkpoint, write_atomic
from ..checkpoint_weights import read_trainer_state, trained_state_dict
from ..families import adapter_for
from ..metrics import open_metrics
from ..step import StepSetup, build_objective
from ..validation import ValidationData
from .backbones import load_backbones
from .run import run_evaluation


def resolve_checkpoint(path: Path) -> Path:
    """A COMPLETE checkpoint folder, or a run's output_dir -> its newest complete checkpoint."""
    if (path / COMPLETE).is_file():
        return path
    found = find_checkpoint(path, "latest")
    if found is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a run folder holding one")
    return found


def run_config(checkpoint: Path, overrides: list[str]) -> Config:
    """The run's config snapshot with `overrides` applied."""
    return config_from_tree(read_trainer_state(checkpoint)["config"], overrides, f"{checkpoint}/trainer_state.json")


def load_model(config: Config, checkpoint: Path, use_ema: bool, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """(adapter, the base model with the checkpoint's weights) in fp32, in eval mode."""
    if config.train.controlnet.enabled:
        from latentforge.shared.config import ConfigError

        raise ConfigError("latentforge evaluate: ControlNet runs are not supported yet (their controls per held-out "
                          "row are not cached for evaluation)")
    adapter = adapter_for(config.model.family)
    model = adapter.load(config)
    _, unexpected = model.load_state_dict(trained_state_dict(checkpoint, use_ema), strict=False)
    if unexpected:
        raise RuntimeError(f"{checkpoint}: {len(unexpected)} weights do not fit {adapter.model_class} "
                           f"(first: {unexpected[0]})")
    return adapter, model.to(device).eval()


def evaluate_checkpoint(checkpoint: Path, overrides: list[str], *, use_ema: bool = False) -> dict[str, Any] | None:
    """Evaluate one checkpoint into its run folder; the figures on rank 0, None on the other ranks."""
    from latentforge.shared.cache_reader import CacheReader

    from ..data import CachedSamples
    from ..distributed import Dist, init_distributed

    config = run_config(checkpoint, overrides)
    if "RANK" in os.environ:  # torchrun: a process group over which generation is split
        dist = init_distributed()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dist = Dist(0, 1, 0, device)
    if dist.is_main:  # missing metric weights end the command here, before the model loads
        load_backbones(config.train.eval, config.train.eval.metrics)
    step = int(read_trainer_state(checkpoint)["step"])
    run_dir = checkpoint.parent.parent  # OUTPUT/checkpoints/step-N
    cache = CacheReader(config.cache.path, dict(config.cache.storage_options))
    adapter, model = load_model(config, checkpoint, use_ema, dist.device)
    empty, prompts, embeds = cache.prompts()
    data = ValidationData(cache, CachedSamples(cache, config).val_rows, prompts, embeds)
    setup = StepSetup(adapter, build_objective(config, adapter, dist.device), config,
                      {k: v.to(dist.device) for k, v in empty.items()}, cache.spec.scaling_factor,
                      cache.spec.shift_factor, dist.device, torch.float32)
    metrics = open_metrics(config, run_dir, dist.is_main)  # the run's own reporters (its wandb run too)
    try:
        result = run_evaluation(model, setup, data, step, rank=dist.rank, world=dist.world, sharded=False,
                                metrics=metrics, output_dir=run_dir)
    finally:
        metrics.close()
    summary = run_dir / "run_summary.json"
    if result is not None and summary.is_file():
        doc = json.loads(summary.read_text())
        doc["eval"] = {**result, "ema": use_ema, "checkpoint": str(checkpoint)}
        write_atomic(summary, json.dumps(doc, indent=2))
    return result


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of `latentforge evaluate`."""
    p.add_argument("checkpoint", help="a checkpoint folder (step-N) or a run's output_dir (newest checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides of the run's config, e.g. train.eval.num_images=500")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights instead of the trained ones")


def cli_entry(args: argparse.Namespace) -> int:
    """`latentforge evaluate`: prints the figures and where they were written."""
    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    result = evaluate_checkpoint(checkpoint, list(args.overrides), use_ema=args.ema)
    if result is not None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()) or "nothing"
        skipped = "".join(f"; {k} skipped: {why}" for k, why in result["skipped"].items())
        print(f"evaluate: step {result['step']}: {shown}{skipped}; "
              f"written to {checkpoint.parent.parent / 'eval' / (str(result['step']) + '.json')}")
    return 0
