"""What every job command shares: its arguments and how its errors become one line and an exit code.

Both stages' own entry points (`python -m latentforge.preprocess`, `python -m latentforge.train`, the
launchers) and the `latentforge` command use these, so an error reads the same however a job started.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .cache_format import CacheFormatError
from .config import ConfigError, describe_config
from .range_reads import StorageReadError
from .storage import StorageWriteError

EXIT_USAGE = 2
EXIT_FAILURE = 1


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`, dotted overrides and `--help-config`, shared by every command that runs a job."""
    parser.add_argument("--config", "-c", help="YAML config (see configs/); keys can be overridden after it")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. train.lr=1e-5")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its description")


def run_guarded(command: str, handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command's handler; config, cache and storage errors become one line on stderr and an exit code.

    Exit 2 for what the user can fix in the config or the cache, 1 for the environment (disk full).
    """
    if getattr(args, "help_config", False):
        print(describe_config())
        return 0
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"latentforge {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, CacheFormatError) as exc:
        print(f"latentforge {command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageWriteError, StorageReadError) as exc:  # disk full, a failing store: the environment
        print(f"latentforge {command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE


def one_line(exc: BaseException) -> str:
    """The error's own line. A DataLoader worker's exception arrives re-raised with the worker's whole
    traceback as its message; its last line is the original `module.Class: message`."""
    text = str(exc).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last.removeprefix(prefix)
