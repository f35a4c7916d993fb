"""`make demo`: the whole product on the built-in demo, offline, on CPU.

Steps: write the demo photos (WebDataset shards + image folder), build the tiny SDXL pipeline, then run
each stage that this installation has (`cache`, then `train`) through the same CLI a user would call,
with `configs/demo.yaml` pointed at the demo folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from latentforge.devkit.demo_data import write_demo_data
from latentforge.devkit.tiny_models import build_tiny_pipeline
from latentforge.shared.config import load_config

from .cli import SUBCOMMANDS
from .cli import main as cli_main

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def demo_overrides(root: Path) -> list[str]:
    """Point every path in the demo config at `root` (so `--dir` can move the whole demo)."""
    return [
        f"model.pretrained={root / 'tiny-sdxl'}",
        f"data.sources.0.path={root / 'data' / 'webdataset'}/{{00000..00003}}.tar",
        f"data.sources.1.path={root / 'data' / 'folder'}",
        f"cache.path={root / 'cache'}",
        f"train.output_dir={root / 'run'}",
    ]


def run_demo(root: Path, config: Path = DEMO_CONFIG) -> int:
    """Run every available stage on the demo; returns a process exit code."""
    root = root.absolute()
    overrides = demo_overrides(root)
    load_config(config, overrides)  # fail on a bad config before writing anything
    t0 = time.perf_counter()
    summary = write_demo_data(root / "data")
    print(f"[demo] data: {summary.num_samples} real photos in {len(summary.shards)} tar shards + {summary.folder}")
    model = build_tiny_pipeline("sdxl", root / "tiny-sdxl")
    print(f"[demo] model: tiny random SDXL pipeline at {model}")
    stages = [("cache", ["--config", str(config), *overrides]),
              ("train", ["--config", str(config), *overrides]),
              ("export", [str(root / "run"), "--out", str(root / "export"), "--ema"])]
    for stage, args in stages:
        if stage not in SUBCOMMANDS:
            print(f"[demo] {stage}: not part of this installation yet, skipped")
            continue
        print(f"[demo] {stage}: latentforge {stage} {' '.join(args)}")
        code = cli_main([stage, *args])
        if code:
            print(f"[demo] {stage} failed with exit code {code}", file=sys.stderr)
            return code
    print(f"[demo] done in {time.perf_counter() - t0:.1f} s; everything is under {root}:")
    print(f"[demo]   cache summary  {root / 'cache' / 'summary.json'}")
    print(f"[demo]   checkpoints    {root / 'run' / 'checkpoints'}")
    print(f"[demo]   validation     {root / 'run' / 'validation'} (PNG grids)")
    print(f"[demo]   TensorBoard    .venv/bin/tensorboard --logdir {root / 'run' / 'tensorboard'}")
    print(f"[demo]   exported SDXL  {root / 'export'} (StableDiffusionXLPipeline.from_pretrained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo", help="folder for the demo data, model, cache and run")
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    args = parser.parse_args(argv)
    return run_demo(Path(args.dir), Path(args.config))


if __name__ == "__main__":
    sys.exit(main())
