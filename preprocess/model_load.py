"""The cache job's frozen models, loaded once per rank straight onto the rank's device.

Why not `from_pretrained(...).to(device)`: that materialises the whole model in host memory first and
copies it afterwards, so a node with 8 caching ranks holds 8 host copies of the text encoders and the VAE
while they load. Here every model is placed on `device` as its weights are read:

* diffusers (0.42) and transformers (5.x) models: `from_pretrained(..., torch_dtype=..., device_map={"": device})`.
  transformers reads each tensor from the safetensors file and puts it on the device one at a time;
  diffusers builds the model on the meta device, maps the weights file (mmap: page cache, shared by the
  ranks of a node) and moves tensor by tensor. Neither builds a host copy of the model.
* our own modules (the Stable Cascade EfficientNet) and spandrel's (the upscaler): the state dict is read
  with `safetensors.load_file(path, device=...)` / spandrel's `ModelLoader(device)`, and the module is built
  under `torch.device(device)`, so its parameters are allocated on the device, not on the host.

On the CPU (the tests) `device` is the host and the loaded weights are exactly those of the old path.
Every load logs one INFO line (`loaded <what> on <device> in <s> s`): a rank loads each model once, at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def placement_kwargs(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What `from_pretrained` of diffusers and transformers needs to put every weight on `device`, in `dtype`, as
    it is read.

    `dtype` is both libraries' name in these versions (`torch_dtype` is deprecated in each). `low_cpu_mem_usage` is
    diffusers' switch (meta-device init; `device_map` needs it and it is its default); transformers 5 always
    initialises on meta and drops the argument."""
    return {"device_map": {"": torch.device(device)}, "dtype": dtype, "low_cpu_mem_usage": True}


def load_pretrained(cls: Any, source: str, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source, **kwargs)` straight onto `device` in `dtype` (the dtype it runs in: no float32
    detour), in eval mode and frozen. `kwargs` are the usual ones (`subfolder`, `revision`, `variant`)."""
    t = time.perf_counter()
    model = cls.from_pretrained(source, **kwargs, **placement_kwargs(device, dtype))
    model.eval().requires_grad_(False)
    where = f"{source}/{kwargs['subfolder']}" if kwargs.get("subfolder") else source
    log.info("loaded %s from %s on %s in %.1f s", cls.__name__, where, device, time.perf_counter() - t)
    return model


@contextmanager
def built_on(device: torch.device, what: str) -> Iterator[None]:
    """Build a module inside this block and its parameters are allocated on `device` (not on the host first)."""
    t = time.perf_counter()
    with torch.device(device):
        yield
    log.info("loaded %s on %s in %.1f s", what, device, time.perf_counter() - t)


def load_safetensors(path: str | Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read straight onto `device` in their stored dtype."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(torch.device(device)))


def load_pretrained_pipeline(cls: Any, source: str, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> Any:
    """A whole diffusers pipeline (`cls.from_pretrained(source, **kwargs)`), every model put on `device` in `dtype`
    as it is read.

    diffusers' pipeline loader takes a device *type* as `device_map` ("cuda" or "cpu", not "cuda:1"), so the
    device's index is made the current CUDA device while it loads (diffusers' models follow it; transformers'
    map "cuda" to LOCAL_RANK, the cache job's device index). A final `.to(device)` moves whatever would still
    sit elsewhere, device to device."""
    device = torch.device(device)
    t = time.perf_counter()
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        pipe = cls.from_pretrained(source, **kwargs, dtype=dtype, device_map=device.type)
    log.info("loaded %s from %s on %s in %.1f s", type(pipe).__name__, source, device, time.perf_counter() - t)
    return pipe.to(device)
