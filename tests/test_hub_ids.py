"""Hub ids: `model.pretrained: org/name` (with `revision`, `variant`, a separate `model.vae`) loads from a
Hugging Face cache laid out as the hub client lays it out, offline, through cache, train, export and
inspect; the fingerprint records the commit the revision resolved to, so a moved branch re-caches.

The hub cache is built by hand from tiny local pipelines: `blobs/` named by sha256 (weights, as LFS
stores them) or git blob sha1 (small files), `snapshots/<commit>/` of relative symlinks to the blobs, and
`refs/<branch>` holding a commit. The CLI runs in child processes whose environment points `HF_HOME`
there (the hub client reads it at import) with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from reliability_support import DEMO, FP32_ZERO2, child_env, run_cli

from latentforge.shared.cache_fingerprint import (
    FP_MODEL,
    MODEL_COMMIT,
    MODEL_FILES,
    MODEL_HUB_ID,
    MODEL_REVISION,
    MODEL_TEXT,
    MODEL_VAE,
    MODEL_VARIANT,
)

HUB_ID, VAE_ID = "testorg/tiny-sdxl", "testorg/tiny-vae"
# Fake commits, as the hub names them: 40 hex digits.
MAIN, FP16, MAIN_MOVED, VAE_MAIN = (hashlib.sha1(name.encode()).hexdigest() for name in
                                    ("main", "fp16", "main-moved", "vae-main"))


# ---- a hub cache, by hand ---------------------------------------------------------------------------------
def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(hub: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Put `folder` into the hub cache `hub` as commit `commit` of `repo_id`, each ref in `refs` naming it."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        name = hashlib.sha256(data).hexdigest() if src.suffix in (".safetensors", ".bin") else _git_blob_sha1(data)
        blob = repo / "blobs" / name
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def fp16_variant(folder: Path, out: Path) -> Path:
    """A copy of pipeline `folder` whose weights exist only as the fp16 variant (`*.fp16.safetensors`),
    as on a hub repo's fp16 branch: loading it without `variant: fp16` fails."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    for path in sorted(out.rglob("*.safetensors")):
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(state, path.with_name(f"{path.stem}.fp16.safetensors"), metadata={"format": "pt"})
        path.unlink()
    return out


@pytest.fixture(scope="module")
def hf_home(tiny_sdxl, tmp_path_factory) -> Path:
    """HF_HOME with testorg/tiny-sdxl (main: the tiny pipeline; fp16: another seed, fp16 variant only) and
    testorg/tiny-vae (main: that other seed's VAE alone)."""
    from latentforge.devkit.tiny_models import build_tiny_pipeline

    work = tmp_path_factory.mktemp("hub-models")
    other = build_tiny_pipeline("sdxl", work / "seed1", seed=1)
    home = work / "hf-home"
    add_snapshot(home / "hub", HUB_ID, tiny_sdxl, MAIN, ("main",))
    add_snapshot(home / "hub", HUB_ID, fp16_variant(other, work / "fp16"), FP16, ("fp16",))
    add_snapshot(home / "hub", VAE_ID, other / "vae", VAE_MAIN, ("main",))
    return home


