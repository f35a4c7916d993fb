"""Guarantee 7: disk full or permission denied on the cache path gives one clear line naming the path,
and never a corrupt committed group: what was committed before stays readable, the group being written
stays invisible (and its partial files are removed), and a re-run once there is room completes the
cache. Real ENOSPC on a small tmpfs and real EROFS on a read-only bind mount when this machine allows
mounts (root), plus injected ENOSPC/EACCES in the middle of a group everywhere. See docs/reliability.md."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import zarr.storage
from reliability_support import DEMO, Job, assert_same_cache, cache_command, child_env, snapshot

from latentforge.preprocess.job import run_cache
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config
from latentforge.shared.storage import Storage, StorageWriteError


def cache_args(model: Path, data: Path, cache: Path) -> list[str]:
    # The same settings as the session's small_cache, so a completed re-run can be compared with it.
    sources = f"data.sources=[{{type: webdataset, path: '{data}/webdataset/{{00000..00003}}.tar'}}]"
    return [f"model.pretrained={model}", sources, f"cache.path={cache}", "cache.latent_mode=dist",
            f"train.output_dir={cache.parent / 'run'}"]


def assert_committed_groups_are_whole(cache: Path) -> int:
    """Every visible group verifies (sizes + crc32) and every row reads; nothing is staged in .tmp."""
    reader = CacheReader(str(cache))
    assert reader.verify(checksums=True) == []
    for bucket, n in reader.bucket_counts().items():
        assert len(reader.read_rows(bucket, range(n))["key"]) == n
    staged = [p for p in (cache / "shards" / ".tmp").iterdir()] if (cache / "shards" / ".tmp").is_dir() else []
    assert staged == [], f"the failed group's partial files were left behind: {staged}"
    return len(reader.groups)


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path):
    where = tmp_path / "small-disk"
    where.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)):
        pytest.skip("cannot mount a tmpfs here (needs root): the injected-ENOSPC test covers disk full")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_disk_full_on_a_real_small_disk(small_tmpfs, tiny_sdxl, demo_data, small_cache, tmp_path):
    cache = small_tmpfs / "cache"
    job = Job(cache_command(1, cache_args(tiny_sdxl, demo_data, cache)), tmp_path / "log", child_env())
    rc = job.wait()
    err = job.stderr
    assert rc == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"latentforge cache: cannot write {cache}/") and "No space left on device [ENOSPC]" in last, last
    assert "Traceback" not in err
    committed = assert_committed_groups_are_whole(cache)
    assert committed < 4
    # Room again: the re-run completes, and gives the cache an uninterrupted run gives.
    assert _mount("-o", "remount,size=64m", str(small_tmpfs))
    assert run_cache(load_config(DEMO, cache_args(tiny_sdxl, demo_data, cache))) == 0
    assert_same_cache(snapshot(cache), snapshot(small_cache), "after the disk was enlarged")


def test_read_only_cache_location(tiny_sdxl, demo_data, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    if not (_mount("--bind", str(target), str(target)) and _mount("-o", "remount,ro,bind", str(target))):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
        pytest.skip("cannot make a read-only bind mount here (needs root)")
    try:
        with pytest.raises(StorageWriteError) as err:
            run_cache(load_config(DEMO, cache_args(tiny_sdxl, demo_data, target / "cache")))
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"cannot write {target}/cache") and "[EROFS]" in line, line
        assert not any(target.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
def test_write_error_in_the_middle_of_a_group(code, tiny_sdxl, demo_data, tmp_path, monkeypatch):
    """The store starts failing after a number of chunk writes (the second group, part written)."""
    cache = tmp_path / "cache"
    config = load_config(DEMO, cache_args(tiny_sdxl, demo_data, cache))
    real_set = zarr.storage.LocalStore.set
    calls = {"n": 0}

    real_write_bytes = Storage.write_bytes

    def count_and_maybe_fail(where: str) -> None:
        if "/shards/.tmp/" in where:
            calls["n"] += 1
            if calls["n"] > 150:
                raise OSError(code, f"injected {errno.errorcode[code]}")

    async def failing_set(self, key, value, *args, **kwargs):
        count_and_maybe_fail(str(self.root))
        return await real_set(self, key, value, *args, **kwargs)

    def failing_write_bytes(self, rel, data):  # the big fields' shard files bypass zarr-python
        count_and_maybe_fail(self.path(rel))
        return real_write_bytes(self, rel, data)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    monkeypatch.setattr(Storage, "write_bytes", failing_write_bytes)
    with pytest.raises(StorageWriteError) as err:
        run_cache(config)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"cannot write {cache}/shards/") and f"[{errno.errorcode[code]}]" in line
    monkeypatch.undo()
    assert 0 < assert_committed_groups_are_whole(cache) < 4
