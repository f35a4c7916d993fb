"""The `latentforge` command: parse arguments, then hand off to the stage that does the work.

Stage modules are imported inside each handler, so `latentforge demo-data` never imports torch and
`latentforge train` never imports the text encoders; they are still plain imports, checked by import-linter.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from latentforge.shared.entry import EXIT_FAILURE, EXIT_USAGE, add_run_args, one_line, run_guarded

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "SUBCOMMANDS", "build_parser", "main", "one_line"]


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from latentforge.shared.config import load_config, printable_config

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(printable_config(config), sort_keys=False), end="")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from latentforge.preprocess.job import cli_entry

    return cli_entry(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from latentforge.train.trainer import cli_entry

    return cli_entry(args)


def _configure_export(p: argparse.ArgumentParser) -> None:
    from latentforge.train.export import configure

    configure(p)


def _cmd_export(args: argparse.Namespace) -> int:
    from latentforge.train.export import cli_entry

    return cli_entry(args)


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    from latentforge.train.evaluation.cli import configure

    configure(p)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from latentforge.train.evaluation.cli import cli_entry

    return cli_entry(args)


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    from .inspect_cache import configure

    configure(p)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_cache import cli_entry

    return cli_entry(args)


def _configure_compare(p: argparse.ArgumentParser) -> None:
    from .compare import configure

    configure(p)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import cli_entry

    return cli_entry(args)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from latentforge.devkit.tiny_models import build_tiny_pipeline

    out = build_tiny_pipeline(args.family, args.out, seed=args.seed)
    print(f"tiny {args.family} pipeline (random weights, offline) at {out}")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from latentforge.devkit.demo_data import write_demo_data

    summary = write_demo_data(args.out, samples_per_shard=args.samples_per_shard, seed=args.seed)
    print(f"demo data: {summary.num_samples} samples in {len(summary.shards)} tar shards and {summary.folder}")
    return 0


def _configure_tiny_model(p: argparse.ArgumentParser) -> None:
    from latentforge.devkit.tiny_models import TINY_BUILDERS

    p.add_argument("--family", default="sdxl", choices=sorted(TINY_BUILDERS))
    p.add_argument("--out", required=True, help="folder to write the diffusers pipeline into")
    p.add_argument("--seed", type=int, default=0)


def _configure_demo_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for webdataset/ and folder/")
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def _configure_cache(p: argparse.ArgumentParser) -> None:
    from latentforge.preprocess.job import configure

    configure(p)


Handler = Callable[[argparse.Namespace], int]
# name -> (help, configure parser, handler).
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "config": ("validate a config and print it resolved (with defaults and overrides)", add_run_args, _cmd_config),
    "cache": ("precompute VAE latents and text embeddings into the cache (torchrun for many processes)",
              _configure_cache, _cmd_cache),
    "train": ("train the denoiser from the cache under DeepSpeed (deepspeed launcher for many processes)",
              add_run_args, _cmd_train),
    "export": ("write a diffusers pipeline folder from a training checkpoint (trained or EMA weights)",
               _configure_export, _cmd_export),
    "evaluate": ("FID, KID, IS, CLIP score, LPIPS diversity and HPSv2.1 of a checkpoint (or a run's newest) into "
                 "RUN/eval/<step>.json", _configure_evaluate, _cmd_evaluate),
    "inspect": ("summarise a cache, draw its buckets and decoded samples as PNGs, --verify it in full",
                _configure_inspect, _cmd_inspect),
    "compare": ("print two runs' final figures and differing hparams side by side; plot both losses, stack their grids",
                _configure_compare, _cmd_compare),
    "tiny-model": ("write a tiny random diffusers pipeline for offline tests and the demo", _configure_tiny_model, _cmd_tiny_model),
    "demo-data": ("write the demo dataset (real photos) as WebDataset shards and an image folder", _configure_demo_data, _cmd_demo_data),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentforge", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `latentforge` console script. Exit 2 on usage and config errors."""
    args = build_parser().parse_args(argv)
    return run_guarded(args.command, SUBCOMMANDS[args.command][2], args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
