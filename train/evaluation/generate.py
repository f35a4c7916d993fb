"""The images an evaluation scores: generated from cached embeddings, and the references decoded from latents.

Two sets, both from the cache (the trainer reads no image files):
- held-out rows (`train.held_out_fraction`): each row's cached caption embedding is denoised at the row's
  own bucket size, and its cached latent (the posterior mean) is decoded by the VAE as the reference
  image. FID and KID compare the two sets; IS scores the generated ones.
- validation prompts (`data.validation_prompts`): their text is in the cache beside their embeddings, so
  CLIP score and HPSv2.1 can score them; `train.eval.seeds_per_prompt` seeds each give LPIPS diversity.

The work is split over ranks (item i on rank i % world) and gathered on rank 0. Under ZeRO-3 every
forward pass gathers weights collectively, so there every rank makes the same number of denoising calls
(the short ranks repeat an item without decoding it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..families.render import load_vae, to_uint8
from ..step import StepSetup
from ..validation import ValidationData, _square_bucket

EVAL_SEED = 4321
Bucket = tuple[int, int]


@dataclass(frozen=True)
class Item:
    """One image to make: from a held-out row (with its reference) or from a validation prompt and a seed."""

    kind: str  # "held_out" or "prompt"
    index: int  # position among the items of its kind
    bucket: Bucket  # the size it is made at
    row: int  # the held-out row in `bucket`, or the prompt's index
    seed: int


@dataclass
class Images:
    """What rank 0 scores: held-out generations and their references (same order), prompt images and texts."""

    generated: list[np.ndarray]
    reference: list[np.ndarray]
    prompt_images: list[np.ndarray]
    prompt_texts: list[str]
    prompt_groups: list[list[np.ndarray]]  # the seeds of each prompt, for LPIPS diversity


def plan(data: ValidationData, num_images: int, seeds_per_prompt: int) -> list[Item]:
    """The items of an evaluation: up to `num_images` held-out rows spread evenly over the held-out split
    (sorted by bucket, so the choice is the same every time), then every prompt x `seeds_per_prompt`."""
    held = [(tuple(b), int(r)) for b, rows in sorted(data.held_out.items()) for r in rows]
    if len(held) > num_images:
        held = [held[i] for i in np.linspace(0, len(held) - 1, num_images).round().astype(int)]
    items = [Item("held_out", i, b, r, EVAL_SEED + i) for i, (b, r) in enumerate(held)]
    if data.prompts:
        square = _square_bucket(data.reader.spec.buckets)
        for p in range(len(data.prompts)):
            for s in range(seeds_per_prompt):
                k = p * seeds_per_prompt + s
                items.append(Item("prompt", k, square, p, EVAL_SEED + 1_000_000 + k))
    return items


def has_reference_decoder(setup: StepSetup) -> bool:
    """Whether the family's cached latents decode with a VAE here (Stable Cascade's Stage C latents do not)."""
    from latentforge.shared.families import EFFNET_CLASS, family_facts

    return family_facts(setup.config.model.family).vae_class != EFFNET_CLASS


@torch.no_grad()
def generate(model: torch.nn.Module, setup: StepSetup, data: ValidationData, items: list[Item], *, steps: int,
             guidance_scale: float | None, rank: int, world: int, sharded: bool) -> Images | None:
    """Make this rank's share of `items`, gather everything on rank 0; returns the `Images` there, None elsewhere."""
    mine: list[tuple[Item, bool]] = [(item, True) for item in items[rank::world]]
    if sharded and items:  # the same number of denoising calls on every rank
        share = -(-len(items) // world)
        mine += [(items[0], False)] * (share - len(mine))
    run_cfg = setup.config.model_copy(update={"train": setup.config.train.model_copy(
        update={"validation_inference_steps": steps})})
    render = setup.adapter.validation_renderer(model, dataclasses.replace(setup, config=run_cfg))
    vae = load_vae(setup) if any(i.kind == "held_out" for i, _ in mine) and has_reference_decoder(setup) else None
    call = {"guidance_scale": guidance_scale} if guidance_scale is not None else None
    text_fields = list(setup.empty)
    was_training = model.training
    model.eval()
    made: list[tuple[str, int, np.ndarray, np.ndarray | None]] = []
    for item, keep in mine:
        reference = None
        if item.kind == "held_out":
            row = data.reader.read_rows(item.bucket, [item.row], fields=[*text_fields, "latent_mean"])
            one = {k: row[k] for k in text_fields}
            if vae is not None and keep:  # the cached posterior mean is unscaled: what the VAE decodes
                reference = to_uint8(vae.decode(row["latent_mean"].float().to(setup.device)).sample[0])
        else:
            one = {k: v[item.row:item.row + 1] for k, v in data.embeds.items()}
        image = render(item.bucket, _on(one, setup), _on(setup.empty, setup),
                       torch.Generator(device="cpu").manual_seed(item.seed), keep, call)
        if keep:
            made.append((item.kind, item.index, image, reference))
    model.train(was_training)
    everything = _gather(made, rank, world)
    if everything is None:
        return None
    everything.sort(key=lambda m: (m[0], m[1]))
    held = [m for m in everything if m[0] == "held_out"]
    prompts = [m for m in everything if m[0] == "prompt"]
    per = max(1, len(prompts) // max(1, len(data.prompts)))
    return Images(generated=[m[2] for m in held], reference=[m[3] for m in held if m[3] is not None],
                  prompt_images=[m[2] for m in prompts], prompt_texts=[data.prompts[m[1] // per] for m in prompts],
                  prompt_groups=[[m[2] for m in prompts[s:s + per]] for s in range(0, len(prompts), per)])


def _on(fields: dict[str, torch.Tensor], setup: StepSetup) -> dict[str, torch.Tensor]:
    return {k: v.to(setup.device, setup.dtype if v.is_floating_point() else v.dtype) for k, v in fields.items()}


def _gather(made: list[Any], rank: int, world: int) -> list[Any] | None:
    """Every rank's list joined on rank 0 (None on the others); images travel as pickled uint8 arrays."""
    if world == 1:
        return list(made)
    import torch.distributed as dist

    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(made, parts, dst=0)
    return [m for part in parts for m in part] if parts is not None else None
