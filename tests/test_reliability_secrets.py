"""Guarantee 6: with S3 credentials in the environment, a cache job and a training run against an
S3-compatible server (input tars and the cache on s3://, the run's outputs local) never write the secret
anywhere: not in stdout/stderr/logging, not in any object of the cache, not in the checkpoints, the
TensorBoard events or the validation images. Also proves the cache works end to end on an object
store: the cache on s3 equals the same cache made on a local disk. See docs/reliability.md."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from reliability_support import CLI, DEMO, FP32_ZERO2, Job, assert_same_cache, child_env, snapshot

SECRET = "lf-reliability-SECRET-wJalrXUtnFEMI-9f8e7d6c5b4a"
KEY_ID = "AKIDLFRELIABILITY0001"


@pytest.fixture
def s3_server(monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    for name, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield "http://{}:{}".format(*server.get_host_and_port())
    finally:
        server.stop()


def duplicate_of_first_sample(shard: Path) -> bytes:
    """A tar whose one sample reuses the key of the first sample of `shard` with another image."""
    with tarfile.open(shard) as tar:
        first = tar.getmembers()[0].name.split(".")[0]
        caption = tar.extractfile(f"{first}.txt").read()
        image = tar.extractfile(tar.getmembers()[3]).read()  # the second sample's image
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in ((f"{first}.jpg", image), (f"{first}.txt", caption)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.slow
def test_secret_never_leaves_the_environment(s3_server, tiny_sdxl, demo_data, small_cache, tmp_path):
    import s3fs

    endpoint = s3_server
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("data")
    fs.mkdir("caches")
    shards = sorted((demo_data / "webdataset").glob("0000[0-1].tar"))  # two shards: moto is slow to write to
    for shard in shards:
        fs.pipe(f"data/wds/{shard.name}", shard.read_bytes())
    fs.pipe("data/wds/zz-dup.tar", duplicate_of_first_sample(shards[0]))  # exercises a group rewrite on s3

    opts = f"{{endpoint_url: '{endpoint}'}}"
    cache_url = "s3://caches/sdxl"
    out = tmp_path / "run"
    # The trainer lists the same source: it takes each cache group's settings (repeats) from its source.
    common = [f"model.pretrained={tiny_sdxl}", f"cache.path={cache_url}", f"cache.storage_options={opts}",
              f"train.output_dir={out}",
              f"data.sources=[{{type: webdataset, path: 's3://data/wds/*.tar', storage_options: {opts}}}]",
              "data.validation_prompts=[a cat]"]  # one prompt (cached, then rendered): a grid at half the cost
    env = child_env(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    env.pop("AWS_PROFILE", None)

    cache_job = Job([str(CLI), "cache", "--config", str(DEMO), *common, "cache.latent_mode=dist"],
                    tmp_path / "cache-log", env)
    assert cache_job.wait() == 0, cache_job.stderr[-3000:]
    train_job = Job([str(CLI), "train", "--config", str(DEMO), *common, "train.max_steps=2", "train.checkpoint_every=2",
                     "train.validation_every=2", "train.validation_inference_steps=2", "train.log_every=1",
                     "train.num_workers=1", "train.held_out_fraction=0.2", FP32_ZERO2],
                    tmp_path / "train-log", env)
    assert train_job.wait() == 0, train_job.stderr[-3000:]

    # The cache on s3 is the local cache of the same inputs (the duplicate sample dropped, counted).
    on_s3 = snapshot(cache_url, {"endpoint_url": endpoint})
    keys = {m.name.split(".")[0] for shard in shards for m in tarfile.open(shard).getmembers()}
    local = {k: v for k, v in snapshot(small_cache).items() if k.removesuffix("#flip") in keys}
    assert len(local) == len(keys) > 0
    assert_same_cache(on_s3, local, "s3 cache vs local cache")
    summary = json.loads(fs.cat_file("caches/sdxl/summary.json"))
    assert summary["skip_reasons"] == {"duplicate_key": 1} and summary["groups"] == 3

    # Everything written, everywhere, and everything printed.
    texts: dict[str, bytes] = {"cache stdout": cache_job.stdout.encode(), "cache stderr": cache_job.stderr.encode(),
                               "train stdout": train_job.stdout.encode(), "train stderr": train_job.stderr.encode()}
    objects = fs.find("caches")
    assert len(objects) > 30
    for key in objects:
        texts[f"s3://{key}"] = fs.cat_file(key)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in written) and any(p.suffix == ".png" for p in written)
    assert any(p.name == "trainer_state.json" for p in written)
    for path in written:
        texts[str(path)] = path.read_bytes()
    assert b"s3://caches/sdxl" in texts[str(next(p for p in written if p.name == "trainer_state.json"))]
    leaks = [where for where, data in texts.items() if SECRET.encode() in data or KEY_ID.encode() in data]
    assert not leaks, f"credentials found in: {leaks}"


def test_object_store_listings_see_what_other_writers_committed(s3_server):
    """Another rank (here: another filesystem instance) commits a group after this process listed the
    cache: the next listing must show it (s3fs caches listings per instance)."""
    import s3fs

    from latentforge.shared.storage import Storage

    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir("listing")
    mine = Storage("s3://listing/cache", {"endpoint_url": s3_server})
    mine.write_text_atomic("shards/g0/commit.json", "{}")
    assert mine.listdir("shards") == ["g0"] and not mine.exists("shards/g1/commit.json")
    other = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    other.pipe("listing/cache/shards/g1/commit.json", b"{}")
    assert mine.listdir("shards") == ["g0", "g1"] and mine.exists("shards/g1/commit.json")
    assert set(mine.file_sizes("shards")) == {"g0/commit.json", "g1/commit.json"}
