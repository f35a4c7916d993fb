"""What the estimate measures rather than assumes: parameter counts, optimizer state and scratch, activations.

- **Parameters** are counted exactly: the real SDXL UNet config is built on the meta device (shapes, no
  memory). LoRA counts the adapters peft adds for `train.lora` (default targets).
- **Optimizer state** is measured: each `train.optimizer` choice steps once over meta tensors of the
  given shapes and the state tensors it allocated are summed (shared ones once). Prodigy reads values
  (`.item()`), so it steps on real CPU tensors and its per-element rule is applied. `cross_check` steps
  the same optimizers on a real CPU tensor: they must allocate the same state.
- **Optimizer temporaries** (the step's scratch tensors, e.g. foreach AdamW's sqrt of the second moment)
  are the peak bytes of tensors a second `step()` allocates, tracked with a `TorchDispatchMode`.
- **Activations**: the tensors autograd saves for backward in one forward pass of the UNet on the meta
  device (bf16, attention as the flash kernel saves it), with and without gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import ROOT
from .memory_model import GIB, OPTIMIZERS, PERSISTENCE_THRESHOLD, Model

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # shared/config_schema.py LoraSection default


# ---- the model, counted on the meta device ---------------------------------------------------------
def unet_config(size: str = "full") -> dict[str, Any]:
    """The real SDXL UNet config (full) or a toy one with the same block types (smoke).

    Read from the shipped JSON (`devkit/real-configs` or `devkit/real_configs`, whichever exists), else
    from `bench.sdxl_configs.UNET`, so this benchmark does not depend on how that module is refactored.
    """
    if size == "smoke":
        return {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64],
                "attention_head_dim": [2, 4], "norm_num_groups": 32, "cross_attention_dim": 32,
                "transformer_layers_per_block": 1, "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 80}
    for folder in ("real-configs", "real_configs"):
        path = ROOT / "devkit" / folder / "sdxl" / "unet" / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    from . import sdxl_configs

    return dict(sdxl_configs.UNET)


def build_unet(cfg: dict[str, Any], lora_rank: int | None = None) -> torch.nn.Module:
    """The UNet on the meta device (no memory); with `lora_rank`, frozen and with peft adapters added."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        if lora_rank is not None:
            from peft import LoraConfig

            unet.requires_grad_(False)
            # The same call train/lora.py makes (alpha does not change sizes).
            unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS,
                                        init_lora_weights="gaussian"))
    return unet


def describe(unet: torch.nn.Module, name: str) -> Model:
    """Count a built UNet's parameters into a `Model`."""
    trainable = Counter(tuple(p.shape) for p in unet.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in unet.modules())
    small = sum(p.numel() for p in unet.parameters() if p.numel() <= PERSISTENCE_THRESHOLD)
    return Model(name, dict(trainable), frozen, largest, small)


