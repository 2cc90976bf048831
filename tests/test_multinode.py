"""Two nodes on this machine: `torchrun --nnodes 2 --nproc-per-node 1` twice, c10d rendezvous on localhost,
each "node" in its own mount namespace with its own /dev/shm (as real nodes have: mosaicml-streaming keeps
its node-local state there, and two nodes sharing one /dev/shm collide on it). Each format trains, is
preempted on rank 1, resumes, and matches an uninterrupted run sample for sample (webdataset: the 2-rank
single-node run, as it deals shards by rank); SLURM's variables map onto the launcher's."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_trainer import ROOT, assert_continues_the_reference, overrides, records, steps_of


def _own_shm_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


def start_two_nodes(shards, run_dir, port, *extra, steps=5):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    train = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"two-nodes-{port}",
             str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
             *overrides(shards, run_dir, steps=steps), *extra]
    node = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node"]
    return [subprocess.Popen(node + train, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]


def finish(nodes, timeout=300):
    outs = [n.communicate(timeout=timeout) for n in nodes]
    return [n.returncode for n in nodes], "\n".join(err for _, err in outs)


@pytest.mark.slow
@pytest.mark.skipif(not _own_shm_works(), reason="needs `unshare --mount` (root) to give each node its own /dev/shm")
@pytest.mark.parametrize("fmt", ["wds", pytest.param("mds", marks=pytest.mark.long)])
def test_two_nodes_train_checkpoint_and_resume(tmp_path, shards, two_rank_reference, fmt):
    import psutil

    data, reference = two_rank_reference(fmt)
    run_dir = tmp_path / "two_nodes"
    nodes = start_two_nodes(shards, run_dir, 29581 + (fmt == "mds"), *data, "checkpoint.every=2")
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "train.jsonl").exists() and steps_of(run_dir)):
        time.sleep(0.1)
    start = [r for r in records(run_dir) if r.get("event") == "start"][0]
    assert start["world_size"] == 2
    # two nodes of one rank each: each is its node's local rank 0 and takes the node's whole CPU share
    assert [(r["local_rank"], r["local_world_size"]) for r in start["ranks"]] == [(0, 1), (0, 1)]
    assert start["ranks"][0]["cpu_threads"] == start["ranks"][1]["cpu_threads"] == max(1, os.cpu_count() - 1)
    # rank 1 (on whichever node the rendezvous made node 1), not its data workers, which inherit RANK
    procs = [p for n in nodes for p in psutil.Process(n.pid).children(recursive=True)]
    rank1 = [p for p in procs if p.environ().get("RANK") == "1" and "RANK" not in p.parent().environ()]
    assert len(rank1) == 1, rank1
    rank1[0].send_signal(signal.SIGTERM)
    codes, stderr = finish(nodes)
    assert codes == [0, 0], stderr[-3000:]
    preempted = [r for r in records(run_dir) if r.get("event") == "preempted"]
    assert len(preempted) == 1 and 1 <= preempted[0]["step"] < 5

    codes, stderr = finish(start_two_nodes(shards, run_dir, 29583 + (fmt == "mds"), *data, "checkpoint.every=2"))
    assert codes == [0, 0], stderr[-3000:]
    if fmt == "mds":
        # streaming deals samples to "canonical nodes", by default the physical nodes of a run's first launch,
        # so two nodes read another order than one node with two ranks: compare with two nodes, uninterrupted
        codes, stderr = finish(start_two_nodes(shards, tmp_path / "reference", 29585, *data, "checkpoint.every=2"))
        assert codes == [0, 0], stderr[-3000:]
        reference = steps_of(tmp_path / "reference")
    assert assert_continues_the_reference(run_dir, reference) == preempted[0]["step"]
    assert (run_dir / "final/student.pt").is_file()


def test_slurm_variables_become_the_launcher_variables():
    from degla_scale.distributed import from_slurm

    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert from_slurm(srun) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert from_slurm({**srun, "SLURM_NTASKS_PER_NODE": "4"})["LOCAL_WORLD_SIZE"] == "4"
    assert from_slurm({**srun, "RANK": "5"}) == {}  # a launcher (torchrun, deepspeed) inside the job has set them
    assert from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}  # an interactive one-task allocation
