"""`latentforge compare RUN_A RUN_B [--out DIR]`: two training runs side by side.

Prints each run's final figures (from `run_summary.json` and the last lines of `train_log.jsonl` /
`val_log.jsonl`) and the config keys whose values differ (from the config snapshot the run keeps: its
`run_summary.json`, else its newest checkpoint's `trainer_state.json`). Writes `DIR/loss_curves.png`, both
runs' losses on one plot, and `DIR/validation_grids.png`, each run's newest validation grid one above the
other, labelled with the run's name.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY = "run_summary.json"


@dataclass
class RunInfo:
    """What compare reads from one run folder."""

    path: Path
    name: str
    final: dict[str, Any] = field(default_factory=dict)  # figure -> value, in print order
    config: dict[str, Any] = field(default_factory=dict)  # flattened "train.lr" -> value
    grid: Path | None = None  # newest validation/step-*.png


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileNotFoundError(f"{path}: unreadable ({exc}); is the run still being written?") from exc
    return data if isinstance(data, dict) else {}


def _last_line(path: Path) -> dict[str, Any]:
    """The last complete JSON line of a .jsonl log, {} when there is none."""
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict):
            return row
    return {}


def _config_snapshot(run: Path, summary: dict[str, Any]) -> dict[str, Any]:
    if isinstance(summary.get("config"), dict):
        return summary["config"]
    from latentforge.train.checkpoint import STATE_FILE

    states = sorted((run / "checkpoints").glob(f"step-*/{STATE_FILE}"))
    return _read_json(states[-1]).get("config", {}) if states else {}


def load_run(path: Path) -> RunInfo:
    """Read a run folder (a `train.output_dir`); FileNotFoundError, one line, for anything else."""
    from latentforge.train.loss_curve import TRAIN_LOG, VAL_LOG

    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder; pass a train.output_dir of a finished or running run")
    if not (path / TRAIN_LOG).is_file() and not (path / SUMMARY).is_file():
        raise FileNotFoundError(f"{path} is not a run folder (no {TRAIN_LOG} nor {SUMMARY}); pass a train.output_dir")
    summary = _read_json(path / SUMMARY) if (path / SUMMARY).is_file() else {}
    last, val = _last_line(path / TRAIN_LOG), _last_line(path / VAL_LOG)
    final: dict[str, Any] = {
        "steps": summary.get("steps", last.get("step")),
        "last loss": last.get("loss"),
        "loss (mean of last 10)": summary.get("final_loss_mean_last_10"),
        "last val loss": val.get("val_loss"),
        "val loss step": val.get("step"),
        "last lr": last.get("lr"),
        "epoch": last.get("epoch"),
        "seconds": summary.get("seconds"),
        "samples/s (last window)": (summary.get("last_window") or {}).get("perf/samples_per_s"),
        "trainable parameters": summary.get("trainable_parameters"),
    }
    evaluation = summary.get("eval") or {}  # the last `train.eval_every` / `latentforge evaluate` figures
    if evaluation:
        final["eval step"] = evaluation.get("step")
        final.update({f"eval {name}": value for name, value in (evaluation.get("metrics") or {}).items()})
    grids = sorted((path / "validation").glob("step-*.png"))
    return RunInfo(path, path.resolve().name, final, flatten(_config_snapshot(path, summary)),
                   grids[-1] if grids else None)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two flattened configs (a key only one side has counts), sorted."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def table(a: RunInfo, b: RunInfo) -> str:
    """The side-by-side text: final figures, then the differing config keys (output_dir left out)."""
    rows = [("", a.name, b.name)]
    keys = list(dict.fromkeys([*a.final, *b.final]))  # one run may have evaluation figures the other lacks
    rows += [(k, _show(a.final.get(k)), _show(b.final.get(k))) for k in keys]
    diffs = {k: v for k, v in differing(a.config, b.config).items() if k != "train.output_dir"}
    rows.append(("hparams that differ:", "", "") if diffs else ("hparams: identical", "", ""))
    rows += [(f"  {k}", _show(x), _show(y)) for k, (x, y) in diffs.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}".rstrip() for r in rows)


def write_pictures(a: RunInfo, b: RunInfo, out: Path) -> list[Path]:
    """DIR/loss_curves.png (both runs) and, when both have one, DIR/validation_grids.png; returns what it wrote."""
    import numpy as np
    from PIL import Image

    from latentforge.train.grid_labels import name_strip, stack_rows
    from latentforge.train.loss_curve import draw_curves, run_curves

    curves = {}
    for run in (a, b):
        for series, points in run_curves(run.path).items():
            curves[f"{run.name} {series}"] = points
    written = [draw_curves(curves, out / "loss_curves.png", f"{a.name} vs {b.name}: loss per step")]
    shown = [r for r in (a, b) if r.grid is not None]
    if shown:
        rows = [name_strip(np.asarray(Image.open(r.grid).convert("RGB")), r.name) for r in shown]
        path = out / "validation_grids.png"
        Image.fromarray(stack_rows(rows)).save(path)
        written.append(path)
    return written


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of `latentforge compare`."""
    p.add_argument("run_a", type=Path, help="a run folder (train.output_dir)")
    p.add_argument("run_b", type=Path, help="the run folder to compare it with")
    p.add_argument("--out", type=Path, default=Path("compare"), help="folder for the two PNGs (default: ./compare)")


def cli_entry(args: argparse.Namespace) -> int:
    """Print the comparison and write the pictures."""
    a, b = load_run(args.run_a), load_run(args.run_b)
    if a.name == b.name:  # two runs named alike (a/run, b/run): tell them apart by their parent folder
        a.name, b.name = f"{a.path.resolve().parent.name}/{a.name}", f"{b.path.resolve().parent.name}/{b.name}"
    print(table(a, b))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for path in write_pictures(a, b, out):
        print(f"wrote {path}")
    if not (a.grid and b.grid):
        missing = " and ".join(r.name for r in (a, b) if r.grid is None)
        print(f"no validation grid in {missing} (train.validation_every=0?)")
    return 0
