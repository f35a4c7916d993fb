"""Run evaluation offline: each metric against its library's own function on the same inputs (tiny backbones
built here), the one-line missing-weights error, and a tiny run with `train.eval_every` plus `latentforge
evaluate` on its output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import soak

from latentforge.devkit.tiny_eval import TinyInception, eval_overrides, write_tiny_backbones
from latentforge.train.evaluation import backbones as bb
from latentforge.train.evaluation import scores
from latentforge.train.evaluation.weights import MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
DEVICE = torch.device("cpu")


class Pick(torch.nn.Module):
    """One output of the tiny Inception, as a torchmetrics feature extractor."""

    def __init__(self, net: torch.nn.Module, index: int, num_features: int) -> None:
        super().__init__()
        self.net, self.index, self.num_features = net, index, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[self.index].double()


def images(n: int, seed: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory) -> dict[str, str]:
    """A tiny CLIP folder, a tiny open_clip config with an HPS-style checkpoint, a random SqueezeNet file."""
    root = tmp_path_factory.mktemp("eval-backbones")
    return {**write_tiny_backbones(root), "root": str(root)}


def test_fid_kid_is_equal_torchmetrics_fed_the_images_and_fid_equals_a_hand_computation():
    from scipy import linalg
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    net = TinyInception()
    real, fake = images(12, 0), images(10, 1, size=40)
    ref_pool, _ = scores.inception_features(real, net, 5, DEVICE)
    pool, logits = scores.inception_features(fake, net, 4, DEVICE)

    lib = FrechetInceptionDistance(feature=Pick(net, 0, 8))
    lib.update(scores.to_tensor(real), real=True)
    lib.update(scores.to_tensor(fake), real=False)
    assert scores.fid(ref_pool, pool) == pytest.approx(float(lib.compute()), rel=1e-6)
    mu1, mu2 = ref_pool.mean(0).numpy(), pool.mean(0).numpy()
    s1, s2 = np.cov(ref_pool.numpy(), rowvar=False), np.cov(pool.numpy(), rowvar=False)
    hand = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert scores.fid(ref_pool, pool) == pytest.approx(hand, rel=1e-4)

    lib_kid = KernelInceptionDistance(feature=Pick(net, 0, 8), subsets=100, subset_size=10)
    lib_kid.update(scores.to_tensor(real), real=True)
    lib_kid.update(scores.to_tensor(fake), real=False)
    torch.manual_seed(scores.METRIC_SEED)
    np.testing.assert_allclose(scores.kid(ref_pool, pool), [float(v) for v in lib_kid.compute()], rtol=1e-6)

    lib_is = InceptionScore(feature=Pick(net, 1, 5), splits=10)
    lib_is.update(scores.to_tensor(fake))
    state = torch.get_rng_state()
    ours = scores.inception_score(logits)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG is left as it was
    torch.manual_seed(scores.METRIC_SEED)
    np.testing.assert_allclose(ours, [float(v) for v in lib_is.compute()], rtol=1e-6)


def test_clip_score_equals_torchmetrics_functional(tiny_backbones):
    from torchmetrics.functional.multimodal import clip_score

    model, processor = bb.clip(tiny_backbones["clip"])
    imgs, texts = images(3, 2), ["a red car", "a dog on grass", "a photo of a cat"]
    ours = scores.clip_score(imgs, texts, (model, processor), 2, DEVICE)
    lib = clip_score(scores.to_tensor(imgs), texts, lambda: (model, processor))
    assert ours == pytest.approx(float(lib), rel=1e-5)
    with torch.no_grad():  # by hand: 100 * max(cos, 0) of CLIP's projected embeddings, averaged
        pixels = processor(images=list(scores.to_tensor(imgs)), return_tensors="pt")["pixel_values"]
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        img = model.model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.model.get_text_features(**tokens).pooler_output
    hand = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0).mean()
    assert ours == pytest.approx(float(hand), rel=1e-4, abs=1e-4)


def test_hps_is_100_times_the_cosine_of_the_open_clip_features(tiny_backbones):
    from PIL import Image

    hps = bb.hps(tiny_backbones["hps_model"], tiny_backbones["hps"])
    imgs, texts = images(3, 3, size=48), ["a red car", "a dog", "a cat"]
    with torch.no_grad():
        x = torch.stack([hps.preprocess(Image.fromarray(a)) for a in imgs])
        img = torch.nn.functional.normalize(hps.model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(hps.model.encode_text(hps.tokenizer(texts)), dim=-1)
    hand = 100 * float((img * txt).sum(-1).mean())
    assert scores.hps_score(imgs, texts, hps, 2, DEVICE) == pytest.approx(hand, rel=1e-5)


def test_lpips_diversity_equals_torchmetrics_lpips_on_the_same_pairs(tiny_backbones, monkeypatch):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    net = bb.lpips_net("squeeze", tiny_backbones["lpips"])
    groups = [images(3, 4), images(2, 5)]
    ours = scores.lpips_diversity(groups, net, DEVICE)
    # torchmetrics finds the same backbone file in the torch hub cache, so both nets hold the same weights.
    hub = Path(tiny_backbones["root"]) / "hub"
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    (hub / "checkpoints" / Path(tiny_backbones["lpips"]).name).write_bytes(Path(tiny_backbones["lpips"]).read_bytes())
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        lib = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    finally:
        torch.hub.set_dir(old)
    per_group = []
    for g in groups:
        x = scores.to_tensor(g).float() / 127.5 - 1
        pairs = [(i, j) for i in range(len(g)) for j in range(i + 1, len(g))]
        per_group.append(np.mean([float(lib(x[i:i + 1], x[j:j + 1])) for i, j in pairs]))
    assert ours == pytest.approx(float(np.mean(per_group)), rel=1e-5)
    assert scores.lpips_diversity([images(1, 6)], net, DEVICE) is None


def test_missing_weights_offline_is_one_line_naming_the_key_and_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        cases = [(lambda: bb.inception.__wrapped__(None), "train.eval.inception_weights", "torch-fidelity/releases"),
                 (lambda: bb.hps.__wrapped__("ViT-H-14", None), "train.eval.hps_checkpoint", "xswu/HPSv2"),
                 (lambda: bb.clip.__wrapped__("openai/clip-vit-large-patch14"), "train.eval.clip_model",
                  "openai/clip-vit-large-patch14"),
                 (lambda: bb.lpips_net.__wrapped__("alex", None), "train.eval.lpips_weights", "alexnet-owt"),
                 (lambda: bb.inception.__wrapped__(str(tmp_path / "nope.pth")), "train.eval.inception_weights", "nope")]
        for load, key, source in cases:
            with pytest.raises(MissingWeightsError) as err:
                load()
            text = str(err.value)
            assert "\n" not in text and key in text and source in text, text
    finally:
        torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def eval_run(unet_only_model, small_cache, tiny_backbones, tmp_path_factory) -> Path:
    """A 2-step tiny SDXL run (fp32, as `evaluate` loads checkpoints) evaluated at every step."""
    from latentforge.shared.config import load_config
    from latentforge.train.trainer import Trainer

    out = tmp_path_factory.mktemp("eval-run") / "run"
    settings = [*eval_overrides(tiny_backbones), "train.eval.num_images=3", "train.eval.seeds_per_prompt=2",
                "train.eval.steps=1", "train.eval.batch_size=4"]
    args = [f"model.pretrained={unet_only_model}", f"cache.path={small_cache}", f"train.output_dir={out}",
            "train.num_workers=0", "train.validation_every=0", "train.held_out_fraction=0.3", "train.micro_batch_size=2",
            "train.max_steps=2", "train.eval_every=1", "train.checkpoint_every=2",
            "deepspeed={zero_optimization: {stage: 0}, bf16: {enabled: false}}", *settings]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bb, "inception", lambda local: TinyInception())  # torch-fidelity's net is 100 MB
        Trainer(load_config(DEMO, args)).train()
    return out


def test_eval_every_writes_a_file_per_step_tensorboard_scalars_and_the_run_summary(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for step in (1, 2):
        doc = json.loads((eval_run / "eval" / f"{step}.json").read_text())
        assert doc["step"] == step and not doc["skipped"], doc["skipped"]
        assert set(doc["metrics"]) == {"fid", "kid", "kid_std", "is", "is_std", "clip_score", "lpips_diversity", "hps"}
        assert doc["images"] == {"held_out_generated": 3, "reference": 3, "prompt_images": 4}
        assert all(np.isfinite(v) for v in doc["metrics"].values())
    summary = json.loads((eval_run / "run_summary.json").read_text())
    assert summary["eval"]["metrics"] == json.loads((eval_run / "eval" / "2.json").read_text())["metrics"]
    tags = EventAccumulator(str(eval_run / "tensorboard")).Reload().Tags()["scalars"]
    assert {"eval/fid", "eval/kid", "eval/is", "eval/clip_score", "eval/hps", "eval/lpips_diversity"} <= set(tags)


def test_evaluate_command_reproduces_the_run_figures_and_says_what_it_skips(eval_run, monkeypatch, capsys, tmp_path):
    import shutil

    from latentforge.app.cli import main as cli_main

    monkeypatch.setattr(bb, "inception", lambda local: TinyInception())
    during = json.loads((eval_run / "eval" / "2.json").read_text())["metrics"]
    eval_run = Path(shutil.copytree(eval_run, tmp_path / "run"))  # the fixture's files stay as training left them
    # The same images (same seeds, same weights) give the same figures.
    assert cli_main(["evaluate", str(eval_run)]) == 0
    again = json.loads((eval_run / "eval" / "2.json").read_text())
    np.testing.assert_allclose([again["metrics"][k] for k in during], list(during.values()), rtol=1e-4, atol=1e-9)
    assert json.loads((eval_run / "run_summary.json").read_text())["eval"]["metrics"] == again["metrics"]
    assert "evaluate: step 2: fid" in capsys.readouterr().out
    # No held-out split: FID and KID say why instead of a number.
    assert cli_main(["evaluate", str(eval_run), "train.held_out_fraction=0", "train.eval.metrics=[fid, clip]"]) == 0
    doc = json.loads((eval_run / "eval" / "2.json").read_text())
    assert "held_out_fraction" in doc["skipped"]["fid"] and set(doc["metrics"]) == {"clip_score"}
    assert "fid skipped" in capsys.readouterr().out
    # Missing weights: one line and exit 2, before any image is made.
    assert cli_main(["evaluate", str(eval_run), f"train.eval.hps_checkpoint={tmp_path / 'nope.pt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentforge evaluate: train.eval.hps_checkpoint=") and "\n" not in err, err


@soak  # ~15-20 s of two processes on 2 cores: kept out of `make test`'s budget; `make soak` runs it
def test_two_process_evaluate_splits_generation_and_scores_the_same(eval_run, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(eval_run, run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    wanted = "train.eval.metrics=[clip, hps, lpips]"  # the backbones the run's config points at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "latentforge.app.cli", "evaluate", str(run), wanted]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads((run / "eval" / "2.json").read_text())
    assert two["world_size"] == 2 and two["images"] == {"held_out_generated": 3, "reference": 3, "prompt_images": 4}
    one = json.loads((eval_run / "eval" / "2.json").read_text())["metrics"]
    # 1e-3: the ranks run on one thread each (OMP_NUM_THREADS=1), so sums add up in another order.
    np.testing.assert_allclose([two["metrics"][k] for k in ("clip_score", "hps", "lpips_diversity")],
                               [one[k] for k in ("clip_score", "hps", "lpips_diversity")], rtol=1e-3, atol=1e-9)


def test_the_real_inception_from_a_local_file_gives_the_features_of_torchmetrics_fid(tmp_path, monkeypatch):
    """torch-fidelity's InceptionV3 with random weights written to a file (the real ones are 100 MB and
    offline here): one pass gives the pool features torchmetrics' FID extracts, and IS's 1008 logits."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
    from torchmetrics.image.fid import NoTrainInceptionV3

    with monkeypatch.context() as mp:  # build the network without any weights, then save its random ones
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        random_net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), weights)
    fake = images(2, 8, size=48)
    pool, logits = scores.inception_features(fake, bb.inception.__wrapped__(str(weights)), 2, DEVICE)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    # What FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=...) extracts.
    lib = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights))
    torch.testing.assert_close(pool, lib(scores.to_tensor(fake)).double(), rtol=1e-5, atol=1e-5)
