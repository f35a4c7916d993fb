"""The wandb sink of `Metrics` (`train.report_to: [..., wandb]`): the same figures as TensorBoard, one wandb run.

The run id is kept in OUTPUT/wandb_run.json, written before the run starts, so a resumed run (same
output_dir) continues the same wandb run (`resume="allow"`). The API key is wandb's business: it reads
WANDB_API_KEY or ~/.netrc itself; latentforge never reads, passes or writes it. The config wandb gets is the
redacted snapshot (`printable_config`). Every figure is logged with our optimizer step as the `step`
metric (not wandb's own step counter), so a run resumed from an earlier checkpoint may log a step again
instead of having it dropped as out of order. Offline runs (WANDB_MODE=offline or train.wandb.mode) land
under OUTPUT/wandb unless WANDB_DIR says elsewhere; `wandb sync` uploads them later.
"""

from __future__ import annotations

import html
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from latentforge.shared.config import ConfigError, printable_config

from .checkpoint import write_atomic

RUN_FILE = "wandb_run.json"  # {"id": ...}: the wandb run this output folder logs to


def run_id(output: Path) -> str:
    """The wandb run id of `output`: the stored one, else a new one, stored at once."""
    path = output / RUN_FILE
    if path.is_file():
        return str(json.loads(path.read_text())["id"])
    rid = uuid.uuid4().hex[:12]  # wandb's own ids are 8 lowercase letters and digits; any such string will do
    write_atomic(path, json.dumps({"id": rid}) + "\n")  # a crash mid-write must not lose the run id
    return rid


def _failed(reason: str) -> ConfigError:
    return ConfigError(f"config error: train.report_to: wandb {reason}; set WANDB_API_KEY or run `wandb login`, "
                       "or WANDB_MODE=offline, or drop wandb from train.report_to")


class WandbSink:
    """One wandb run per output folder, continued on resume (see the module docstring)."""

    def __init__(self, config: Any, output: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise _failed("is not installed (pip install wandb)") from None
        self.wandb = wandb
        w = config.train.wandb
        kwargs: dict[str, Any] = {} if os.environ.get("WANDB_DIR") else {"dir": str(output)}
        rid = run_id(output)
        try:
            self.run = wandb.init(project=w.project, entity=w.entity, name=w.run_name or output.resolve().name,
                                  tags=list(w.tags) or None, mode=w.mode, id=rid, resume="allow",
                                  config=printable_config(config), **kwargs)
        except Exception as exc:  # wandb raises its own UsageError, CommError, timeouts...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise _failed(f"could not start ({first})") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        self.run.log({key: self.wandb.Image(image), "step": step})

    def text(self, key: str, value: str, step: int) -> None:
        self.run.log({key: self.wandb.Html(f"<pre>{html.escape(value)}</pre>", inject=False), "step": step})

    def hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        self.run.config.update({"hparams": hparams}, allow_val_change=True)
        self.run.summary.update(final)

    def close(self) -> None:
        self.run.finish()
