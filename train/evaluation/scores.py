"""The metrics, from images (HxWx3 uint8 arrays) and backbones, through the libraries' own classes.

FID, KID and IS are torchmetrics' metrics fed features computed once per image (one Inception pass serves
all three): each metric is given an identity "feature extractor", so its own maths (FID's matrix square
root, KID's polynomial-kernel MMD over subsets, IS's split KL) is what runs. KID and IS draw random
subsets and splits; that draw is seeded and kept off the training RNG (`torch.random.fork_rng`).
CLIP score is torchmetrics' CLIPScore (100 * max(cos, 0), averaged). LPIPS diversity is the mean LPIPS
distance over all pairs of images of one prompt made with different seeds (higher: more varied), averaged
over prompts. HPSv2.1 is hpsv2's `score` (cosine of the image and text features of the HPS model) times
100, the scale of its published tables.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from .backbones import HpsModel

METRIC_SEED = 0
# Only rank 0 scores, with every image already gathered: a metric must not wait for the other ranks' states.
RANK0 = {"sync_on_compute": False}


class _Given(torch.nn.Module):
    """An identity 'feature extractor': the metric receives features already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 arrays of one size -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _same_size_batches(images: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices of `images` in batches of one size each (buckets differ in size), in order within a size."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    return [idx[s:s + batch_size] for idx in by_size.values() for s in range(0, len(idx), batch_size)]


@torch.no_grad()
def inception_features(images: Sequence[np.ndarray], net: torch.nn.Module, batch_size: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool features (N, D), logits (N, K)) in float64, rows in the order of `images`."""
    pool: list[torch.Tensor | None] = [None] * len(images)
    logits: list[torch.Tensor | None] = [None] * len(images)
    for idx in _same_size_batches(images, batch_size):
        p, lg = net(to_tensor([images[i] for i in idx]).to(device))
        for j, i in enumerate(idx):
            pool[i], logits[i] = p[j].double().cpu(), lg[j].double().cpu()
    return torch.stack(pool), torch.stack(logits)  # type: ignore[arg-type]


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FrechetInceptionDistance of two feature sets (N, D); each needs 2+ rows."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), **RANK0)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """torchmetrics' KernelInceptionDistance (mean, std over `subsets` subsets of at most `subset_size` rows)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size, **RANK0)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(METRIC_SEED)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """torchmetrics' InceptionScore (mean, std over at most `splits` splits) of Inception logits (N, K)."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=_Given(logits.shape[1]), splits=max(1, min(splits, len(logits))), **RANK0)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(METRIC_SEED)
        mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def clip_score(images: Sequence[np.ndarray], texts: Sequence[str], clip: tuple, batch_size: int,
               device: torch.device) -> float:
    """torchmetrics' CLIPScore of images and their prompts."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = clip
    metric = CLIPScore(model_name_or_path=lambda: (model.to(device), processor), **RANK0).to(device)
    for idx in _same_size_batches(images, batch_size):
        metric.update(to_tensor([images[i] for i in idx]).to(device), [texts[i] for i in idx])
    return float(metric.compute())


@torch.no_grad()
def lpips_diversity(groups: Sequence[Sequence[np.ndarray]], net: torch.nn.Module, device: torch.device) -> float | None:
    """Mean pairwise LPIPS distance within each group (one prompt, several seeds), averaged over groups.

    Each image goes through the backbone once; every pair then takes LPIPS's own head (unit-normalised
    features, squared difference, its linear layers, spatial mean, summed over layers), so k seeds cost k
    backbone passes, not k(k-1)/2. None when no group has two images."""
    import lpips

    per_group = []
    for group in groups:
        if len(group) < 2:
            continue
        pixels = to_tensor(group).float().div(127.5).sub(1).to(device)  # LPIPS takes [-1, 1]
        feats = [[lpips.normalize_tensor(f) for f in net.net.forward(net.scaling_layer(pixels[i:i + 1]))]
                 for i in range(len(group))]
        pairs = itertools.combinations(range(len(group)), 2)
        per_group.append(float(np.mean([
            sum(float(lpips.spatial_average(lin((a - b) ** 2))) for lin, a, b in zip(net.lins, feats[i], feats[j],
                                                                                     strict=True))
            for i, j in pairs])))
    return float(np.mean(per_group)) if per_group else None


@torch.no_grad()
def hps_score(images: Sequence[np.ndarray], texts: Sequence[str], hps: HpsModel, batch_size: int,
              device: torch.device) -> float:
    """Mean HPSv2.1 score: 100 x cos(image features, text features) of the HPS model, as hpsv2 computes it."""
    from PIL import Image

    model = hps.model.to(device)
    scores = []
    for start in range(0, len(images), batch_size):
        batch = [hps.preprocess(Image.fromarray(a)) for a in images[start:start + batch_size]]
        out = model(torch.stack(batch).to(device), hps.tokenizer(list(texts[start:start + batch_size])).to(device))
        scores.append((out["image_features"] * out["text_features"]).sum(-1).double().cpu())
    return 100 * float(torch.cat(scores).mean())
