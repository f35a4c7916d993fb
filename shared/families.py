"""Per-family facts both stages need: what is cached, in which shapes, with which latent geometry.

A family's text-field widths come from the model's own configs (so a tiny test model and the real
model go through the same code); everything else that differs between families is a constant here.
This table is the list of families: `config.FAMILIES` is derived from it, and a registry test holds every
entry to its encoders (`preprocess/families/`), its denoiser adapter (`train/families/`), its tiny model
(`devkit/`), its config and its docs row. docs/families.md "Adding a family" is the checklist.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache_format import FieldSpec, common_fields
from .conditioning_format import CONDITIONING_FIELD, conditioning_channels


@dataclass(frozen=True)
class FamilyFacts:
    """Constants of a model family."""

    name: str
    vae_downsample: int  # pixels per latent cell; bucket sides must be multiples of it
    bucket_step: int  # default bucket side step in pixels (the denoiser's own downsampling times the VAE's)
    has_pooled: bool  # a pooled text embedding conditions the model (SDXL)
    has_text_mask: bool  # the text embedding travels with an attention mask (T5, Gemma)
    micro_conditioning: bool  # SDXL-style add_time_ids from original size, crop and target size
    text_max_tokens: int  # tokens per prompt window the family was trained with
    vae_class: str = "AutoencoderKL"  # diffusers autoencoder class (KL posterior, SANA's DC-AE), or Stable Cascade's
    # EfficientNet Stage C encoder ("EfficientNetEncoder", ours: diffusers has none)
    encoder_subfolder: str = "vae"  # where the latent encoder lives in the pipeline folder when model.vae is unset
    encoder_marker: str = "config.json"  # the file a standalone latent-encoder repo (model.vae) has at its top


FAMILY_FACTS: dict[str, FamilyFacts] = {
    "sdxl": FamilyFacts("sdxl", 8, 64, has_pooled=True, has_text_mask=False, micro_conditioning=True, text_max_tokens=77),
    "sd1": FamilyFacts("sd1", 8, 64, has_pooled=False, has_text_mask=False, micro_conditioning=False, text_max_tokens=77),
    "sd2": FamilyFacts("sd2", 8, 64, has_pooled=False, has_text_mask=False, micro_conditioning=False, text_max_tokens=77),
    "pixart_sigma": FamilyFacts("pixart_sigma", 8, 64, has_pooled=False, has_text_mask=True, micro_conditioning=False, text_max_tokens=300),
    "sana": FamilyFacts("sana", 32, 32, has_pooled=False, has_text_mask=True, micro_conditioning=False, text_max_tokens=300,
                         vae_class="AutoencoderDC"),
    # Stage C of Stable Cascade: 16-channel EfficientNetV2-S latents at 1/32 of the image (768 px -> 24x24),
    # CLIP ViT-bigG last hidden state (77x1280) + pooled projection (1280).
    "stable_cascade": FamilyFacts("stable_cascade", 32, 32, has_pooled=True, has_text_mask=False,
                                   micro_conditioning=False, text_max_tokens=77, vae_class="EfficientNetEncoder",
                                   encoder_subfolder="effnet", encoder_marker="effnet_encoder.safetensors"),
}
EFFNET_CLASS = "EfficientNetEncoder"


def family_facts(family: str) -> FamilyFacts:
    try:
        return FAMILY_FACTS[family]
    except KeyError:
        raise ValueError(f"model.family {family!r} is not one of {', '.join(FAMILY_FACTS)}") from None


def cached_fields(
    family: str,
    *,
    latent_channels: int,
    latent_mode: str,
    store_dtype: str,
    text_tokens: int,
    text_dim: int,
    pooled_dim: int | None = None,
    conditioning: str | None = None,
) -> tuple[FieldSpec, ...]:
    """The fields a cache of this family holds, in order; `conditioning` (a `cache.conditioning.kind`)
    adds the control image beside the latent."""
    facts = family_facts(family)
    what = "EfficientNet Stage C latent" if facts.vae_class == EFFNET_CLASS else "VAE posterior mean, unscaled"
    fields = [FieldSpec("latent_mean", (latent_channels, "h", "w"), store_dtype, what)]
    if latent_mode == "dist":
        fields.append(FieldSpec("latent_std", (latent_channels, "h", "w"), store_dtype, "VAE posterior std, unscaled"))
    fields.append(FieldSpec("prompt_embeds", (text_tokens, text_dim), store_dtype, "text-encoder hidden states"))
    if facts.has_pooled:
        if not pooled_dim:
            raise ValueError(f"family {family} needs a pooled embedding width")
        fields.append(FieldSpec("pooled_prompt_embeds", (pooled_dim,), store_dtype, "pooled text embedding"))
    if facts.has_text_mask:
        fields.append(FieldSpec("prompt_mask", (text_tokens,), "uint8", "1 for real tokens, 0 for padding"))
    if conditioning:
        fields.append(FieldSpec(CONDITIONING_FIELD, (conditioning_channels(conditioning), "H", "W"), "uint8",
                                f"{conditioning} control image at the bucket size, uint8, same crop and flip as the latent"))
    return (*fields, *common_fields())


def text_field_names(family: str) -> tuple[str, ...]:
    """The fields that depend only on the caption (cached once more for the empty and validation prompts)."""
    facts = family_facts(family)
    names = ["prompt_embeds"]
    if facts.has_pooled:
        names.append("pooled_prompt_embeds")
    if facts.has_text_mask:
        names.append("prompt_mask")
    return tuple(names)


ALT_SUFFIX = "_alt"  # caption variants 1..N-1 of a text field: `prompt_embeds_alt` beside `prompt_embeds`


def with_caption_variants(fields: tuple[FieldSpec, ...], family: str, variants: int) -> tuple[FieldSpec, ...]:
    """`fields` plus, for `variants` > 1, one `<text field>_alt` per text field holding variants 1..N-1
    (per-sample shape (N - 1, *shape)); variant 0 stays in the text field itself."""
    if variants <= 1:
        return fields
    text = set(text_field_names(family))
    alts = [FieldSpec(f.name + ALT_SUFFIX, (variants - 1, *f.shape), f.dtype, f"caption variants 1..{variants - 1} of {f.name}")
            for f in fields if f.name in text]
    return (*fields, *alts)