# ---- optimizer state and temporaries, measured -----------------------------------------------------
def _factories() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    """Each `train.optimizer` choice as train/optimizers.py builds it (default settings)."""
    def bnb(name: str) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
        def make(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            import bitsandbytes

            return getattr(bitsandbytes.optim, name)(ps, lr=1e-4)
        return make

    def adafactor(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        from transformers.optimization import Adafactor

        return Adafactor(ps, lr=1e-4, relative_step=False, scale_parameter=False, warmup_init=False)

    def prodigy(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        from prodigyopt import Prodigy

        return Prodigy(ps, lr=1.0, use_bias_correction=True, safeguard_warmup=True)

    # foreach=True: what torch picks on CUDA (torch/optim/optimizer.py _default_to_fused_or_foreach);
    # on meta or CPU it would pick the per-tensor loop, whose temporaries differ.
    return {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True), "adamw_8bit": bnb("AdamW8bit"),
            "lion": bnb("Lion"), "lion_8bit": bnb("Lion8bit"), "adafactor": adafactor, "prodigy": prodigy}


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors allocated while active (outputs that are not views of an op's inputs),
    released when their storage dies: an optimizer step's scratch memory."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in inputs and s._cdata not in self.live:
                    self.live[s._cdata] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, each storage once (bitsandbytes shares its qmaps)."""
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                seen[v.untyped_storage()._cdata] = v.untyped_storage().nbytes()
    return sum(seen.values())


def step_twice(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
               shapes: Iterable[tuple[int, ...]], device: str) -> tuple[int, int]:
    """(state bytes after one step, peak temporary bytes of a second step) on fp32 parameters of `shapes`
    (DeepSpeed's master copies are fp32). Parameters are non-zero: Prodigy skips `p0` for all-zero ones."""
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.full(shape, 0.01, device=device))
        p.grad = torch.full(shape, 1e-3, device=device)
        params.append(p)
    opt = make(params)
    opt.step()
    state = _state_bytes(opt)
    probe = _LiveBytes()
    with probe:
        opt.step()
    return state, probe.peak


@dataclass
class OptimizerBytes:
    """State and step temporaries of one optimizer choice, for any set of parameter shapes.

    `state(shapes)` sums per distinct shape (state is per tensor); `temporary(shapes)` is the largest
    single tensor's scratch for optimizers that loop over tensors, and the sum over all tensors for
    foreach AdamW, whose `_foreach_sqrt` spans every tensor at once (torch/optim/adam.py
    `_multi_tensor_adam`).
    """

    name: str
    _cache: dict[tuple[int, ...], tuple[int, int]] = field(default_factory=dict)
    _rule: tuple[float, float, float] | None = None  # Prodigy: (state per element, per tensor, temp per element)

    def per_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if shape not in self._cache:
            if self.name == "prodigy":  # calls .item(): no meta tensors, so its per-element rule
                a, b, t = self.rule()
                n = math.prod(shape)
                self._cache[shape] = (round(a * n + b), round(t * n))
            else:
                self._cache[shape] = step_twice(_factories()[self.name], [shape], "meta")
        return self._cache[shape]

    def rule(self) -> tuple[float, float, float]:
        """Prodigy's bytes as (state per element, state per tensor, temporaries per element), from real CPU
        steps on 1-D tensors of 2^15 and 2^16 elements (two sizes separate the per-tensor constant)."""
        if self._rule is None:
            (s1, t1), (s2, t2) = (step_twice(_factories()[self.name], [(n,)], "cpu") for n in (1 << 15, 1 << 16))
            per = (s2 - s1) / (1 << 15)
            self._rule = (per, s1 - per * (1 << 15), t2 / (1 << 16))
        return self._rule

    def state(self, shapes: dict[tuple[int, ...], int]) -> int:
        return sum(self.per_shape(s)[0] * c for s, c in shapes.items())

    def temporary(self, shapes: dict[tuple[int, ...], int]) -> int:
        if self.name == "adamw":
            return sum(self.per_shape(s)[1] * c for s, c in shapes.items())
        return max(self.per_shape(s)[1] for s in shapes)


def cross_check(n: int = 1 << 20) -> dict[str, dict[str, float]]:
    """State bytes per element of every choice from one step on a real `n`-element CPU tensor, beside the
    meta-device figure the estimate uses: they must agree (bitsandbytes' 8-bit blockwise state runs on
    CPU here). For Prodigy it checks that its rule, fitted on 2^15 and 2^16 elements, holds at `n`."""
    out = {}
    for name in OPTIMIZERS:
        real, _ = step_twice(_factories()[name], [(n,)], "cpu")
        used = OptimizerBytes(name).per_shape((n,))[0]
        out[name] = {"cpu_step_bytes_per_param": real / n, "estimate_bytes_per_param": used / n}
    return out



# ---- activations (meta device) ------------------------------------------------------------------------
@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """Route `F.scaled_dot_product_attention` to the flash-attention op, whose autograd node saves q, k, v,
    the output and the log-sum-exp as on an H100; on meta the default would pick the math path, which
    saves the whole attention matrix (10x4096x4096 per layer at 1024x1024) and is not what a GPU runs."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, **kw: Any) -> torch.Tensor:
        if attn_mask is not None or kw:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _inputs(cfg: dict[str, Any], batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One micro-batch at the config's native size: latent, timesteps, prompt embeddings, SDXL add-conds."""
    meta = {"device": "meta", "dtype": torch.bfloat16}
    side, time_dim = cfg["sample_size"], cfg.get("addition_time_embed_dim") or 0
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * time_dim
    args = (torch.randn(batch, cfg["in_channels"], side, side, **meta), torch.full((batch,), 500, device="meta"))
    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, cfg["cross_attention_dim"], **meta),
              "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, **meta),
                                    "time_ids": torch.randn(batch, 6, **meta)}}
    return args, kwargs


