"""The `latentforge` command: parse arguments, then hand off to the module that does the work.

Each subcommand is registered with a `module:function` target that is imported only when it runs, so
`latentforge demo-data` never imports torch and `latentforge train` never imports the text encoders.
Later stages add their subcommands to `SUBCOMMANDS`; every run command shares `add_run_args`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from .cache_format import CacheFormatError
from .config import ConfigError, describe_config, load_config
from .storage import StorageWriteError

EXIT_USAGE = 2
EXIT_FAILURE = 1


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`, dotted overrides and `--help-config`, shared by every command that runs a job."""
    parser.add_argument("--config", "-c", help="YAML config (see configs/); keys can be overridden after it")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. train.lr=1e-5")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its description")


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from .config import config_to_dict

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_models import build_tiny_pipeline

    out = build_tiny_pipeline(args.family, args.out, seed=args.seed)
    print(f"tiny {args.family} pipeline (random weights, offline) at {out}")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo_data import write_demo_data

    summary = write_demo_data(args.out, samples_per_shard=args.samples_per_shard, seed=args.seed)
    print(f"demo data: {summary.num_samples} samples in {len(summary.shards)} tar shards and {summary.folder}")
    return 0


def _configure_tiny_model(p: argparse.ArgumentParser) -> None:
    from .tiny_models import TINY_BUILDERS

    p.add_argument("--family", default="sdxl", choices=sorted(TINY_BUILDERS))
    p.add_argument("--out", required=True, help="folder to write the diffusers pipeline into")
    p.add_argument("--seed", type=int, default=0)


def _configure_demo_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for webdataset/ and folder/")
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def _configure_cache(p: argparse.ArgumentParser) -> None:
    add_run_args(p)
    p.add_argument("--overwrite", action="store_true", help="recompute every shard, even those already committed")


# name -> (help, configure parser, handler). Handlers given as "module:function" load lazily.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int] | str]] = {
    "config": ("validate a config and print it resolved (with defaults and overrides)", add_run_args, _cmd_config),
    "cache": ("precompute VAE latents and text embeddings into the cache (torchrun for many processes)",
              _configure_cache, "latentforge.preprocess.job:cli_entry"),
    "train": ("train the denoiser from the cache under DeepSpeed (deepspeed launcher for many processes)",
              add_run_args, "latentforge.train.trainer:cli_entry"),
    "export": ("write a diffusers pipeline folder from a training checkpoint (trained or EMA weights)",
               lambda p: importlib.import_module("latentforge.train.export").configure(p),
               "latentforge.train.export:cli_entry"),
    "inspect": ("summarise a cache, draw its buckets and decoded samples as PNGs, --verify it in full",
                lambda p: importlib.import_module("latentforge.shared.inspect_cache").configure(p),
                "latentforge.shared.inspect_cache:cli_entry"),
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "help_config", False):
        print(describe_config())
        return 0
    handler = SUBCOMMANDS[args.command][2]
    if isinstance(handler, str):
        module, func = handler.split(":")
        handler = getattr(importlib.import_module(module), func)
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"latentforge {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, CacheFormatError) as exc:
        print(f"latentforge {args.command}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except StorageWriteError as exc:  # disk full, permission denied: the environment, not the config
        print(f"latentforge {args.command}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    """The error's own line. A DataLoader worker's exception arrives re-raised with the worker's whole
    traceback as its message; its last line is the original `module.Class: message`."""
    text = str(exc).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last.removeprefix(prefix)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
