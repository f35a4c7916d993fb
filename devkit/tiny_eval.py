"""Tiny, random evaluation backbones built in code, for offline tests and the evaluation cost bench.

The evaluation code loads them through the same config keys as the real ones (`train.eval.clip_model`, a
CLIP folder; `hps_model` + `hps_checkpoint`, an open_clip config .json and a checkpoint holding a
`state_dict` as HPS_v2.1_compressed.pt does; `lpips_weights`, a torchvision SqueezeNet file), except
InceptionV3: torch-fidelity's network has one fixed architecture (about 100 MB of weights), so tests
swap in `TinyInception`, which has its interface.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class TinyInception(torch.nn.Module):
    """Stands in for torch-fidelity's InceptionV3: uint8 (N, 3, H, W) of any size -> (pool features, logits)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.nn.functional.interpolate(x.float() / 255, size=(24, 24), mode="bilinear")
        pool = self.conv(x).relu().mean((2, 3))
        return pool, self.head(pool)


def write_tiny_backbones(root: Path) -> dict[str, str]:
    """Write a tiny CLIP folder, a tiny open_clip config with an HPS-style checkpoint and a random SqueezeNet
    file under `root`; returns the paths by role (clip, hps_model, hps, lpips)."""
    import open_clip
    import torchvision
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .clip_tokenizer import make_clip_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = make_clip_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                                  "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                  "pad_token_id": tok.pad_token_id},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(root / "clip")
    # open_clip's own BPE tokenizer (bundled with the package) has 49,408 tokens: the text tower keeps that.
    hps_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                               "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (root / "tiny-hps-vit.json").write_text(json.dumps(hps_cfg))
    open_clip.add_model_config(root / "tiny-hps-vit.json")
    torch.save({"state_dict": open_clip.create_model("tiny-hps-vit", pretrained=None).state_dict()}, root / "hps.pt")
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), root / "squeezenet1_1-b8a52dc0.pth")
    return {"clip": str(root / "clip"), "hps_model": str(root / "tiny-hps-vit.json"), "hps": str(root / "hps.pt"),
            "lpips": str(root / "squeezenet1_1-b8a52dc0.pth")}


def eval_overrides(paths: dict[str, str]) -> list[str]:
    """`train.eval.*` overrides pointing evaluation at the tiny backbones of `write_tiny_backbones`."""
    return [f"train.eval.clip_model={paths['clip']}", f"train.eval.hps_model={paths['hps_model']}",
            f"train.eval.hps_checkpoint={paths['hps']}", "train.eval.lpips_net=squeeze",
            f"train.eval.lpips_weights={paths['lpips']}"]
