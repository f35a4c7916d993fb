"""The config schema: every section and key of a run, with its type, bounds and description.

Why pydantic rather than plain dataclasses: it gives strict typing, `extra="forbid"` and per-field
descriptions for free, and DeepSpeed already depends on it, so it costs no extra install. Loading YAML,
applying overrides and phrasing errors live in `config.py`; this module only declares (the train section: `config_train.py`).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal

from pydantic import Field, model_validator

from .config_section import FAMILIES, ComputeDtype, Family, Section, StoreDtype
from .config_train import (
    ControlNetSection,
    EdmConfig,
    EmaConfig,
    LoraSection,
    TimestepBiasConfig,
    TrainConfig,
)
from .secrets import credential_error, find_credential

__all__ = ["FAMILIES", "BucketsConfig", "CacheConfig", "ComputeDtype", "ConditioningConfig", "Config",
           "ControlNetSection", "DataConfig", "EdmConfig", "EmaConfig", "Family", "LoraSection", "MetadataFilter",
           "ModelConfig", "SourceConfig", "StoreDtype", "TimestepBiasConfig", "TrainConfig", "UpscaleConfig",
           "credential_in_config", "parse_ratio"]

# The train section lives in config_train.py; the base class and shared types in config_section.py.
_Section = Section


def credential_in_config(tree: Any) -> tuple[str | None, bool]:
    """(dotted path, found in a URL) of the first credential in a raw config tree, or (None, False).

    Option names count inside every `storage_options` (at any depth), the `deepspeed` section (monitors
    take api keys) and `train.wandb`; a URL with userinfo counts anywhere.
    """
    if not isinstance(tree, dict):
        return None, False
    url = find_credential(tree, names=False)
    if url:
        return url, True
    candidates: list[tuple[str, Any]] = [("deepspeed", tree.get("deepspeed")),
                                         ("cache.storage_options", (tree.get("cache") or {}).get("storage_options")
                                          if isinstance(tree.get("cache"), dict) else None)]
    train = tree.get("train")
    if isinstance(train, dict):
        candidates.append(("train.wandb", train.get("wandb")))  # an api_key pasted beside the project
    sources = (tree.get("data") or {}).get("sources") if isinstance(tree.get("data"), dict) else None
    for i, src in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(src, dict):
            candidates.append((f"data.sources.{i}.storage_options", src.get("storage_options")))
    for path, sub in candidates:
        if isinstance(sub, dict):
            found = find_credential(sub, names=True, path=path)
            if found:
                return found, False
    return None, False


def parse_ratio(value: str | float) -> Fraction:
    """An aspect ratio w / h written as a fraction ("9/16") or a number (0.5625), as an exact positive Fraction."""
    try:
        ratio = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"buckets.aspect_ratios: {value!r} is not a ratio like 9/16 or 0.75") from None
    if ratio <= 0:
        raise ValueError(f"buckets.aspect_ratios: {value!r} must be positive")
    return ratio


class ModelConfig(_Section):
    pretrained: str = Field(
        description="Hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or local diffusers pipeline folder."
    )
    family: Family = Field(default="sdxl", description="Model family: " + ", ".join(FAMILIES) + ".")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    variant: str | None = Field(default=None, description="Weight variant to load, e.g. fp16.")
    vae: str | None = Field(
        default=None, description="Optional separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix; "
        "stable_cascade: the folder or hub repo holding effnet_encoder.safetensors (stabilityai/StableCascade).",
    )
    decoder: str | None = Field(
        default=None, description="stable_cascade: the Stage B + A pipeline for validation images (folder or hub id, "
        "e.g. stabilityai/stable-cascade); default <pretrained>/decoder when that folder exists.",
    )

    def pins(self, *, weights: bool = True) -> dict[str, str]:
        """`revision` (and with `weights`, `variant`) to pass to `from_pretrained` / `load_config` of the
        `pretrained` repo, so every component of a run (denoiser, validation VAE and scheduler, export)
        loads the same revision; empty when neither is set. Not for a separate `vae` (another repo)."""
        pins = {"revision": self.revision, "variant": self.variant if weights else None}
        return {k: v for k, v in pins.items() if v}


class MetadataFilter(_Section):
    field: str = Field(description="Key in the sample's json metadata, e.g. aesthetic_score.")
    op: Literal[">", ">=", "<", "<=", "==", "!=", "in", "not in"] = Field(description="Comparison operator.")
    value: Any = Field(description="Right-hand side; a list for in / not in.")


class SourceConfig(_Section):
    type: Literal["webdataset", "folder", "generate"] = Field(
        description="webdataset: img2dataset-style tar shards; folder: images with .txt/.json sidecars; generate: "
        "images the base pipeline generates into `path` (DreamBooth class images), then cached as a folder."
    )
    path: str = Field(
        description="Tar glob / brace range / URL (http(s)://, s3://) for webdataset; a directory for folder; a "
        "local directory for generate (images already there count towards `count`)."
    )
    prompt: str | None = Field(default=None, description="generate: the prompt (and caption) of every image.")
    count: int | None = Field(default=None, ge=1, description="generate: how many images the folder must hold.")
    seed: int = Field(default=0, ge=0, description="generate: image i is generated from seed + i.")
    steps: int = Field(default=30, ge=1, description="generate: denoising steps per image.")
    guidance: float = Field(default=7.5, ge=0, description="generate: classifier-free guidance scale.")
    resolution: int | None = Field(
        default=None, ge=8, description="generate: square image side in pixels; default buckets.resolutions[0]."
    )
    caption_field: str = Field(
        default="txt", description="Where the caption lives: 'txt' (sidecar/member) or a key of the json metadata."
    )
    extra_caption_fields: list[str] = Field(
        default_factory=list,
        description="Json metadata keys holding more captions of a sample (a string, or a list of tags): cached "
        "as caption variants when cache.caption_variants > 1.",
    )
    tag_shuffle: bool = Field(
        default=False, description="Caption variants: the caption's comma-separated tags, shuffled (seeded per sample)."
    )
    keep_tokens: int = Field(default=0, ge=0, description="tag_shuffle: leading tags that keep their place.")
    repeats: int = Field(default=1, ge=1, description="How many times each sample appears per training epoch.")
    weight: float | None = Field(
        default=None, gt=0,
        description="Sampling probability of this source (normalised over sources): its share of the trained "
        "samples whatever its size; repeats then set the epoch length. Set on every source or on none.",
    )
    loss_weight: float = Field(
        default=1.0, ge=0, description="Per-sample loss multiplier (DreamBooth's prior-preservation weight on class images)."
    )
    shard_size: int = Field(
        default=1000, ge=1, description="Folder sources: images per virtual shard (sorted listing)."
    )
    filters: list[MetadataFilter] = Field(default_factory=list, description="Declarative json-metadata filters.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options (e.g. endpoint_url for R2). Never put keys here: use the environment.",
    )

    @model_validator(mode="after")
    def _generate_keys(self) -> SourceConfig:
        if self.type == "generate" and (self.prompt is None or self.count is None):
            raise ValueError("type: generate needs prompt and count (e.g. prompt: 'a photo of a dog', count: 200)")
        if self.type != "generate" and (self.prompt is not None or self.count is not None):
            raise ValueError(f"prompt and count are for type: generate, not type: {self.type}; remove them")
        return self


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1, description="Input datasets, cached together.")
    validation_prompts: list[str] = Field(
        default_factory=list, description="Prompts cached with the dataset, used for validation images."
    )

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> DataConfig:
        unset = [i for i, s in enumerate(self.sources) if s.weight is None]
        if unset and len(unset) < len(self.sources):
            raise ValueError(f"data.sources.{unset[0]}.weight is unset while other sources set one; "
                             "set weight on every source or on none")
        return self


class BucketsConfig(_Section):
    resolutions: list[int] = Field(
        default=[1024], min_length=1, description="Target resolutions; each bucket has area close to res**2."
    )
    step: int = Field(default=64, ge=8, description="Bucket sides are multiples of this (pixels).")
    min_aspect: float = Field(default=0.25, gt=0, description="Smallest width/height ratio of a bucket.")
    max_aspect: float = Field(default=4.0, gt=0, description="Largest width/height ratio of a bucket.")
    aspect_ratios: list[str | float] | None = Field(
        default=None,
        description="Explicit bucket aspect ratios w/h (e.g. ['1/1', '9/16'], Stable Cascade's multi_aspect_ratio); "
        "each and its reciprocal, area close to res**2, sides floored to step. Unset: every ratio in "
        "[min_aspect, max_aspect].",
    )
    min_resolution: int = Field(default=0, ge=0, description="Skip images whose shorter side is below this.")
    crop: Literal["center", "random"] = Field(
        default="center", description="Crop after cover-resize; random is seeded by the sample key."
    )

    @model_validator(mode="after")
    def _aspect_order(self) -> BucketsConfig:
        if self.min_aspect > self.max_aspect:
            raise ValueError(f"min_aspect ({self.min_aspect}) must be <= max_aspect ({self.max_aspect})")
        for r in self.resolutions:
            if r < self.step or r % self.step:
                raise ValueError(f"resolutions: {r} must be a positive multiple of step ({self.step})")
        for value in self.aspect_ratios or ():
            parse_ratio(value)
        return self


class UpscaleConfig(_Section):
    enabled: bool = Field(default=True, description="Upscale images smaller than their bucket.")
    threshold: float = Field(
        default=1.0, ge=1.0, description="Upscale when the bucket needs more than this resize factor."
    )
    model_path: str | None = Field(
        default=None, description="Real-ESRGAN .pth (e.g. RealESRGAN_x4plus.pth); absent -> Lanczos fallback."
    )
    face_model_path: str | None = Field(default=None, description="GFPGAN .pth for face restoration (optional).")
    tile: int = Field(default=256, ge=32, description="Tile size in pixels so large images fit in memory.")
    tile_pad: int = Field(default=16, ge=0, description="Overlap between tiles, in pixels.")


class ConditioningConfig(_Section):
    kind: Literal["none", "canny", "image", "inpaint", "sidecar"] = Field(
        default="none",
        description="Control image cached beside each latent (ControlNet): canny edges (computed here), image "
        "(the crop; tile/super-resolution), inpaint (the crop; masks drawn at train time), sidecar "
        "(`<key>.<sidecar>.png` shipped with each image), none.",
    )
    canny_low: float = Field(default=100.0, ge=0, description="Canny hysteresis low threshold (0-255 gradient units).")
    canny_high: float = Field(default=200.0, ge=0, description="Canny hysteresis high threshold (0-255 gradient units).")
    canny_sigma: float = Field(default=1.0, ge=0, description="Gaussian smoothing before Canny, in pixels.")
    canny_resize: int | None = Field(
        default=None, ge=8, description="Run Canny on the crop squashed to this square size and enlarge the edges "
        "back (bilinear): Stable Cascade's CannyFilter(resize=224); unset: at the crop's size.",
    )
    sidecar: str = Field(
        default="depth", pattern=r"^[a-z0-9_]+$",
        description="kind sidecar: the map of sample KEY is the member/file KEY.<sidecar>.<png|jpg|webp|...>.",
    )

    @model_validator(mode="after")
    def _thresholds(self) -> ConditioningConfig:
        if self.canny_low > self.canny_high:
            raise ValueError(f"canny_low ({self.canny_low}) must be <= canny_high ({self.canny_high})")
        return self


class CacheConfig(_Section):
    path: str = Field(description="Where the cache lives: a local path or an fsspec URL (s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for cache.path (e.g. endpoint_url); never credentials."
    )
    latent_mode: Literal["mean", "dist"] = Field(
        default="mean", description="mean: posterior mean only; dist: mean and std (sample fresh each step)."
    )
    store_dtype: StoreDtype = Field(default="bfloat16", description="On-disk dtype of latents and embeddings.")
    vae_dtype: ComputeDtype = Field(
        default="float32", description="VAE compute dtype (the SDXL VAE overflows in float16)."
    )
    text_dtype: ComputeDtype = Field(default="float32", description="Text-encoder compute dtype.")
    batch_size: int = Field(default=8, ge=1, description="Images per VAE batch (per bucket).")
    max_pixels: int = Field(
        default=178_956_970, ge=1, description="Decompression-bomb limit: images with more pixels are skipped."
    )
    flip: bool = Field(default=False, description="Also cache the horizontally flipped image.")
    clip_skip: int = Field(default=0, ge=0, description="Extra text-encoder layers to skip (0 = family default).")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Prompt tokens: default the family's (77 CLIP, 300 T5/Gemma); SDXL above 77 encodes 75-token windows (150, 225).",
    )
    codec: Literal["blosc-lz4", "blosc-zstd", "zstd", "none"] = Field(
        default="blosc-lz4", description="Compression of tensor chunks (blosc shuffles bytes first)."
    )
    shard_rows: int = Field(
        default=256, ge=1, description="Rows per Zarr shard file of a bucket array (rows are chunks inside it)."
    )

    workers: int = Field(default=2, ge=1, description="Threads decoding/resizing/upscaling ahead of the encoders.")
    prepare_processes: int = Field(
        default=0, ge=0, description="Worker processes (spawned) decoding, resizing and making control images "
        "ahead of the encoders instead of the `workers` threads (0: threads). The cache is bit for bit the same; "
        "a model upscaler (upscale.enabled) keeps preparation on threads.")
    max_skip_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Exit non-zero (after committing all work) if more samples are skipped."
    )
    deterministic: bool = Field(
        default=True,
        description="Bitwise-identical tensors whatever the process/thread count: CPU runs without oneDNN "
        "(about 2x slower VAE on CPU) on one thread per process (more cores: more torchrun processes), "
        "CUDA with deterministic cuDNN.",
    )
    missing_caption: Literal["skip", "empty"] = Field(
        default="skip", description="A sample without a caption: skip it, or cache it with the empty prompt."
    )
    caption_variants: int = Field(
        default=1, ge=1, le=16,
        description="Captions encoded per image (the caption, data.sources[*].extra_caption_fields, tag shuffles); "
        "the trainer picks one per sample and step. Each extra variant costs one more text embedding per sample.",
    )
    conditioning: ConditioningConfig = Field(
        default_factory=ConditioningConfig, description="ControlNet control images cached per sample."
    )


class Config(_Section):
    """A whole run. Both stages read the same file; each ignores sections it does not need."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, tree: Any) -> Any:
        # Also here, not only in load_config: a config snapshot read back from a checkpoint is checked too.
        where, in_url = credential_in_config(tree)
        if where:
            raise ValueError(credential_error(where, in_url=in_url))
        return tree

    model: ModelConfig
    data: DataConfig
    buckets: BucketsConfig = Field(default_factory=BucketsConfig)
    upscale: UpscaleConfig = Field(default_factory=UpscaleConfig)
    cache: CacheConfig
    train: TrainConfig
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="Passed to DeepSpeed (zero_optimization, bf16, ...); validated there."
    )

    @model_validator(mode="after")
    def _variants_need_slots(self) -> Config:
        # Caption-variant settings without room for variants would be silently ignored: refuse them instead.
        for i, s in enumerate(self.data.sources):
            if self.cache.caption_variants == 1 and (s.extra_caption_fields or s.tag_shuffle):
                key = "extra_caption_fields" if s.extra_caption_fields else "tag_shuffle"
                raise ValueError(f"data.sources.{i}.{key} needs cache.caption_variants > 1 (e.g. 4) to be cached")
        return self


