"""`type: generate` sources: DreamBooth class images made by the base pipeline inside the cache job.

When the source's folder holds fewer than `count` images, the missing ones are generated before the shards
are listed: image i is `gen-<i:06d>.png` (caption `gen-<i:06d>.txt` = the prompt), generated from seed
`seed + i` with its own generator, one image per pipeline call, so its pixels depend only on i and never on
how many ranks share the work or which rank draws it. Images of other names already in the folder (class
images you have) count towards `count`. A file is written under a hidden temporary name and renamed, so a
killed job leaves either a whole image or nothing that the listing sees, and a re-run generates only what
is missing (resumable like every shard). The missing indices are split over ranks by index; every rank
waits at a barrier, then the folder is listed and cached like a `folder` source.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentforge.shared.config import Config, ConfigError, SourceConfig

from .determinism import pin_deterministic, restored_backends
from .source_checks import IMAGE_EXTS

log = logging.getLogger(__name__)

_GENERATED = re.compile(r"gen-(\d{6})\.png")


def generated_name(index: int) -> str:
    """File name of generated image `index`."""
    return f"gen-{index:06d}.png"


def missing_indices(folder: Path, count: int) -> list[int]:
    """Indices still to generate so that `folder` holds `count` images (other images there count too)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    theirs = sum(1 for n in names if not n.startswith(".") and not _GENERATED.fullmatch(n)
                 and n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    have = set(names)
    return [i for i in range(max(0, count - theirs)) if generated_name(i) not in have]


def rank_share(missing: list[int], rank: int, world: int) -> list[int]:
    """This rank's part of the missing indices: those with index % world == rank. By index, not by position
    in `missing`, so ranks that list the folder at different moments (another rank already writing) still
    split it without overlap or gaps."""
    return [i for i in missing if i % world == rank]


def generate_sources(config: Config) -> list[tuple[int, SourceConfig]]:
    """(index, source) of every `type: generate` source; a remote path is a one-line config error."""
    found = [(i, s) for i, s in enumerate(config.data.sources) if s.type == "generate"]
    for i, s in found:
        if "://" in s.path:
            raise ConfigError(f"config error: data.sources[{i}].path {s.path!r}: type: generate writes to a local "
                              "folder; generate locally, upload, and cache it as type: folder")
    return found


def generate_class_images(config: Config, rank: int, world: int, device: torch.device,
                          load: Callable[[Config, torch.device], Any] | None = None) -> int:
    """Generate this rank's share of every generate source's missing images; returns how many it wrote.

    `load` builds the pipeline (default: the run's base pipeline, `DiffusionPipeline.from_pretrained`); it is
    only called when this rank has something to generate.
    """
    with restored_backends():
        if config.cache.deterministic:  # as the encoders: the same pixels whatever the process and thread count
            pin_deterministic(device)
        return _generate(config, rank, world, device, load)


def _generate(config: Config, rank: int, world: int, device: torch.device,
              load: Callable[[Config, torch.device], Any] | None) -> int:
    pipe, written = None, 0
    for i, source in generate_sources(config):
        folder = Path(source.path)
        folder.mkdir(parents=True, exist_ok=True)
        todo = rank_share(missing_indices(folder, int(source.count or 0)), rank, world)
        if not todo:
            continue
        if pipe is None:
            pipe = (load or load_pipeline)(config, device)
        side = source.resolution or config.buckets.resolutions[0]
        log.info("source %d: rank %d generates %d class images of %r", i, rank, len(todo), source.prompt)
        for index in todo:
            write_image(folder, index, source, generate_one(pipe, source, index, side, device))
            written += 1
    if pipe is not None:
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return written


def load_pipeline(config: Config, device: torch.device) -> Any:
    """The run's base pipeline (every component, at the pinned revision), loaded straight onto `device`, without
    progress bars."""
    from diffusers import DiffusionPipeline

    from .model_load import load_pretrained_pipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        # A separate model.vae (e.g. the fp16-fixed SDXL VAE) decodes the class images too.
        extra = {"vae": _separate_vae(config, dtype, device)} if config.model.vae else {}
        pipe = load_pretrained_pipeline(DiffusionPipeline, config.model.pretrained, device, dtype,
                                        **config.model.pins(), **extra)
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"config error: model.pretrained: type: generate needs the whole base pipeline "
                          f"({config.model.pretrained!r}: {first})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _separate_vae(config: Config, dtype: torch.dtype, device: torch.device) -> Any:
    import diffusers

    from latentforge.shared.families import family_facts

    from .model_load import load_pretrained

    cls = getattr(diffusers, family_facts(config.model.family).vae_class)
    return load_pretrained(cls, config.model.vae, device, dtype)


def generate_one(pipe: Any, source: SourceConfig, index: int, side: int, device: torch.device) -> Any:
    """Image `index` of `source` (a PIL image), from its own generator seeded `source.seed + index`."""
    generator = torch.Generator(device="cpu").manual_seed(source.seed + index)
    out = pipe(prompt=source.prompt, num_inference_steps=source.steps, guidance_scale=source.guidance,
               height=side, width=side, generator=generator)
    return out.images[0]


def write_image(folder: Path, index: int, source: SourceConfig, image: Any) -> Path:
    """Caption first, then the image under a hidden name renamed into place: the image's presence means done."""
    name = generated_name(index)
    (folder / name.replace(".png", ".txt")).write_text(str(source.prompt))
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, folder / name)
    return folder / name
