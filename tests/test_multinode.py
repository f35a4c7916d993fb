"""Two nodes on loopback (issue 20): two launcher invocations with `--nnodes 2 --node_rank 0/1 --master_addr
127.0.0.1` and one process each, sharing this machine's file system as a cluster shares one.

- the cache job under torchrun equals the 1-process cache bitwise (`make soak`: four process starts; `make test`
  proves the same equality for two processes under one launcher in test_cache_job.py);
- the trainer under torchrun and under the `deepspeed` launcher (`--hostfile`, `--no_ssh --node_rank`)
  follows the 1-process loss trajectory at the same global batch, and a run checkpointed on 2 nodes
  continues on 1 (`make soak`: each launch costs about a minute of start-up on 2 CPU cores);
- a node killed mid-run: the cache job's re-run completes the cache exactly; the trainer on the
  surviving node exits within seconds with one line, and the run resumes from the last complete
  checkpoint (`make soak`).

The commands are the ones docs/caching.md and docs/training.md show.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_support import (
    DEMO,
    Job,
    assert_same_cache,
    child_env,
    committed_groups,
    snapshot,
    soak,
    wait_until,
)
from test_train import FP32_ZERO, logged_losses, run_in_process, train_args

from latentforge.preprocess.job import run_cache
from latentforge.shared.config import load_config

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
RTOL, ATOL = 2e-4, 1e-5  # the 2-process test's tolerance (tests/test_train.py): gradient summation order only
FLAT = ("train.lr_scheduler=constant", "train.warmup_steps=0")  # a shorter run is a true prefix
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_node(node: int, port: int, module: str, args: list[str]) -> list[str]:
    """`torchrun --nnodes 2 --node_rank N --nproc_per_node 1 --master_addr 127.0.0.1 --master_port P -m MODULE`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", module, "--config", str(DEMO), *args]


def deepspeed_node(node: int, port: int, hostfile: Path, args: list[str]) -> list[str]:
    """`deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P --module ...`."""
    return [str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "latentforge.train",
            "--config", str(DEMO), *args]


def start_nodes(commands: list[list[str]], log_dir: Path) -> list[Job]:
    # OMP_NUM_THREADS=1 as torchrun sets it for several processes; deepspeed's launcher does not.
    return [Job(cmd, log_dir / f"node{i}", child_env(OMP_NUM_THREADS="1")) for i, cmd in enumerate(commands)]


def finish(jobs: list[Job], timeout: float = 600) -> None:
    try:
        for i, job in enumerate(jobs):
            rc = job.wait(timeout)
            assert rc == 0, f"node {i} exited {rc}:\n{job.stderr[-4000:]}"
    finally:
        for job in jobs:
            job.kill_tree()


# ---- the cache job ------------------------------------------------------------------------------

def cache_args(tiny: Path, data: Path, cache: Path) -> list[str]:
    # Both demo sources (4 tars, the folder in shards of 8): 8 shards to share between the nodes.
    sources = (f"data.sources=[{{type: webdataset, path: '{data}/webdataset/{{00000..00003}}.tar'}}, "
               f"{{type: folder, path: '{data}/folder', caption_field: txt, shard_size: 8}}]")
    return [f"model.pretrained={tiny}", sources, f"cache.path={cache}", f"train.output_dir={cache.parent / 'run'}"]


@pytest.fixture(scope="module")
def one_process_cache(tiny_sdxl, demo_data, tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("one-process") / "cache"
    assert run_cache(load_config(DEMO, cache_args(tiny_sdxl, demo_data, cache))) == 0
    return snapshot(cache)


@soak
def test_cache_on_two_nodes_equals_the_one_process_cache(one_process_cache, tiny_sdxl, demo_data, tmp_path):
    cache = tmp_path / "cache"
    port = free_port()
    jobs = start_nodes([torchrun_node(n, port, "latentforge.preprocess", cache_args(tiny_sdxl, demo_data, cache))
                        for n in (0, 1)], tmp_path / "logs")
    finish(jobs)
    assert_same_cache(snapshot(cache), one_process_cache, "2 nodes vs 1 process")
    done = {}
    for job in jobs:
        for rank, count in re.findall(r"rank (\d+): (\d+) shards cached", job.stderr):
            done[int(rank)] = int(count)
    assert sorted(done) == [0, 1], done  # each node ran its rank
    assert sum(done.values()) == len(committed_groups(cache)) == 8, done  # the two ranks shared every shard


@soak
def test_cache_on_two_nodes_with_c10d_rendezvous_as_under_slurm(one_process_cache, tiny_sdxl, demo_data, tmp_path):
    """What configs/slurm-cache.sbatch runs on each node: torchrun with a c10d rendezvous, no node ranks."""
    cache = tmp_path / "cache"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "cache-test",
           "-m", "latentforge.preprocess", "--config", str(DEMO), *cache_args(tiny_sdxl, demo_data, cache)]
    finish(start_nodes([cmd, cmd], tmp_path / "logs"))
    assert_same_cache(snapshot(cache), one_process_cache, "2 nodes (c10d rendezvous) vs 1 process")