def saved_for_backward(cfg: dict[str, Any], batch: int = 1, lora_rank: int | None = None) -> dict[str, float]:
    """GiB of the tensors autograd keeps for backward after one bf16 forward (parameters excluded).

    `no_checkpointing`: everything saved. `checkpointing`: with `enable_gradient_checkpointing()`, what
    stays saved between the checkpointed units (diffusers checkpoints each ResnetBlock2D and
    BasicTransformerBlock), plus the inputs a checkpoint keeps for its recomputation (only units that
    record a graph keep them: a frozen unit before the first LoRA layer does not), plus the largest unit's
    own saved tensors, which its recomputation re-creates during backward. Lower bounds of the activation
    peak: gradients of the activations, recomputation scratch and kernel workspaces are not counted.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    unet = build_unet(cfg, lora_rank).to(torch.bfloat16).train()
    params = {p.untyped_storage()._cdata for p in unet.parameters()} | {
        b.untyped_storage()._cdata for b in unet.buffers()}
    units = [m for m in unet.modules() if isinstance(m, ResnetBlock2D | BasicTransformerBlock)]
    stack: list[int] = []
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, innermost unit saving it, or -1)
    unit_inputs: dict[int, tuple[int, set[int]]] = {}  # storage -> (bytes, units it is an input of)
    keep: list[torch.Tensor] = []  # every tensor looked at stays alive, so no storage address is reused

    def storage(t: torch.Tensor) -> tuple[int, int] | None:
        keep.append(t)
        s = t.untyped_storage()
        return None if s._cdata in params else (s._cdata, s.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (key := storage(t)) and key[0] not in saved:
            saved[key[0]] = (key[1], stack[-1] if stack else -1)
        return t

    def enter(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            for t in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and (key := storage(t)):
                    unit_inputs.setdefault(key[0], (key[1], set()))[1].add(i)
            stack.append(i)
        return hook

    def leave(*_: Any) -> None:  # a forward hook must return None (a value would replace the output)
        stack.pop()

    def forward(checkpointing: bool) -> None:
        saved.clear()
        unit_inputs.clear()
        keep.clear()
        hooks = [m.register_forward_pre_hook(enter(i), with_kwargs=True) for i, m in enumerate(units)]
        hooks += [m.register_forward_hook(leave) for m in units]
        (unet.enable_gradient_checkpointing if checkpointing else unet.disable_gradient_checkpointing)()
        args, kwargs = _inputs(cfg, batch)
        try:
            with flash_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = unet(*args, **kwargs).sample
                pack(out.float())  # the loss is taken in fp32 (train/objective.py)
        finally:
            for h in hooks:
                h.remove()

    forward(False)
    everything = sum(b for b, _ in saved.values())
    per_unit = Counter()
    for nbytes, unit in saved.values():
        if unit >= 0:
            per_unit[unit] += nbytes
    forward(True)
    between = sum(b for b, _ in saved.values())
    kept_inputs = sum(b for key, (b, users) in unit_inputs.items()
                      if key not in saved and any(per_unit[u] > 0 for u in users))
    largest = max(per_unit.values(), default=0)
    keep.clear()
    return {"no_checkpointing": everything / GIB, "checkpointing": (between + kept_inputs + largest) / GIB,
            "checkpointing_between_units": (between + kept_inputs) / GIB, "largest_unit": largest / GIB}
