"""Peak host memory while the cache job loads its models: the old way vs `preprocess.model_load`, per model.

Old: `from_pretrained(..., dtype=...).to(device)` (spandrel: `ModelLoader(device).load_from_file`), what the
cache job did before. New: `model_load.load_pretrained` (`device_map={"": device}`) and, for the upscaler,
`Upscaler(path, device=...)` (network built under `torch.device`). Each load runs in a fresh Python process
(`--child`), after its imports (and, on CUDA, after the CUDA context is made): the peak is the kernel's
high-water mark of resident memory (VmHWM, reset through /proc/self/clear_refs just before the load) minus
the resident memory at that moment, next to the bytes of the weights loaded. A thread samples RssAnon /
RssFile every 2 ms to split the peak into private memory (a copy of the weights) and mapped file pages
(the page cache, shared by every rank of a node). Each process also hashes the loaded weights: they must
equal the saved file's, bit for bit, both ways.

The SDXL encoders are written at their real sizes with random weights (`write_sdxl_encoders`: the configs
shipped in devkit/real-configs/sdxl, fp16 safetensors through the real `save_pretrained`: CLIP-L 246 MB,
OpenCLIP bigG 1.39 GB, the VAE 167 MB; reused while their marker says they are complete). `--tiny` uses the
devkit's tiny SDXL pipeline instead (a check of the script, not a measurement). `bench.gpu_check` runs the
same measurement on its real-size SDXL folder with `cuda:0`.

    python -m bench.load_memory [--device cpu|cuda:0] [--components vae,text_encoder,text_encoder_2]
                                [--tiny] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, ROOT, default_workdir, machine_info, now_iso, save_json

SDXL_ENCODERS = ("vae", "text_encoder", "text_encoder_2")
UPSCALER = "upscaler"  # a spandrel .pth given with --upscaler; not a subfolder
WAYS = ("old", "new")
MARKER = "load_memory.json"
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


# ---- the weights -------------------------------------------------------------------------------------------
def write_sdxl_encoders(folder: Path, components: tuple[str, ...] = SDXL_ENCODERS) -> dict[str, Any]:
    """SDXL's encoders at their real sizes, random fp16 weights, saved with `save_pretrained` into `folder`."""
    import torch

    from latentforge.devkit import real_sizes

    want = {"components": list(components), "dtype": "float16", "version": 1}
    try:
        if json.loads((folder / MARKER).read_text()) == want:
            return {"reused": True}
    except (OSError, ValueError):
        pass
    info: dict[str, Any] = {"reused": False}
    for i, sub in enumerate(components):
        t = time.perf_counter()
        # Built on meta and allocated once in fp16: a float32 bigG (2.8 GB) is never made.
        model = real_sizes.build_component("sdxl", sub, "meta", torch.float16).to_empty(device="cpu")
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for t_ in [*model.parameters(), *model.buffers()]:
                t_.normal_(0, 0.02, generator=gen) if t_.is_floating_point() else t_.zero_()
        model.save_pretrained(folder / sub)
        info[sub] = {"parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - t, 1)}
        del model
    (folder / MARKER).write_text(json.dumps(want))
    return info


def weight_files(folder: Path, sub: str) -> list[Path]:
    """The weight files of one component (`upscaler`: `folder` is the .pth itself)."""
    return [folder] if sub == UPSCALER else sorted((folder / sub).glob("*.safetensors"))


def stored_dtype(folder: Path, sub: str) -> str:
    """The dtype the component's weights are saved in (the one they are loaded and used in)."""
    if sub == UPSCALER:
        return "float32"
    from safetensors import safe_open

    with safe_open(str(weight_files(folder, sub)[0]), framework="pt") as f:
        return _DTYPES[f.get_slice(next(iter(f.keys()))).get_dtype()]


# ---- one load, in a fresh process --------------------------------------------------------------------------
def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    return out


class PeakSampler:
    """Resets the kernel's peak-RSS mark, then samples private and file-backed resident memory until stopped."""

    def __init__(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.base = _status_kib()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            for key, value in _status_kib().items():
                self.peak[key] = max(self.peak[key], value)

    def stop(self) -> dict[str, float]:
        """MB above the start: the exact peak (VmHWM) and the sampled peaks of private and mapped-file memory."""
        self._stop.set()
        self._thread.join()
        end = _status_kib()
        mb = {key: (max(self.peak[key], end[key]) - self.base[key]) / 1024 for key in ("RssAnon", "RssFile")}
        return {"peak_rss_mb": (end["VmHWM"] - self.base["VmRSS"]) / 1024, "peak_anon_mb": mb["RssAnon"],
                "peak_file_mb": mb["RssFile"], "rss_after_mb": (end["VmRSS"] - self.base["VmRSS"]) / 1024}


def _digest(state: dict[str, Any], keys: list[str] | None = None) -> str:
    """sha256 over the names and bytes of `keys` (default: every tensor) of a state dict."""
    import torch

    h = hashlib.sha256()
    for key in sorted(keys if keys is not None else state):
        h.update(key.encode())
        h.update(state[key].detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _bytes_mb(model: Any) -> float:
    """MB of the model's parameters and buffers as loaded (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values()) / 2**20


def child(way: str, folder: Path, sub: str, device: str, dtype_name: str) -> dict[str, Any]:
    """Load one component one way and measure it (the body of `--child`)."""
    import diffusers  # noqa: F401 - imported before the baseline: the load's memory, not the libraries'
    import spandrel
    import torch
    import transformers  # noqa: F401

    from latentforge.devkit import real_sizes
    from latentforge.preprocess.model_load import load_pretrained
    from latentforge.preprocess.upscale import Upscaler

    dev, dtype = torch.device(device), getattr(torch, dtype_name)
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # the CUDA context is in the baseline
    cls = None if sub == UPSCALER else real_sizes.model_class("sdxl", sub)  # diffusers imports it lazily: before too
    sampler = PeakSampler()
    t = time.perf_counter()
    if cls is None:
        model = (spandrel.ModelLoader(device=dev).load_from_file(str(folder)).model.to(dtype) if way == "old"
                 else Upscaler(folder, device=dev, dtype=dtype)._sr.model)
    else:
        model = (cls.from_pretrained(str(folder), subfolder=sub, dtype=dtype).to(dev) if way == "old"
                 else load_pretrained(cls, str(folder), dev, dtype, subfolder=sub))
    with torch.no_grad():
        for x in [*model.parameters(), *model.buffers()]:
            x.sum()  # every weight read once: on the CPU, mapped file pages become resident as in use
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    load_s = time.perf_counter() - t
    mem = sampler.stop()
    state = model.state_dict()
    out = {"way": way, "component": sub, "device": device, "dtype": dtype_name, "load_s": round(load_s, 2),
           **{k: round(v, 1) for k, v in mem.items()}, "model_mb": round(_bytes_mb(model), 1),
           "weights_digest": _digest(state), "on_device": all(p.device == dev for p in model.parameters()),
           "dtypes": sorted({str(p.dtype).split(".")[-1] for p in model.parameters()})}
    if sub != UPSCALER:
        from safetensors.torch import load_file

        saved: dict[str, Any] = {}
        for path in weight_files(folder, sub):
            saved.update({k: v.to(dtype) for k, v in load_file(str(path)).items()})
        out["equals_saved"] = set(saved) <= set(state) and _digest(state, list(saved)) == _digest(saved)
    return out


# ---- the comparison ----------------------------------------------------------------------------------------
def measure(folder: Path, components: tuple[str, ...], device: str, upscaler: Path | None = None,
            timeout_s: float = 600.0, dtypes: tuple[str, ...] = ("stored",)) -> list[dict[str, Any]]:
    """Every component loaded both ways in each of `dtypes` ("stored": the file's), each load in its own
    process; one record per (component, dtype, way)."""
    records = []
    for sub in [*components, *([UPSCALER] if upscaler is not None else [])]:
        src = upscaler if sub == UPSCALER else folder
        assert src is not None
        file_mb = sum(p.stat().st_size for p in weight_files(src, sub)) / 2**20
        stored = stored_dtype(src, sub)
        for dtype in dict.fromkeys(stored if d == "stored" else d for d in dtypes):
            for way in WAYS:
                cmd = [sys.executable, "-m", "bench.load_memory", "--child", way, str(src), sub, device, dtype]
                run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
                found = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
                if run.returncode != 0 or not found:
                    raise RuntimeError(f"{' '.join(cmd)} exited {run.returncode}: {run.stderr[-2000:]}")
                records.append(annotate(json.loads(found[-1]), stored, file_mb))
    return records


def annotate(rec: dict[str, Any], stored: str, file_mb: float) -> dict[str, Any]:
    """A child's record with its case name ("vae float32 (from float16)"), the file's MB and the ratios."""
    what = " (stored)" if rec["dtype"] == stored else f" (from {stored})"
    return {**rec, "case": f"{rec['component']} {rec['dtype']}{what}", "file_mb": round(file_mb, 1),
            "peak_per_model": round(rec["peak_rss_mb"] / rec["model_mb"], 3),
            "private_per_model": round(rec["peak_anon_mb"] / rec["model_mb"], 3)}


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case (component and dtype): file and model MB, each way's peaks (MB and x the model's bytes), and
    whether both ways loaded exactly the file's weights."""
    out: dict[str, Any] = {}
    for rec in records:
        c = out.setdefault(rec["case"], {"component": rec["component"], "file_mb": rec["file_mb"],
                                         "model_mb": rec["model_mb"]})
        c[rec["way"]] = {k: rec[k] for k in ("peak_rss_mb", "peak_per_model", "peak_anon_mb", "private_per_model",
                                             "peak_file_mb", "load_s", "on_device")}
        c.setdefault("digests", set()).add(rec["weights_digest"])
        c["equals_saved"] = c.get("equals_saved", True) and rec.get("equals_saved", True)
    for c in out.values():
        c["same_weights_both_ways"] = len(c.pop("digests")) == 1
    return out


def report(per: dict[str, Any], device: str) -> str:
    """One line per case: old and new peak host MB, x the model's bytes, and the private (anonymous) part."""
    lines = [f"host memory while loading onto {device}: peak RSS above the baseline, x = / the loaded model's bytes, "
             "private = anonymous memory (the rest is mapped file pages, shared by a node's ranks)"]
    for case, c in per.items():
        o, n = c["old"], c["new"]
        lines.append(f"  {case:<34} model {c['model_mb']:>6.0f} MB  old {o['peak_rss_mb']:>6.0f} MB {o['peak_per_model']:.2f}x "
                     f"(private {o['peak_anon_mb']:.0f})  new {n['peak_rss_mb']:>6.0f} MB {n['peak_per_model']:.2f}x "
                     f"(private {n['peak_anon_mb']:.0f})  weights equal: {c['equals_saved'] and c['same_weights_both_ways']}")
    return "\n".join(lines)


def gpu_check_phase(model: Path, upscaler: Path | None, device: str, timeout_s: float,
                    components: tuple[str, ...] = SDXL_ENCODERS) -> dict[str, Any]:
    """`bench.gpu_check`'s load_memory phase: its SDXL folder's encoders (and Real-ESRGAN file) both ways, in
    float32, the dtype its cache job computes in (`cache.vae_dtype` / `text_dtype`)."""
    records = measure(model, components, device, upscaler, timeout_s, dtypes=("float32",))
    return {"device": device, "per_case": summary(records), "records": records}


def headline(phase: dict[str, Any]) -> dict[str, Any] | None:
    """Case -> the loaded model's MB and the peak host MB (all, and private) while loading it, old and new way
    (None: the phase did not run)."""
    if phase.get("status") != "ok":
        return None
    return {case: {"model_mb": c["model_mb"], **{f"{way}_{what}": c[way][key] for way in WAYS
                                                 for what, key in (("mb", "peak_rss_mb"), ("private_mb", "peak_anon_mb"))}}
            for case, c in phase["per_case"].items()}


def headline_lines(figures: dict[str, Any] | None) -> list[str]:
    """`headline`'s figures as one report line (none when the phase did not run)."""
    if not figures:
        return []
    return ["  peak host MB loading onto the GPU, old -> new (private old -> new; model MB): " + ", ".join(
        f"{k} {v['old_mb']:.0f} -> {v['new_mb']:.0f} ({v['old_private_mb']:.0f} -> {v['new_private_mb']:.0f}; "
        f"{v['model_mb']:.0f})" for k, v in figures.items())]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        way, src, sub, device, dtype = argv[1:6]
        print("RESULT " + json.dumps(child(way, Path(src), sub, device, dtype)), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.load_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--components", default=",".join(SDXL_ENCODERS))
    p.add_argument("--dtypes", default="stored,float32", help="dtypes to load in; stored: the file's")
    p.add_argument("--tiny", action="store_true", help="the devkit's tiny SDXL: checks the script, measures nothing")
    p.add_argument("--upscaler", type=Path, default=None, help="also a spandrel .pth (e.g. RealESRGAN_x4plus.pth)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/load_memory.json)")
    args = p.parse_args(argv)
    work = (args.workdir or default_workdir() / "load_memory").absolute()
    components = tuple(c for c in args.components.split(",") if c)
    t = time.perf_counter()
    if args.tiny:
        from latentforge.devkit.tiny_models import build_tiny_pipeline

        folder, built = build_tiny_pipeline("sdxl", work / "tiny-sdxl"), {"tiny": True}
    else:
        folder = work / "sdxl-encoders-fp16"
        built = write_sdxl_encoders(folder, components)
    records = measure(folder, components, args.device, args.upscaler, dtypes=tuple(args.dtypes.split(",")))
    per = summary(records)
    doc = {"name": "load_memory", "date": now_iso(), "device": args.device, "tiny": args.tiny, "folder": str(folder),
           "built": built, "machine": machine_info(work), "per_case": per, "records": records,
           "seconds": round(time.perf_counter() - t, 1)}
    save_json(doc, args.out or RESULTS_DIR / "load_memory.json")
    print(report(per, args.device))
    return 0 if all(c["equals_saved"] and c["same_weights_both_ways"] for c in per.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