@soak
def test_cache_node_killed_mid_run_rerun_completes_exactly(one_process_cache, tiny_sdxl, demo_data, tmp_path):
    cache = tmp_path / "cache"
    args = cache_args(tiny_sdxl, demo_data, cache)
    port = free_port()
    jobs = start_nodes([torchrun_node(n, port, "latentforge.preprocess", args) for n in (0, 1)], tmp_path / "killed")
    try:
        wait_until(lambda: len(committed_groups(cache)) >= 2, 300, "two committed shards")
        jobs[1].kill_tree()  # node 1 goes away: its shard in progress stays uncommitted
        started = time.monotonic()
        rc = jobs[0].wait(120)  # node 0 caches what it can claim, then its final barrier meets the lost peer
        waited = time.monotonic() - started
    finally:
        for job in jobs:
            job.kill_tree()
    print(f"surviving node: exit {rc} after {waited:.1f} s; {len(committed_groups(cache))} of 8 shards committed")
    # The re-run (one node here) caches what is missing; the result is the uninterrupted cache, bitwise.
    assert run_cache(load_config(DEMO, args)) == 0
    assert_same_cache(snapshot(cache), one_process_cache, "killed node, re-run")
    assert len(committed_groups(cache)) == 8


# ---- the trainer --------------------------------------------------------------------------------

def trainer_args(model: Path, cache: Path, out: Path, world: int, *extra: str) -> list[str]:
    """Global batch 4 at any world size: micro-batch 2 x (2 / world) accumulation steps x world."""
    return train_args(model, cache, out, *FLAT, f"train.gradient_accumulation_steps={2 // world}",
                      f"train.max_steps={STEPS}", "train.keep_last=10", FP32_ZERO % 2, *extra)


