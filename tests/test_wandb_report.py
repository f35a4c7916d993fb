"""wandb beside TensorBoard, in wandb's offline mode: the logged losses, the resumed run's id, no key, no network.

The offline run file (`run-<id>.wandb`) is read back with a small reader of its format (LevelDB's log
format behind a 7-byte W&B header, records that are `wandb_internal_pb2.Record` protobufs): wandb 0.31
keeps its own reader in the Go core and ships no Python one.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_train import logged_losses, run_in_process, train_args

MARKER = "fakekey0deadbeef18b0marker0123456789abcd"  # a WANDB_API_KEY no file may ever contain
BLOCK, HEADER = 32768, 7


def records(path: Path) -> Iterator[object]:
    """The protobuf records of a `.wandb` file (checksums not checked)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:HEADER]
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        parts += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def history(path: Path) -> tuple[str, list[dict[str, object]]]:
    """(run id, history rows as {key: value}) of one offline run file."""
    rid, rows = "", []
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            rid = r.run.run_id
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rid, rows


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, silent, every folder of its own under tmp_path, and a proxy that must see no request."""
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / f"wandb-{name.lower()}"))
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                        ("WANDB_API_KEY", MARKER), ("NO_PROXY", ""), ("no_proxy", "")):
        monkeypatch.setenv(name, value)
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(4)
    proxy.setblocking(False)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.getsockname()[1]}")
    yield tmp_path / "wandb-dir", proxy
    proxy.close()
    import wandb

    wandb.teardown()  # stops wandb's service process


def test_offline_run_logs_the_losses_continues_on_resume_and_holds_no_key(unet_only_model, small_cache, tmp_path,
                                                                         offline_wandb):
    wandb_dir, proxy = offline_wandb
    out = tmp_path / "run"
    common = ("train.report_to=[tensorboard,wandb]", "train.wandb.project=lf-test", "train.checkpoint_every=2",
              "train.wandb.tags=[tiny]")
    import wandb

    for extra in (("train.max_steps=2",), ("train.max_steps=4", "train.resume=latest")):
        run_in_process(train_args(unet_only_model, small_cache, out, *extra, *common))
        wandb.teardown()  # as a process exit would: the service flushes the run file and stops

    rid = json.loads((out / "wandb_run.json").read_text())["id"]
    files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one per process, both of the same run
    logged: dict[int, float] = {}
    for f in files:
        got_id, rows = history(f)
        assert got_id == rid
        logged.update({int(r["step"]): float(r["train/loss"]) for r in rows if "train/loss" in r})
    assert logged == logged_losses(out)  # the same numbers as train_log.jsonl, steps 1-4
    assert sorted(logged) == [1, 2, 3, 4]

    with pytest.raises(BlockingIOError):
        proxy.accept()  # offline: nothing went out (not even through the proxy wandb-core would use)
    for folder in (out, tmp_path / "wandb-dir", tmp_path / "wandb-config_dir", tmp_path / "wandb-cache_dir",
                   tmp_path / "wandb-data_dir"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert MARKER.encode() not in path.read_bytes(), path


def test_a_key_in_the_config_or_a_missing_wandb_is_one_line(tmp_path, monkeypatch):
    import sys

    from latentforge.shared.config import ConfigError, load_config
    from latentforge.train.metrics import open_metrics

    with pytest.raises(ConfigError, match=r"train\.wandb\.api_key: the wandb API key must come from WANDB_API_KEY"):
        load_config(Path("configs/demo.yaml"), [f"train.wandb.api_key={MARKER}"])
    with pytest.raises(ConfigError, match="entity looks like an API key") as err:
        load_config(Path("configs/demo.yaml"), [f"train.wandb.entity={MARKER}"])
    assert MARKER not in str(err.value)
    config = load_config(Path("configs/demo.yaml"), ["train.report_to=[wandb]", f"train.output_dir={tmp_path}"])
    # Online without a key (no WANDB_API_KEY, an empty home without .netrc): wandb.init refuses, in one line.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in (("HOME", tmp_path), ("WANDB_MODE", "online"), ("WANDB_SILENT", "true"),
                        ("WANDB_CONFIG_DIR", tmp_path / "c"), ("WANDB_CACHE_DIR", tmp_path / "cc"),
                        ("WANDB_DATA_DIR", tmp_path / "d"), ("WANDB_DIR", tmp_path / "w")):
        monkeypatch.setenv(name, str(value))
    import wandb

    try:
        with pytest.raises(ConfigError, match=r"^config error: train\.report_to: wandb could not start \(No API key"):
            open_metrics(config, tmp_path, True)
    finally:
        wandb.teardown()
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(ConfigError, match=r"^config error: train\.report_to: wandb is not installed") as err:
        open_metrics(config, tmp_path, True)
    assert "\n" not in str(err.value)


def test_metrics_send_the_same_figures_to_tensorboard_and_wandb(tmp_path, offline_wandb):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from latentforge.shared.config import load_config
    from latentforge.train.metrics import open_metrics

    wandb_dir, _ = offline_wandb
    config = load_config(Path("configs/demo.yaml"), [
        "train.report_to=[tensorboard, wandb]", f"train.output_dir={tmp_path / 'out'}",
        "cache.path=https://host/cache?X-Amz-Signature=sigmarker18b"])  # a presigned URL: redacted for wandb
    metrics = open_metrics(config, tmp_path / "out", True)
    grid = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    metrics.flush_window(1, {"train/loss": 0.5})
    metrics.scalar("eval/fid", 12.5, 2)
    metrics.image("val/images", grid, 2)
    metrics.text("val/prompts", "a <cat> | a dog", 2)
    metrics.hparams({"lr": 1e-4, "family": "sdxl"}, {"final/loss": 0.25})
    metrics.close()
    import wandb

    wandb.teardown()

    tb = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    tb.Reload()
    assert [e.value for e in tb.Scalars("train/loss")] == [0.5] and [e.step for e in tb.Scalars("eval/fid")] == [2]
    assert tb.Tags()["images"] == ["val/images"]
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    _, rows = history(path)
    assert [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r] == [(1, 0.5)]
    assert [(r["step"], r["eval/fid"]) for r in rows if "eval/fid" in r] == [(2, 12.5)]
    image = next(r for r in rows if "val/images/path" in r)
    assert (image["step"], image["val/images/width"], image["val/images/height"]) == (2, 48, 32)
    assert any("val/prompts/path" in r for r in rows)
    assert all("perf/samples_per_s" in r for r in rows if "train/loss" in r)  # the whole window, as in TensorBoard
    config_items, summary = {}, {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = r.run.config.update if kind == "run" else r.config.update
            config_items.update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
    assert config_items["train"]["report_to"] == ["tensorboard", "wandb"]
    assert config_items["hparams"]["family"] == "sdxl" and summary["final/loss"] == 0.25
    assert "sigmarker18b" not in path.read_bytes().decode("latin-1")  # the redacted snapshot, not the config