def hub_env(home: Path) -> dict[str, str]:
    return child_env(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1")


def run_args(demo_data: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    """Overrides both stages share: one demo tar, no upscaling, small buckets, the hub model (plus `extra`)."""
    # 128-pixel buckets and one validation prompt: what comes from the hub is the same at a quarter of the pixels
    # (cached, trained and rendered) and with a grid of one prompt.
    return [f"model.pretrained={HUB_ID}", f"data.sources=[{{type: webdataset, path: '{demo_data}/webdataset/00000.tar'}}]",
            f"cache.path={cache}", f"train.output_dir={out}", "upscale.enabled=false", "buckets.resolutions=[128]",
            "data.validation_prompts=[a cat]", *extra]


def cache_json(cache: Path) -> dict:
    return json.loads((cache / "cache.json").read_text())


def run_ok(args: list[str], log: Path, home: Path) -> str:
    rc, out, err = run_cli(args, log, hub_env(home))
    assert rc == 0, f"{args[0]} exited {rc}:\n{err[-3000:]}"
    return out


@pytest.fixture(scope="module")
def main_cache(hf_home, demo_data, tmp_path_factory) -> Path:
    """The demo tar cached from testorg/tiny-sdxl at its main branch."""
    work = tmp_path_factory.mktemp("hub-main")
    run_ok(["cache", "--config", str(DEMO), *run_args(demo_data, work / "cache", work / "run")], work / "log", hf_home)
    return work / "cache"


# ---- the tests --------------------------------------------------------------------------------------------
def test_sources_resolve_offline_to_commits(hf_home, tiny_sdxl, monkeypatch):
    """The resolution itself, in process: branch -> commit, a commit stays, a folder is absolute, an unknown
    revision is one config-error line; the local-folder identity is unchanged (no hub keys)."""
    from huggingface_hub import constants

    from latentforge.preprocess.encoders import model_identity
    from latentforge.preprocess.model_source import resolve_model_sources, resolve_source
    from latentforge.shared.config import ConfigError, load_config
    from latentforge.shared.preflight import model_source_problem

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    assert resolve_source(HUB_ID, None, "model_index.json", "model.pretrained").commit == MAIN
    assert resolve_source(HUB_ID, "fp16", "model_index.json", "model.pretrained").commit == FP16
    assert resolve_source(HUB_ID, FP16, "model_index.json", "model.pretrained").commit == FP16
    with pytest.raises(ConfigError) as exc:
        resolve_source(HUB_ID, "nope", "model_index.json", "model.pretrained")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("config error: model.pretrained: cannot resolve "
                                                                    "revision 'nope' of hub model 'testorg/tiny-sdxl'")
    assert model_source_problem(HUB_ID, marker="model_index.json", revision="fp16") is None
    assert "HF_HUB_OFFLINE" in model_source_problem(HUB_ID, marker="model_index.json", revision="nope")

    config = load_config(DEMO, [f"model.pretrained={HUB_ID}", "model.revision=fp16", "model.variant=fp16",
                                f"model.vae={VAE_ID}"])
    sources = resolve_model_sources(config)
    ident = model_identity(config, sources)
    assert ident[MODEL_TEXT] == {MODEL_HUB_ID: HUB_ID, MODEL_REVISION: "fp16", MODEL_COMMIT: FP16, MODEL_VARIANT: "fp16"}
    # A separate VAE is another repo: its own default branch, no pipeline variant.
    assert ident[MODEL_VAE] == {MODEL_HUB_ID: VAE_ID, MODEL_REVISION: "main", MODEL_COMMIT: VAE_MAIN, MODEL_VARIANT: None}

    local = load_config(DEMO, [f"model.pretrained={tiny_sdxl}"])
    resolved = resolve_model_sources(local)
    assert resolved.pretrained.folder == str(tiny_sdxl) and resolved.location() == {
        "pretrained": {"path": str(tiny_sdxl)}, "vae": None}
    ident = model_identity(local, resolved)
    assert ident == model_identity(local) and {k: set(v) for k, v in ident.items()} == {
        MODEL_TEXT: {MODEL_FILES}, MODEL_VAE: {MODEL_FILES}}


@pytest.mark.slow
def test_cache_train_export_inspect_from_a_hub_id_offline(hf_home, main_cache, demo_data, tiny_sdxl, tmp_path):
    spec = cache_json(main_cache)
    part = {MODEL_HUB_ID: HUB_ID, MODEL_REVISION: "main", MODEL_COMMIT: MAIN, MODEL_VARIANT: None}
    assert spec["fingerprint_inputs"][FP_MODEL] == {MODEL_TEXT: part, MODEL_VAE: part}
    assert spec["model_location"] == {"pretrained": {MODEL_HUB_ID: HUB_ID, MODEL_REVISION: "main", MODEL_COMMIT: MAIN},
                                      "vae": None}

    run = tmp_path / "run"
    run_ok(["train", "--config", str(DEMO), *run_args(demo_data, main_cache, run), "train.max_steps=2",
            "train.checkpoint_every=2", "train.validation_every=2", "train.validation_inference_steps=1",
            "train.held_out_fraction=0.25", "train.num_workers=0", FP32_ZERO2], tmp_path / "train", hf_home)
    assert (run / "validation" / "step-00000002.png").is_file()  # the VAE and scheduler came from the hub id

    export = tmp_path / "export"
    run_ok(["export", str(run), "--out", str(export)], tmp_path / "export-log", hf_home)
    assert json.loads((export / "latentforge_export.json").read_text())["base"] == HUB_ID
    from safetensors.torch import load_file

    exported = load_file(export / "vae" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_sdxl / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], v.half()) for k, v in base.items())  # the base's VAE, from the snapshot

    out = run_ok(["inspect", str(main_cache), "--out", str(tmp_path / "inspect"), "--per-bucket", "1"],
                 tmp_path / "inspect-log", hf_home)
    assert f"VAE from the cache's model {HUB_ID}@{MAIN[:12]}" in out
    assert list((tmp_path / "inspect").glob("grid-*.png"))


