"""`make dataset`: download a URL list into img2dataset tar shards that a `type: webdataset` source reads.

A thin wrapper: img2dataset does the crawling (threads, retries, X-Robots-Tag opt-outs, per-shard
stats). It pins webdataset<0.3, so it lives in its own venv (`.venv-img2dataset`, made by
`make install`) and runs here as a subprocess. What this module adds is the settings latentforge needs:

- `--resize_mode no` and `--skip_reencode True`: keep the original pixels. The cache job does its own
  aspect-bucketed resize and crop, and records the true original size for SDXL micro-conditioning; a
  pre-resize would throw that away. JPEGs are stored byte-for-byte; other formats are encoded once
  to `--encode-format` (img2dataset mattes alpha onto white when it re-encodes).
- `--output_format webdataset` with captions (`.txt`) and json metadata; every other input column is
  kept in the json (`--save_additional_columns`, auto-detected from the header) so `filters:` can use it.
- `--enable_wandb False`; NO_ALBUMENTATIONS_UPDATE=1 so img2dataset's import makes no network check.

Usage::

    python -m latentforge.preprocess.dataset_download --urls urls.csv --out data/crawl \
        [--processes 4 --threads 64 --url-col url --caption-col caption --input-format csv] [-- IMG2DATASET ARGS]

img2dataset's own output goes to stderr; stdout gets one summary line. Re-running with the same --out
resumes (img2dataset's incremental mode skips finished shards).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMG2DATASET = REPO_ROOT / ".venv-img2dataset" / "bin" / "img2dataset"
INPUT_FORMATS = ("txt", "csv", "tsv", "jsonl", "parquet")
ENCODE_FORMATS = ("jpg", "png", "webp")


@dataclass(frozen=True)
class DownloadSummary:
    """Totals over img2dataset's `*_stats.json` files in the output folder."""

    out_dir: Path
    shards: tuple[str, ...]
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        """One line: shards, successes/attempts, the commonest error, and the source path to use."""
        failed = self.failed_to_download + self.failed_to_resize
        worst = self.errors.most_common(1)
        why = f" (most common: {worst[0][0][:80]!r} x{worst[0][1]})" if worst else ""
        path = f"{self.out_dir}/*.tar" if self.shards else "-"
        n = len(self.shards)
        return (f"dataset: {n} shard{'' if n == 1 else 's'} in {self.out_dir}, {self.successes}/{self.count} images "
                f"downloaded, {failed} failed{why}, {self.seconds:.1f} s; source path: {path}")


def find_img2dataset(explicit: str | os.PathLike | None = None) -> Path:
    """--img2dataset, else $LATENTFORGE_IMG2DATASET, else the repo's .venv-img2dataset, else PATH."""
    for candidate in (explicit, os.environ.get("LATENTFORGE_IMG2DATASET"), DEFAULT_IMG2DATASET,
                      shutil.which("img2dataset")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"img2dataset not found (looked for {DEFAULT_IMG2DATASET}); run `make install`, which builds "
        ".venv-img2dataset, or pass --img2dataset PATH"
    )


def _first_input(urls: Path, input_format: str) -> Path | None:
    if urls.is_dir():  # img2dataset accepts a folder of input files, read in sorted order
        return next(iter(sorted(urls.glob(f"*.{input_format}"))), None)
    return urls


