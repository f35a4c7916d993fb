"""Evaluation cost: seconds per 100 images, generating (tiny SDXL) and scoring (tiny and real-size backbones).

    python -m bench.eval_cost [--workdir DIR] [--steps 4] [--seeds 25] [--real-backbones]

1. The tiny SDXL pipeline and the demo data, cached as the tests cache them; a trainer set up on that
   cache (fp32, half the samples held out) runs `Trainer.evaluate` twice (the first warms up) with tiny
   metric backbones (`devkit.tiny_eval`). Reported: generation seconds per 100 images (held-out and prompt
   images; each held-out image also decodes its reference) and scoring seconds per 100 images.
2. With --real-backbones, the forward time per image of the real-size backbone architectures with random
   weights (same FLOPs as the real weights): torchvision's InceptionV3 at 299 px (torch-fidelity's port
   has the same layers), open_clip ViT-H-14 (HPSv2.1) and ViT-L-14 (CLIP score's default) image towers at
   224 px. These stand in for the metric side of an SDXL evaluation; generation is estimated from the
   anchors (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(work: Path, steps: int, seeds: int) -> dict[str, Any]:
    """Two evaluations of the tiny SDXL model; the figures of the second (warm) one."""
    from latentforge.devkit.demo_data import write_demo_data
    from latentforge.devkit.tiny_eval import TinyInception, eval_overrides, write_tiny_backbones
    from latentforge.devkit.tiny_models import build_tiny_pipeline
    from latentforge.preprocess.job import run_cache
    from latentforge.shared.config import load_config
    from latentforge.train.evaluation import backbones
    from latentforge.train.trainer import Trainer

    demo = ROOT / "configs" / "demo.yaml"
    model = build_tiny_pipeline("sdxl", work / "tiny-sdxl")
    (work / "demo").mkdir(parents=True, exist_ok=True)
    if not (work / "demo" / "data").exists():
        write_demo_data(work / "demo" / "data")
    tars = next(s.path for s in load_config(demo).data.sources if s.type == "webdataset")
    base = [f"model.pretrained={model}", f"data.sources=[{{type: webdataset, path: '{tars}'}}]",
            f"cache.path={work / 'cache'}", f"train.output_dir={work / 'run'}"]
    cwd = os.getcwd()
    os.chdir(work)  # the demo's relative source path resolves here
    try:
        if not (work / "cache").exists():
            assert run_cache(load_config(demo, [*base, "cache.latent_mode=dist"])) == 0
        backbones.inception = lambda local: TinyInception()  # type: ignore[assignment]  # 100 MB otherwise
        config = load_config(demo, [
            *base, "train.num_workers=0", "train.held_out_fraction=0.5", "train.validation_every=0",
            "train.max_steps=1", "deepspeed={zero_optimization: {stage: 0}, bf16: {enabled: false}}",
            *eval_overrides(write_tiny_backbones(work / "backbones")), "train.eval.num_images=100",
            f"train.eval.seeds_per_prompt={seeds}", f"train.eval.steps={steps}"])
        trainer = Trainer(config)
        for _ in range(2):
            trainer.evaluate()
    finally:
        os.chdir(cwd)
    result = trainer.last_eval
    assert result is not None
    made = result["images"]["held_out_generated"] + result["images"]["prompt_images"]
    return {"images": result["images"], "steps": steps, "seconds": result["seconds"],
            "generate_s_per_100": round(100 * result["seconds"]["generate"] / made, 2),
            "score_s_per_100": round(100 * result["seconds"]["score"] / made, 2)}


@torch.no_grad()
def backbone_seconds(batch: int = 4, reps: int = 2) -> dict[str, float]:
    """Forward seconds per image of the real-size metric backbones (random weights), best of `reps`."""
    import open_clip
    import torchvision

    nets = {"inception_v3_299": (torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False), 299),
            "vit_h14_224 (HPSv2.1)": (open_clip.create_model("ViT-H-14", pretrained=None).visual, 224),
            "vit_l14_224 (CLIP-L)": (open_clip.create_model("ViT-L-14", pretrained=None).visual, 224)}
    out = {}
    for name, (net, size) in nets.items():
        x = torch.rand(batch, 3, size, size)
        net.eval()(x)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - t0)
        out[name] = round(best / batch, 3)
        del net
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    p.add_argument("--seeds", type=int, default=25, help="images per validation prompt")
    p.add_argument("--real-backbones", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="eval-cost-"))
    figures: dict[str, Any] = {"tiny_sdxl": tiny_run(work, args.steps, args.seeds), "threads": torch.get_num_threads(),
                               "load_avg": os.getloadavg()}
    if args.real_backbones:
        figures["real_backbone_s_per_image_cpu"] = backbone_seconds()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