@pytest.mark.slow
def test_revision_variant_and_separate_vae_select_their_commits(hf_home, main_cache, demo_data, tmp_path):
    """revision fp16 + variant fp16 load the fp16 branch's weights (they exist nowhere else); the separate
    VAE repo has neither that branch nor variant files, so it loads at its own main."""
    from latentforge.shared.cache_reader import CacheReader

    cache = tmp_path / "cache"
    args = run_args(demo_data, cache, tmp_path / "run", "model.revision=fp16", "model.variant=fp16",
                    f"model.vae={VAE_ID}")
    run_ok(["cache", "--config", str(DEMO), *args], tmp_path / "cache-log", hf_home)
    spec = cache_json(cache)
    ident = spec["fingerprint_inputs"][FP_MODEL]
    assert ident[MODEL_TEXT] == {MODEL_HUB_ID: HUB_ID, MODEL_REVISION: "fp16", MODEL_COMMIT: FP16, MODEL_VARIANT: "fp16"}
    assert ident[MODEL_VAE] == {MODEL_HUB_ID: VAE_ID, MODEL_REVISION: "main", MODEL_COMMIT: VAE_MAIN, MODEL_VARIANT: None}
    assert spec["model_location"]["vae"] == {MODEL_HUB_ID: VAE_ID, MODEL_REVISION: "main", MODEL_COMMIT: VAE_MAIN}
    assert spec["fingerprint"] != cache_json(main_cache)["fingerprint"]

    # Other weights, other tensors: the text encoders of the fp16 commit, the VAE of the other repo.
    readers = [CacheReader(str(c)) for c in (main_cache, cache)]
    try:
        (_, _, main_embeds), (_, _, fp16_embeds) = (r.prompts() for r in readers)
        assert not torch.equal(main_embeds["prompt_embeds"], fp16_embeds["prompt_embeds"])
        bucket = max(readers[0].bucket_counts().items(), key=lambda kv: kv[1])[0]
        a, b = (r.read_rows(bucket, [0], fields=["key", "latent_mean"]) for r in readers)
        assert a["key"] == b["key"] and not torch.equal(a["latent_mean"], b["latent_mean"])
    finally:
        for r in readers:
            r.close()

    # The trainer loads the UNet of the fp16 commit (variant files only), accepts the cache, and its
    # validation scheduler comes from that commit too.
    run = tmp_path / "run"
    run_ok(["train", "--config", str(DEMO), *args, "train.max_steps=2", "train.checkpoint_every=2",
            "train.validation_every=2", "train.validation_inference_steps=1", "train.held_out_fraction=0",
            "train.num_workers=0", FP32_ZERO2], tmp_path / "train-log", hf_home)
    assert (run / "validation" / "step-00000002.png").is_file()

    # Export takes the other components from the run's revision and variant (they exist only there).
    export = tmp_path / "export"
    run_ok(["export", str(run), "--out", str(export)], tmp_path / "export-log", hf_home)
    info = json.loads((export / "latentforge_export.json").read_text())
    assert (info["base"], info["revision"], info["variant"]) == (HUB_ID, "fp16", "fp16")
    single = tmp_path / "single.safetensors"
    run_ok(["export", str(run), "--single-file", "--with-vae", "--out", str(single)], tmp_path / "single-log", hf_home)
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        meta = json.loads(f.metadata()["latentforge.export"])
        assert (meta["base"], meta["revision"]) == (HUB_ID, "fp16") and any(k.startswith("first_stage_model.")
                                                                             for k in f.keys())


@pytest.mark.slow
def test_moved_branch_recaches(hf_home, main_cache, tiny_sdxl, demo_data, tmp_path):
    home = Path(shutil.copytree(hf_home, tmp_path / "hf-home", symlinks=True))  # refs/main moves in the copy
    cache = Path(shutil.copytree(main_cache, tmp_path / "cache"))  # these args cached at main: no second job
    args = ["cache", "--config", str(DEMO), *run_args(demo_data, cache, tmp_path / "run")]
    before = cache_json(cache)
    assert before["fingerprint_inputs"][FP_MODEL][MODEL_TEXT][MODEL_COMMIT] == MAIN

    add_snapshot(home / "hub", HUB_ID, tiny_sdxl, MAIN_MOVED, ("main",))  # a new commit on main
    # The trainer sees main now names another commit than the cache's, and names the commit to pin.
    train = ["train", "--config", str(DEMO), *run_args(demo_data, cache, tmp_path / "run"), "train.max_steps=1",
             "train.num_workers=0", FP32_ZERO2]
    rc, _, err = run_cli(train, tmp_path / "stale", hub_env(home))
    assert rc != 0 and f"was cached at commit {MAIN}" in err and f"model.revision={MAIN}" in err, err[-2000:]
    run_ok([*train, f"model.revision={MAIN}", "train.checkpoint_every=100", "train.validation_every=0",
            "train.held_out_fraction=0"], tmp_path / "pinned", home)

    run_ok(args, tmp_path / "moved", home)
    after = cache_json(cache)
    assert after["fingerprint_inputs"][FP_MODEL][MODEL_TEXT][MODEL_COMMIT] == MAIN_MOVED
    assert after["model_location"]["pretrained"][MODEL_COMMIT] == MAIN_MOVED
    assert after["fingerprint"] != before["fingerprint"]
    manifests = [json.loads(p.read_text()) for p in (cache / "shards").glob("*/commit.json")]
    assert manifests and all(m["fingerprint"] == after["fingerprint"] for m in manifests)  # re-cached
