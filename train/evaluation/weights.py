"""Where each metric backbone's weights come from: a local file, the download cache, or one download.

Each backbone can be pointed at local files (a `train.eval.*` key). Unset, the file is looked up in the
cache its library downloads into (the torch hub cache, the Hugging Face hub cache) and downloaded there
once on a machine with network. Offline (`HF_HUB_OFFLINE=1`, as tests and air-gapped clusters run) or when
the download fails, `MissingWeightsError` says in one line which weights are missing and how to provide
them: the config key to set and the URL or hub id to fetch them from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class MissingWeightsError(FileNotFoundError):
    """A metric backbone's weights are neither local nor downloadable; the message is one line (the CLI
    prints it as the command's error, exit 2)."""


@dataclass(frozen=True)
class WeightsSource:
    """One backbone's weights: what they are, the config key that points at local ones, where they live."""

    what: str  # e.g. "InceptionV3 (FID/KID/IS)"
    key: str  # e.g. "train.eval.inception_weights"
    url: str = ""  # a plain download (torch hub cache)
    hub_repo: str = ""  # or a Hugging Face hub repo ...
    hub_file: str = ""  # ... and a file in it (empty: the whole repo, as from_pretrained loads it)

    def where(self) -> str:
        if self.url:
            return self.url
        return f"hub {self.hub_repo}" + (f" file {self.hub_file}" if self.hub_file else "")

    def missing(self, reason: str) -> MissingWeightsError:
        return MissingWeightsError(
            f"evaluation needs the {self.what} weights ({reason}): set {self.key} to a local copy, downloaded from "
            f"{self.where()}, or run once with network access")


INCEPTION = WeightsSource(
    "InceptionV3 (FID/KID/IS)", "train.eval.inception_weights",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth")
HPS = WeightsSource("HPSv2.1", "train.eval.hps_checkpoint", hub_repo="xswu/HPSv2", hub_file="HPS_v2.1_compressed.pt")
LPIPS_URLS = {"alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
              "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
              "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"}


def lpips_source(net: str) -> WeightsSource:
    """The torchvision ImageNet weights of LPIPS's backbone `net` (its linear heads ship inside torchmetrics)."""
    return WeightsSource(f"LPIPS {net} backbone", "train.eval.lpips_weights", url=LPIPS_URLS[net])


def clip_source(model: str) -> WeightsSource:
    return WeightsSource(f"CLIP ({model})", "train.eval.clip_model", hub_repo=model)


def offline() -> bool:
    """True when this process must not reach the network (the hub client's own switches)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def weights_file(source: WeightsSource, local: str | None) -> Path:
    """The weights file of `source`: `local` when set, else its download cache (the torch hub cache for a
    plain URL, the Hugging Face cache for a hub file), downloaded there first unless offline."""
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"{source.key}={local}: no such file; point it at the {source.what} weights "
                                      f"(from {source.where()})")
        return path
    return _hub_download(source) if source.hub_repo else _url_download(source)


def _url_download(source: WeightsSource) -> Path:
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / source.url.rsplit("/", 1)[-1]
    if cached.is_file():
        return cached
    if offline():
        raise source.missing(f"not in {cached.parent} and HF_HUB_OFFLINE is set")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(source.url, str(cached), progress=False)
    except Exception as exc:  # no route, proxy, HTTP error: all say the same to the user
        raise source.missing(f"download failed: {type(exc).__name__}") from None
    return cached


def _hub_download(source: WeightsSource) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.hub_repo, source.hub_file, local_files_only=offline()))
    except Exception as exc:
        raise source.missing(_hub_reason(exc)) from None


def hub_folder(source: WeightsSource, name_or_path: str, load: Callable[[str], T]) -> T:
    """`load(name_or_path)` (a `from_pretrained`), turning a missing local folder or an offline hub miss
    into `MissingWeightsError`."""
    if Path(name_or_path).expanduser().exists():
        return load(str(Path(name_or_path).expanduser()))
    try:
        return load(name_or_path)
    except (OSError, ValueError) as exc:
        raise source.missing(_hub_reason(exc)) from None


def _hub_reason(exc: Exception) -> str:
    return "HF_HUB_OFFLINE is set and it is not in the hub cache" if offline() else type(exc).__name__
