"""Stable Cascade Stage C ControlNet, on CPU with the tiny cascade (devkit/tiny_cascade.py): the injection against
the original's loop (Stability-AI/StableCascade `modules/stage_c.py`, written out here without hooks), the
released file layout, and cache (canny) -> 2 DeepSpeed steps (prior frozen, EMA, caption dropout, held-out
loss and grid) -> resume -> export -> `load_cascade_controlnet` gives the trained network back."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import (
    SDCascadeAttnBlock,
    SDCascadeResBlock,
    SDCascadeTimestepBlock,
)
from test_stable_cascade import _config

from latentforge.devkit.tiny_cascade import CONTROLNET_BACKBONE_NAME, TINY_CONTROLNET_BACKBONE
from latentforge.devkit.tiny_models import build_tiny_pipeline
from latentforge.shared.config import ConfigError
from latentforge.train.cascade_controlnet import (
    RELEASE_BLOCKS,
    CascadeControlNet,
    cascade_control_input,
    load_cascade_controlnet,
)
from latentforge.train.cascade_controlnet_adapter import CascadeControlNetDenoiser, res_blocks
from latentforge.train.control_images import MASKED


# ---- the injection, against the original's loop ---------------------------------------------------------
def _prior() -> StableCascadeUNet:
    """Two levels at different sizes (switch_level), 6 ResBlocks: down 1 + 2, up 2 + 1."""
    torch.manual_seed(0)
    return StableCascadeUNet(in_channels=16, out_channels=16, conditioning_dim=32, block_out_channels=(32, 32),
                             num_attention_heads=(2, 2), down_num_layers_per_block=(1, 2), up_num_layers_per_block=(2, 1),
                             switch_level=(True,), clip_image_in_channels=8, clip_text_in_channels=16,
                             clip_text_pooled_in_channels=16, dropout=(0.0, 0.0)).eval()


def _original(prior: StableCascadeUNet, x, r, pooled, text, img, cnet: list) -> torch.Tensor:
    """`StageC.forward` with `cnet` (modules/stage_c.py), on diffusers' blocks: the features are handed out one
    per ResBlock call (ControlNetDeliverer) and added, interpolated, before the block."""
    queue = iter(cnet + [None] * 100)
    r_embed = prior.get_timestep_ratio_embedding(r)
    for _ in prior.config.timestep_conditioning_type:
        r_embed = torch.cat([r_embed, prior.get_timestep_ratio_embedding(torch.zeros_like(r))], dim=1)
    clip = prior.get_clip_embeddings(clip_txt_pooled=pooled, clip_txt=text, clip_img=img)

    def add(h):
        c = next(queue)
        return h if c is None else h + F.interpolate(c, size=h.shape[-2:], mode="bilinear", align_corners=True)

    def run(block, h, skip=None):
        if isinstance(block, SDCascadeResBlock):
            return block(add(h), skip) if skip is not None else block(add(h))
        if isinstance(block, SDCascadeAttnBlock):
            return block(h, clip)
        assert isinstance(block, SDCascadeTimestepBlock)
        return block(h, r_embed)

    h, levels = prior.embedding(x), []
    for blocks, downscaler in zip(prior.down_blocks, prior.down_downscalers, strict=True):
        h = downscaler(h)
        for block in blocks:
            h = run(block, h)
        levels.insert(0, h)
    h = levels[0]
    for i, (blocks, upscaler) in enumerate(zip(prior.up_blocks, prior.up_upscalers, strict=True)):
        for k, block in enumerate(blocks):
            skip = levels[i] if k == 0 and i > 0 and isinstance(block, SDCascadeResBlock) else None
            if skip is not None and h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h.float(), skip.shape[-2:], mode="bilinear", align_corners=True)
            h = run(block, h, skip)
        h = upscaler(h)
    return prior.clf(h)


def _inputs():
    g = torch.Generator().manual_seed(1)
    cond = {"clip_text": torch.randn(2, 5, 16, generator=g), "clip_text_pooled": torch.randn(2, 1, 16, generator=g),
            "controlnet_cond": torch.rand(2, 1, 64, 64, generator=g)}  # features 2x2; latents 8x8 and 4x4
    return torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g), cond


def test_injection_adds_interpolated_features_exactly_at_the_chosen_blocks():
    prior = _prior()
    assert len(res_blocks(prior)) == 6
    torch.manual_seed(2)
    controlnet = CascadeControlNet(1, 32, [0, 2, 3, 5], TINY_CONTROLNET_BACKBONE)
    for projection in controlnet.projections:  # nonzero outputs, so every injection shows
        torch.nn.init.normal_(projection[-1].weight, std=0.5)
    model = CascadeControlNetDenoiser(controlnet, prior)
    x, r, cond = _inputs()
    scale = 300.0  # train.controlnet.conditioning_scale; the random tiny backbone's features are ~1e-4
    with torch.no_grad():
        got = model(x, r, cond, scale)
        features = [None if f is None else f * scale for f in controlnet(cond["controlnet_cond"])]
        assert [f is None for f in features] == [False, True, False, False, True, False]
        img = torch.zeros(2, 1, 8)
        want = _original(prior, x, r, cond["clip_text_pooled"], cond["clip_text"], img, features)
        alone = _original(prior, x, r, cond["clip_text_pooled"], cond["clip_text"], img, [])
        shifted = _original(prior, x, r, cond["clip_text_pooled"], cond["clip_text"], img, [None, *features])
        plain = prior(x, timestep_ratio=r, clip_text_pooled=cond["clip_text_pooled"], clip_text=cond["clip_text"],
                      clip_img=img).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(plain, alone)  # the reference loop is diffusers' forward when given no features
    assert (got - alone).abs().max() > 1e-2 and (got - shifted).abs().max() > 1e-2
    with torch.no_grad():  # the validation path: the pipeline calls the prior itself, inside `controlled`
        with model.controlled(cond["controlnet_cond"], scale):
            inside = prior(x, timestep_ratio=r, clip_text_pooled=cond["clip_text_pooled"], clip_text=cond["clip_text"],
                           clip_img=img).sample
        after = prior(x, timestep_ratio=r, clip_text_pooled=cond["clip_text_pooled"], clip_text=cond["clip_text"],
                      clip_img=img).sample
    assert torch.allclose(inside, want, atol=1e-5) and torch.allclose(after, plain)

    # Gradient checkpointing recomputes the prior's blocks in backward: the ControlNet gets the same gradient.
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        prior.enable_gradient_checkpointing() if checkpointing else prior.disable_gradient_checkpointing()
        controlnet.zero_grad()
        model(x, r, cond, scale).square().mean().backward()
        return [p.grad.clone() for p in controlnet.parameters()]

    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(False), grads(True), strict=True))
    assert all(not p.requires_grad for p in prior.parameters())
    model.remove_hooks()
    assert not any(b._forward_pre_hooks for b in res_blocks(prior))


def test_wrong_blocks_are_one_line_errors():
    with pytest.raises(ConfigError, match="6 is past the prior's 6 ResBlocks") as err:
        CascadeControlNetDenoiser(CascadeControlNet(1, 32, [0, 6], TINY_CONTROLNET_BACKBONE), _prior())
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="ResBlock 0 is 32 channels wide, the ControlNet projects to 48"):
        CascadeControlNetDenoiser(CascadeControlNet(1, 48, [0], TINY_CONTROLNET_BACKBONE), _prior())


def test_control_inputs_are_the_original_filters():
    shared = torch.rand(2, 3, 8, 8)
    assert torch.equal(cascade_control_input("canny", shared), shared[:, :1])  # CannyFilter: one channel
    masked = shared.clone()
    masked[:, :, :4] = MASKED
    out = cascade_control_input("inpaint", masked)  # InpaintFilter: image with holes at 1, then the mask
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out[:, 3, :4], torch.ones(2, 4, 8)) and torch.equal(out[:, 3, 4:], torch.zeros(2, 4, 8))
    assert torch.equal(out[:, :3, :4], torch.ones(2, 3, 4, 8)) and torch.equal(out[:, :3, 4:], shared[:, :, 4:])


# ---- the released file layout ---------------------------------------------------------------------------
def test_released_layout():
    """stabilityai/stable-cascade controlnet/canny.safetensors: backbone.* (V2-S, 1 input channel, unpadded first
    conv) + projections.{i}.{0,2}.weight, 8 of them; built on the meta device at real size."""
    with torch.device("meta"):
        real = CascadeControlNet(1, 2048)
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert shapes["backbone.0.0.weight"] == (24, 1, 3, 3) and real.backbone[0][0].padding == (0, 0)
    assert {k for k in shapes if k.startswith("projections.")} == {
        f"projections.{i}.{j}.weight" for i in range(8) for j in (0, 2)}
    assert shapes["projections.7.0.weight"] == (1280, 1280, 1, 1) and shapes["projections.7.2.weight"] == (2048, 1280, 1, 1)
    assert real.proj_blocks == list(RELEASE_BLOCKS)
    # Parameters by hand: torchvision's V2-S features with a 1-channel first conv, plus 8 x (1280^2 + 1280 x 2048).
    import torchvision

    with torch.device("meta"):
        features = sum(p.numel() for p in torchvision.models.efficientnet_v2_s().features.parameters())
    assert sum(p.numel() for p in real.parameters()) == features - 24 * 2 * 9 + 8 * (1280 * 1280 + 1280 * 2048)
    assert sum(p.numel() for p in real.parameters()) == 54_255_776  # 1.5 % of the 3.6B prior (docs/training.md)


class _OriginalControlNet(torch.nn.Module):
    """Stability-AI/StableCascade modules/controlnet.py `ControlNet.__init__` with `bottleneck_mode='effnet'`, as
    written there but without downloading the ImageNet weights (the module structure is the released files')."""

    def __init__(self, c_in=3, c_proj=2048, proj_blocks=None):
        import torchvision
        from torch import nn

        super().__init__()
        self.proj_blocks = proj_blocks
        embd_channels = 1280
        self.backbone = torchvision.models.efficientnet_v2_s().features.eval()
        if c_in != 3:
            in_weights = self.backbone[0][0].weight.data
            self.backbone[0][0] = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)
            if c_in > 3:
                nn.init.constant_(self.backbone[0][0].weight, 0)
                self.backbone[0][0].weight.data[:, :3] = in_weights[:, :3].clone()
            else:
                self.backbone[0][0].weight.data = in_weights[:, :c_in].clone()
        self.projections = nn.ModuleList()
        for _ in range(len(proj_blocks)):
            self.projections.append(nn.Sequential(
                nn.Conv2d(embd_channels, embd_channels, kernel_size=1, bias=False),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(embd_channels, c_proj, kernel_size=1, bias=False),
            ))

    def forward(self, x):
        x = self.backbone(x)
        proj_outputs = [None for _ in range(max(self.proj_blocks) + 1)]
        for i, idx in enumerate(self.proj_blocks):
            proj_outputs[idx] = self.projections[i](x)
        return proj_outputs