def input_columns(urls: Path, input_format: str, img2dataset: Path) -> list[str]:
    """The column names of the url list (header / first record / parquet schema); [] for txt."""
    first = _first_input(urls, input_format)
    if first is None or input_format == "txt":
        return []
    if input_format in ("csv", "tsv"):
        with open(first, newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter="," if input_format == "csv" else "\t"), [])
    if input_format == "jsonl":
        with open(first, encoding="utf-8") as f:
            return list(json.loads(f.readline() or "{}"))
    # parquet: pyarrow lives in img2dataset's venv, not ours; ask its python for the schema.
    probe = "import sys, json, pyarrow.parquet as pq; print(json.dumps(pq.read_schema(sys.argv[1]).names))"
    out = subprocess.run([str(img2dataset.parent / "python"), "-c", probe, str(first)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def build_command(img2dataset: Path, urls: Path, out: Path, *, input_format: str = "csv", url_col: str = "url",
                  caption_col: str | None = "caption", processes: int = 1, threads: int = 64,
                  encode_format: str = "jpg", samples_per_shard: int = 10000, extra_cols: list[str] | None = None,
                  timeout: int = 10, retries: int = 0, passthrough: list[str] | None = None) -> list[str]:
    """The img2dataset command line with latentforge's settings (see the module docstring)."""
    cmd = [
        str(img2dataset), "--url_list", str(urls), "--output_folder", str(out),
        "--input_format", input_format, "--url_col", url_col,
        "--output_format", "webdataset", "--resize_mode", "no", "--skip_reencode", "True",
        "--encode_format", encode_format, "--encode_quality", "9" if encode_format == "png" else "95",
        "--processes_count", str(processes), "--thread_count", str(threads),
        "--number_sample_per_shard", str(samples_per_shard), "--timeout", str(timeout), "--retries", str(retries),
        "--enable_wandb", "False", "--distributor", "multiprocessing",
    ]  # fmt: skip
    if caption_col and input_format != "txt":  # a plain url list has no caption column
        cmd += ["--caption_col", caption_col]
    if extra_cols:
        cmd += ["--save_additional_columns", json.dumps(extra_cols)]  # fire reads it as a list literal
    return cmd + list(passthrough or [])


def summarise(out: Path, seconds: float = 0.0) -> DownloadSummary:
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for stats_file in sorted(out.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key) or 0)
        errors.update({k: v for k, v in (stats.get("status_dict") or {}).items() if k != "success"})
    shards = tuple(p.name.removesuffix(".tar") for p in sorted(out.glob("*.tar")))
    return DownloadSummary(out, shards, totals["count"], totals["successes"], totals["failed_to_download"],
                           totals["failed_to_resize"], errors, seconds)


def run_download(urls: str | os.PathLike, out: str | os.PathLike, *, img2dataset: str | os.PathLike | None = None,
                 extra_cols: str = "auto", quiet: bool = False, **options: object) -> DownloadSummary:
    """Run img2dataset on `urls` into `out` and summarise its stats; raises CalledProcessError on failure.

    `extra_cols`: "auto" (every input column besides url/caption), "none", or "a,b,c". `options` are
    `build_command` keywords. `quiet` captures img2dataset's output (shown only if it fails).
    """
    exe = find_img2dataset(img2dataset)
    urls_p, out_p = Path(urls).absolute(), Path(out).absolute()
    if not urls_p.exists():
        raise FileNotFoundError(f"url list {urls_p} not found; pass --urls FILE (csv with url,caption columns)")
    input_format = str(options.get("input_format", "csv"))
    if extra_cols == "auto":
        skip = {options.get("url_col", "url"), options.get("caption_col", "caption")}
        cols = [c for c in input_columns(urls_p, input_format, exe) if c not in skip]
    else:
        cols = [] if extra_cols == "none" else [c.strip() for c in extra_cols.split(",") if c.strip()]
    cmd = build_command(exe, urls_p, out_p, extra_cols=cols, **options)  # type: ignore[arg-type]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    start = time.monotonic()
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if quiet else sys.stderr,
                            stderr=subprocess.STDOUT if quiet else None, text=True)
    if result.returncode != 0:
        if quiet and result.stdout:
            sys.stderr.write(result.stdout[-4000:])
        raise subprocess.CalledProcessError(result.returncode, cmd)
    return summarise(out_p, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m latentforge.preprocess.dataset_download",
                                description="Download a URL list into tar shards with img2dataset "
                                            "(originals kept; latentforge resizes). Args after -- go to img2dataset.")
    p.add_argument("--urls", required=True, help="url list file (or folder of them)")
    p.add_argument("--out", required=True, help="output folder for NNNNN.tar shards (re-run to resume)")
    p.add_argument("--input-format", default=None, choices=INPUT_FORMATS, help="default: from --urls' suffix")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption", help="'' for none")
    p.add_argument("--extra-cols", default="auto", help="json metadata columns: auto (all others), none, or a,b,c")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=64)
    p.add_argument("--encode-format", default="jpg", choices=ENCODE_FORMATS, help="for non-JPEG originals")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--timeout", type=int, default=10, help="seconds per download")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--img2dataset", default=None, help=f"executable (default {DEFAULT_IMG2DATASET})")
    p.add_argument("--quiet", action="store_true", help="hide img2dataset's progress output")
    args = p.parse_args(argv)
    suffix = Path(args.urls).suffix.lstrip(".")
    input_format = args.input_format or (suffix if suffix in INPUT_FORMATS else "txt")
    try:
        summary = run_download(
            args.urls, args.out, img2dataset=args.img2dataset, extra_cols=args.extra_cols, quiet=args.quiet,
            input_format=input_format, url_col=args.url_col, caption_col=args.caption_col or None,
            processes=args.processes, threads=args.threads, encode_format=args.encode_format,
            samples_per_shard=args.samples_per_shard, timeout=args.timeout, retries=args.retries,
            passthrough=passthrough,
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: img2dataset exited with status {exc.returncode}", file=sys.stderr)
        return 1
    print(summary.line())
    if summary.successes == 0:
        print("error: no image was downloaded; check the url column and the network", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