@pytest.fixture(scope="module")
def baseline(unet_only_model, small_cache, tmp_path_factory) -> list[float]:
    """The uninterrupted 1-process loss trajectory, steps 1..STEPS."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    return run_in_process(trainer_args(unet_only_model, small_cache, out, 1, "train.checkpoint_every=100"))


def assert_follows(losses: dict[int, float], baseline: list[float], steps: range, context: str) -> None:
    assert set(steps) <= set(losses), f"{context}: logged steps {sorted(losses)}"
    np.testing.assert_allclose([losses[s] for s in steps], [baseline[s - 1] for s in steps], rtol=RTOL, atol=ATOL,
                               err_msg=context)


@soak
def test_torchrun_two_nodes_follow_one_process_and_resume_on_one_node(baseline, unet_only_model, small_cache, tmp_path):
    out = tmp_path / "two-nodes"
    args = trainer_args(unet_only_model, small_cache, out, 2, "train.max_steps=4", "train.checkpoint_every=2")
    port = free_port()
    finish(start_nodes([torchrun_node(n, port, "latentforge.train", args) for n in (0, 1)], tmp_path / "logs"))
    assert_follows(logged_losses(out), baseline, range(1, 5), "torchrun, 2 nodes")
    # The step-2 checkpoint of the 2-node run continues on one node (world 2 -> 1: universal checkpoint).
    resumed = tmp_path / "one-node"
    run_in_process(trainer_args(unet_only_model, small_cache, resumed, 1, "train.checkpoint_every=100",
                                f"train.resume={out / 'checkpoints' / 'step-00000002'}"))
    assert_follows(logged_losses(resumed), baseline, range(3, STEPS + 1), "2 nodes -> 1 node")


@soak
def test_deepspeed_launcher_two_nodes_no_ssh_follow_one_process(baseline, unet_only_model, small_cache, tmp_path):
    out = tmp_path / "two-nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: --no_ssh never contacts them
    args = trainer_args(unet_only_model, small_cache, out, 2, "train.max_steps=4", "train.checkpoint_every=100")
    port = free_port()
    finish(start_nodes([deepspeed_node(n, port, hostfile, args) for n in (0, 1)], tmp_path / "logs"))
    assert_follows(logged_losses(out), baseline, range(1, 5), "deepspeed --no_ssh, 2 nodes")


# The training line of docs/training.md's SLURM script, with srun's variables set as srun sets them.
SLURM_TASK = ('RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS '
              '"$PYTHON" -m latentforge.train --config "$CONFIG" "$@"')


@soak
def test_slurm_tasks_without_launcher_follow_one_process(baseline, unet_only_model, small_cache, tmp_path):
    out = tmp_path / "two-tasks"
    args = trainer_args(unet_only_model, small_cache, out, 2, "train.max_steps=4", "train.checkpoint_every=100")
    port = free_port()
    jobs = []
    for task in (0, 1):  # one task per node (--ntasks-per-node=1 here): SLURM_LOCALID 0 on both
        env = child_env(OMP_NUM_THREADS="1", SLURM_PROCID=str(task), SLURM_LOCALID="0", SLURM_NTASKS="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHON=sys.executable, CONFIG=str(DEMO))
        jobs.append(Job(["bash", "-c", SLURM_TASK, "task", *args], tmp_path / "logs" / f"task{task}", env))
    finish(jobs)
    assert_follows(logged_losses(out), baseline, range(1, 5), "SLURM tasks, no launcher")


@soak
@pytest.mark.parametrize("victim", [1, 0], ids=["node1-killed", "node0-killed"])
def test_train_node_killed_survivor_fails_in_one_line_and_run_resumes(victim, baseline, unet_only_model, small_cache,
                                                                     tmp_path):
    from latentforge.train.checkpoint import complete_checkpoints

    out = tmp_path / "run"
    # A run much longer than the test: the kill lands mid-training, after the step-2 checkpoint.
    args = trainer_args(unet_only_model, small_cache, out, 2, "train.max_steps=400", "train.checkpoint_every=2")
    port = free_port()
    jobs = start_nodes([torchrun_node(n, port, "latentforge.train", args) for n in (0, 1)], tmp_path / "logs")
    survivor = jobs[1 - victim]
    try:
        wait_until(lambda: bool(complete_checkpoints(out / "checkpoints")), 300, "a complete checkpoint")
        jobs[victim].kill_tree()
        started = time.monotonic()
        rc = survivor.wait(120)  # a hang fails here
        waited = time.monotonic() - started
    finally:
        for job in jobs:
            job.kill_tree()
    print(f"node {victim} killed: the surviving node exited {rc} after {waited:.1f} s")
    assert rc != 0
    assert waited < 60, f"the surviving node took {waited:.0f} s to fail"
    ours = [line for line in survivor.stderr.splitlines() if "latentforge train:" in line]
    assert len(ours) == 1 and "lost a peer" in ours[0] and "train.resume=latest" in ours[0], survivor.stderr[-4000:]
    assert "Traceback" not in survivor.stderr.split("latentforge train:")[0], "the worker printed a traceback"
    # One node resumes from the last complete checkpoint and follows the uninterrupted trajectory.
    last = complete_checkpoints(out / "checkpoints")[-1]
    step = int(last.name.split("-")[-1])
    assert step < STEPS, f"the kill came too late (checkpoint {step}) for the comparison"
    before = logged_losses(out)
    run_in_process(trainer_args(unet_only_model, small_cache, out, 1, "train.checkpoint_every=100", "train.resume=latest"))
    assert_follows(logged_losses(out), baseline, range(step + 1, STEPS + 1), f"resumed from {last.name} on one node")
    assert before  # the 2-node run logged before it died


def test_lost_peer_reads_a_dead_rank_in_one_line_and_nothing_else():
    import torch.distributed as dist

    from latentforge.train.distributed import lost_peer

    # Measured: what gloo raised on the surviving node when the other node's process was killed.
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                        "[127.0.0.1]:4746: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker.")
    assert lost_peer(gloo) == "Read error [127.0.0.1]:4746: Connection reset by peer."
    assert lost_peer(dist.DistBackendError("NCCL communicator was aborted on rank 1\ndetails")) == \
        "NCCL communicator was aborted on rank 1"
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None
    assert lost_peer(ValueError("[gloo] not a runtime error")) is None