@pytest.mark.parametrize("c_in", [1, 3, 4])
def test_the_state_dict_is_the_original_classes(c_in):
    """Real size on the meta device: every key, shape and dtype of the original class's state dict, and no other."""
    with torch.device("meta"):
        original = _OriginalControlNet(c_in, 2048, list(RELEASE_BLOCKS)).state_dict()
        ours = CascadeControlNet(c_in, 2048).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in original.items()}


def test_an_original_state_dict_at_real_size_loads_strictly_and_computes_the_same(tmp_path):
    """The original class at real size (random weights, canny's 1 channel) saved as a released file: the loader
    builds it from the file alone (release blocks, V2-S) and gives the original's outputs."""
    from safetensors.torch import save_file

    torch.manual_seed(4)
    original = _OriginalControlNet(1, 2048, list(RELEASE_BLOCKS)).eval()
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(tmp_path / "canny.safetensors"))
    loaded = load_cascade_controlnet(tmp_path / "canny.safetensors")
    x = torch.rand(1, 1, 96, 64)
    with torch.no_grad():
        want, got = original(x), loaded(x)
    assert [f is None for f in got] == [f is None for f in want] and got[63].shape == (1, 2048, 3, 2)
    assert all(torch.equal(got[i], want[i]) for i in RELEASE_BLOCKS)


def test_a_released_layout_file_loads_strictly_and_a_wrong_one_is_refused(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    made = CascadeControlNet(4, 32, RELEASE_BLOCKS, TINY_CONTROLNET_BACKBONE)  # inpainting: 4 channels
    for projection in made.projections:
        torch.nn.init.normal_(projection[-1].weight)
    state = {k: v for k, v in made.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "inpainting.safetensors"))
    loaded = load_cascade_controlnet(tmp_path / "inpainting.safetensors", backbone=TINY_CONTROLNET_BACKBONE)
    assert (loaded.c_in, loaded.c_proj, loaded.proj_blocks) == (4, 32, list(RELEASE_BLOCKS))
    x = torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        want, got = made.eval()(x), loaded(x)
    assert [i for i, f in enumerate(got) if f is not None] == list(RELEASE_BLOCKS)
    assert all(torch.equal(want[i], got[i]) for i in RELEASE_BLOCKS)
    del state["projections.3.2.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="1 missing, 0 unexpected") as err:
        load_cascade_controlnet(tmp_path / "broken.safetensors", backbone=TINY_CONTROLNET_BACKBONE)
    assert "\n" not in str(err.value)
    save_file({"backbone.0.weight": torch.zeros(1)}, str(tmp_path / "sr.safetensors"))  # the 'large' bottleneck
    with pytest.raises(ValueError, match="not a Stable Cascade ControlNet with the effnet bottleneck"):
        load_cascade_controlnet(tmp_path / "sr.safetensors")


# ---- cache -> train -> resume -> export -> load ---------------------------------------------------------------
ZERO3 = ("deepspeed={zero_optimization: {stage: 3}, bf16: {enabled: true}}",)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "extra"), [("canny", ("train.gradient_checkpointing=true", "cache.conditioning.canny_resize=224")),
                                           ("inpaint", ZERO3)])
def test_cascade_controlnet_cache_train_resume_export_load(kind, extra, demo_data, tmp_path):
    """ZeRO-2 with canny (as CannyFilter(resize=224)) and gradient checkpointing (the module's weights checked),
    ZeRO-3 with inpainting (4-channel control input)."""
    from PIL import Image

    from latentforge.preprocess.job import run_cache
    from latentforge.train.export import export_pipeline
    from latentforge.train.grid_labels import CAPTION_H
    from latentforge.train.trainer import Trainer

    model = build_tiny_pipeline("stable_cascade", tmp_path / "tiny-stable-cascade")
    config = _config(model, demo_data, tmp_path, f"cache.conditioning.kind={kind}", "train.controlnet.enabled=true",
                     f"train.controlnet.backbone_config={model / CONTROLNET_BACKBONE_NAME}",
                     "train.controlnet.blocks=[0, 1, 3]", "train.caption_dropout=0.5", "train.lr=1e-3",
                     "train.ema.enabled=true", "train.backup_every=0", "train.keep_last=2",
                     "train.checkpoint_every=1", "train.max_steps=3", "train.validation_every=3", *extra)
    assert run_cache(config) == 0
    prior_before = StableCascadeUNet.from_pretrained(model, subfolder="prior").state_dict()

    def with_train(**kw):
        return config.model_copy(update={"train": config.train.model_copy(update=kw)})

    first = Trainer(with_train(max_steps=2))
    trainable = {n for n, p in first.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controlnet.") for n in trainable)  # the prior stays frozen
    sharded = extra == ZERO3  # under ZeRO-3 the module holds only this rank's slices: the exports are checked below
    controlnet_before = {k: v.clone() for k, v in first.engine.module.controlnet.state_dict().items()}
    first.train()
    assert len(first.history) == 2 and all(np.isfinite(first.history))
    if not sharded:
        _check_weights(first.engine.module, prior_before, controlnet_before)

    second = Trainer(with_train(resume="latest"))  # resumes at step 2 and trains step 3, validating there
    assert second.step == 2
    second.train()
    assert second.step == 3 and np.isfinite(second.history).all()
    val = [json.loads(line) for line in (tmp_path / "run" / "val_log.jsonl").read_text().splitlines()]
    assert val[-1]["step"] == 3 and np.isfinite(val[-1]["val_loss"])
    grid = Image.open(tmp_path / "run" / "validation" / "step-00000003.png")
    # Rows base (the prior alone, no control image), current and ema, the control image above each controlled output.
    assert grid.size[1] == (CAPTION_H + 256) + 2 * (CAPTION_H + 2 * 256)

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    out = export_pipeline(checkpoint, tmp_path / "export", dtype="fp32")
    described = json.loads((out / "controlnet_config.json").read_text())
    channels, name = {"canny": (1, "CannyFilter"), "inpaint": (4, "InpaintFilter")}[kind]
    assert described["proj_blocks"] == [0, 1, 3] and described["c_in"] == channels and described["filter"] == name
    loaded = load_cascade_controlnet(out)  # the documented loader: a fresh network, strict
    step2 = load_cascade_controlnet(export_pipeline(checkpoint.with_name("step-00000002"), tmp_path / "e2", dtype="fp32"))
    before = step2.state_dict()
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("projections.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    assert all(loaded.projections[i][2].weight.abs().max() > 0 for i in range(3))  # they started at zero
    ema = load_cascade_controlnet(export_pipeline(checkpoint, tmp_path / "export-ema", dtype="fp32", use_ema=True))
    assert ema.proj_blocks == [0, 1, 3]
    if sharded:
        return
    trained = second.engine.module.controlnet
    control = torch.rand(1, channels, 256, 256)
    with torch.no_grad():
        want = [f.float() for f in trained.eval()(control.to(second.dtype)) if f is not None]
        got = [f for f in loaded(control) if f is not None]
    # bf16 training: the export holds the fp32 masters, within bf16 rounding of the module's weights.
    assert all(torch.allclose(a, b, atol=2e-2, rtol=2e-2) for a, b in zip(got, want, strict=True))
    _sample_with(loaded, model, control)


def _sample_with(controlnet, model, control):
    """The documented sampling recipe (docs/training.md): the prior pipeline, its prior steered inside `controlled`."""
    import diffusers

    pipe = diffusers.StableCascadePriorPipeline.from_pretrained(model).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    denoiser = CascadeControlNetDenoiser(controlnet, pipe.prior)
    with denoiser.controlled(control):
        out = pipe("a cat on a chair", num_inference_steps=2, height=256, width=256, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).image_embeddings
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def _check_weights(module, prior_before, controlnet_before):
    """The prior's weights are those it loaded; the ControlNet's changed, BatchNorm statistics aside."""
    prior_after = module.prior.state_dict()
    assert all(torch.equal(prior_before[k].to(prior_after[k].dtype), prior_after[k]) for k in prior_before)
    changed = [k for k, v in module.controlnet.state_dict().items() if not torch.equal(v, controlnet_before[k])]
    assert any(k.startswith("projections.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    assert all("running_" not in k for k in changed)  # the backbone's BatchNorm stays in eval mode


def test_pretrained_file_starts_the_run_and_a_misfit_is_one_line(tmp_path):
    """train.controlnet.pretrained: a released-layout file with the run's blocks; another input width is refused."""
    from safetensors.torch import save_file

    from latentforge.shared.config import load_config
    from latentforge.train.cascade_controlnet_adapter import build_controlnet

    made = CascadeControlNet(1, 32, [0, 2, 5], TINY_CONTROLNET_BACKBONE)
    save_file(dict(made.state_dict()), str(tmp_path / "canny.safetensors"))
    backbone = tmp_path / "backbone.json"
    backbone.write_text(json.dumps(TINY_CONTROLNET_BACKBONE))

    def config(*extra):
        return load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
            "model.family=stable_cascade", "train.controlnet.enabled=true", f"train.controlnet.backbone_config={backbone}",
            f"train.controlnet.pretrained={tmp_path / 'canny.safetensors'}", *extra])

    built = build_controlnet(config("train.controlnet.blocks=[0, 2, 5]"), "canny", _prior())
    assert built.proj_blocks == [0, 2, 5] and all(torch.equal(v, made.state_dict()[k]) for k, v in built.state_dict().items())
    with pytest.raises(ConfigError, match="takes 1 input channels; the inpaint control gives 4") as err:
        build_controlnet(config("train.controlnet.blocks=[0, 2, 5]"), "inpaint", _prior())
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="3 projections; name the blocks they feed"):
        build_controlnet(config(), "canny", _prior())


@pytest.mark.parametrize("blocks", ["[]", "[1, 1]", "[-1]"])
def test_bad_blocks_are_one_line_config_errors(blocks):
    from latentforge.shared.config import load_config

    with pytest.raises(ConfigError, match="train.controlnet: blocks") as err:
        load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [f"train.controlnet.blocks={blocks}"])
    assert "\n" not in str(err.value)


def test_a_hub_file_that_cannot_be_fetched_is_one_line_naming_the_key(monkeypatch):
    """`train.controlnet.pretrained: owner/repo/path.safetensors`: whatever the hub client raises (a missing
    file is not an OSError, nor is a dropped connection) becomes one config error line."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from latentforge.shared.config import ConfigError
    from latentforge.train.cascade_controlnet_adapter import build_controlnet

    def missing(repo_id: str, filename: str, **_: object) -> str:
        raise EntryNotFoundError(f"404 Client Error.\n\nEntry Not Found for url: https://huggingface.co/{repo_id}/{filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    config = SimpleNamespace(train=SimpleNamespace(controlnet=SimpleNamespace(
        pretrained="stabilityai/stable-cascade/controlnet/nope.safetensors", backbone_config=None, blocks=None)))
    with pytest.raises(ConfigError) as info:
        build_controlnet(config, "canny", SimpleNamespace(config=SimpleNamespace(block_out_channels=[32])))
    msg = str(info.value)
    assert msg.startswith("config error: train.controlnet.pretrained: stabilityai/stable-cascade/controlnet/nope"
                          ".safetensors: cannot fetch it from the hub (EntryNotFoundError: 404") and "\n" not in msg
