"""Non-finite losses and gradients (reliability.nonfinite): injected through tests/fault_inject.py into real
runs on 2 ranks; and the pieces (the watch, the ZeRO-0 fp32 gate) against a plain torch optimizer."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_trainer import ROOT, launch_two_ranks, overrides, records, steps_of

FAULT = ROOT / "tests/fault_inject.py"
CONFIG = ["--config", str(ROOT / "configs/tiny.yaml")]


def digests(run_dir, rank):
    lines = (Path(run_dir) / f"digests_rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def launch_faulty(shards, run_dir, port, env, *extra, steps):
    """2 ranks through the DeepSpeed launcher on the fault-injecting entry point → (exit code, stderr)."""
    import os

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
    result = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(FAULT), *CONFIG,
                             *overrides(shards, run_dir, steps=steps), *extra],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return result.returncode, result.stderr


@pytest.mark.slow
def test_nonfinite_stop_keeps_the_last_good_checkpoint_and_resume_continues(tmp_path, shards):
    """Rank 1's loss is NaN at step 3 of 5 (checkpoints every 2): the run stops with exit 3 and one line naming
    the step, the rank and the term; step 2's checkpoint is the last and is finite; a relaunch resumes there."""
    run_dir = tmp_path / "stop"
    code, stderr = launch_faulty(shards, run_dir, 29571, {"FAULT_NAN_STEPS": "3", "FAULT_NAN_RANK": "1"},
                                 "checkpoint.every=2", "logging.every=5", steps=5)
    assert code == 3, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("training stopped:")]
    assert len(stops) == 1 and "step 3, rank 1, loss term clip" in stops[0] and "continues from step 2" in stops[0]
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert tags == ["step00000002"]  # the read before step 4's checkpoint stopped the run
    from degla_scale.export import checkpoint_state_dict

    for which in ("student", "teacher"):
        state = checkpoint_state_dict(run_dir / "checkpoints/step00000002", which)
        assert all(torch.isfinite(v).all() for v in state.values()), which
    assert not (run_dir / "final").exists()

    after = launch_two_ranks(shards, run_dir, 29572, "checkpoint.every=2", "logging.every=1", steps=5)
    starts = [r for r in records(run_dir) if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, 2]
    assert all(math.isfinite(after[s]["loss.total"]) for s in (3, 4, 5)) and (run_dir / "final/student.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["zero.stage=0"], ["zero.stage=1", "zero.precision=bf16"], ["zero.stage=3"]],
                         ids=["zero0-fp32-gate", "zero1-bf16-deepspeed", "zero3-fp32-deepspeed"])
def test_nonfinite_skip_drops_the_update_on_every_rank(tmp_path, shards, layout):
    """Rank 1's loss is NaN at step 3: under skip both ranks keep step 2's weights and EMA through step 3
    (the weights equal those of a run that never applied that batch), say so once, count it, and train on."""
    run_dir = tmp_path / "skip"
    code, stderr = launch_faulty(shards, run_dir, 29573, {"FAULT_NAN_STEPS": "3", "FAULT_NAN_RANK": "1",
                                                          "FAULT_DIGESTS": "1"},
                                 "reliability.nonfinite=skip", *layout, steps=5)
    assert code == 0, stderr[-2000:]
    assert sum("update was skipped on every rank" in line for line in stderr.splitlines()) == 1
    for rank in (0, 1):
        d = digests(run_dir, rank)
        assert [d[s]["skipped"] for s in range(1, 6)] == [False, False, True, False, False]
        for part in ("student", "teacher"):
            assert d[3][part] == d[2][part], (rank, part)  # the update of step 3 never happened
            assert len({d[s][part] for s in (1, 2, 4, 5)}) == 4, (rank, part)  # every other step moved
    assert digests(run_dir, 0) == digests(run_dir, 1)  # both ranks alike
    recs = steps_of(run_dir)
    assert [recs[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert recs[3]["nonfinite"] == "step 3, rank 1, loss term clip"
    assert all(math.isfinite(recs[s]["loss.total"]) for s in (1, 2, 4, 5))


def test_skipped_steps_in_a_row_stop_the_run(tmp_path, shards):
    """Every step from 2 on is NaN with reliability.max_skipped=2: the run stops at step 3, exit 3, one line."""
    run_dir = tmp_path / "in_a_row"
    result = subprocess.run([sys.executable, str(FAULT), *CONFIG, *overrides(shards, run_dir, steps=6),
                             "reliability.nonfinite=skip", "reliability.max_skipped=2"],
                            cwd=ROOT, env={**__import__("os").environ, "FAULT_NAN_STEPS": "2,3,4,5,6"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("training stopped: 2 steps in a row up to step 3 had non-finite gradients"), last
    assert "reliability.max_skipped=2" in last
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == []  # checkpoint.every=3 never came


# ---------------------------------------------------------------- the pieces, without DeepSpeed


def test_gradient_gate_under_skip_leaves_weights_and_adam_state_as_they_were():
    from degla_scale.reliability import GradientGate

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    gate = GradientGate(opt, skip=True)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert not opt.overflow and not bool(gate.bad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    opt.zero_grad()
    (model(torch.randn(2, 4)).sum() * float("nan")).backward()
    opt.step()
    assert opt.overflow and bool(gate.bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))


def test_gradient_gate_under_stop_applies_the_step_and_flags_it():
    from degla_scale.reliability import GradientGate

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = GradientGate(opt, skip=False)
    (model(torch.randn(2, 4)).sum() * float("inf")).backward()
    opt.step()
    assert not opt.overflow and bool(gate.bad) and not torch.isfinite(model.weight).all()


def test_watch_reports_the_first_bad_step_and_its_term_then_resets():
    from degla_scale.reliability import NonFiniteWatch

    watch = NonFiniteWatch(torch.device("cpu"))
    watch.record(1, torch.tensor([1.0, 2.0, 3.0, 4.0]), False)
    assert watch.read() is None
    watch.record(2, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(True))
    watch.record(3, torch.tensor([1.0, float("nan"), 3.0, float("inf")]), True)
    assert watch.read() == "step 2, rank 0, gradients"  # the first one, not the worst one
    watch.record(5, torch.tensor([1.0, float("nan"), 3.0, float("inf")]), True)
    assert watch.read() == "step 5, rank 0, loss term igc, distill"
    assert watch.read() is None


# ---------------------------------------------------------------- damaged data through the trainer


def damaged_copy(src: Path, out: Path, seed: int, actions=("cut", "flip", "none")) -> Path:
    """A copy of a shard folder with every shard file cut at a random byte, given 64 flipped bytes, or left be."""
    import random
    import shutil

    shutil.copytree(src, out)
    rng = random.Random(seed)
    for path in sorted(p for p in out.rglob("*") if p.suffix in (".tar", ".mds")):
        data, action = bytearray(path.read_bytes()), rng.choice(actions)
        if action == "cut":
            data = data[:rng.randrange(len(data) // 4, len(data))]
        elif action == "flip":
            for at in rng.sample(range(len(data)), 64):
                data[at] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
    return out


def train_once(shards, run_dir, *extra, steps=6):
    return subprocess.run([sys.executable, str(ROOT / "launch/train.py"), *CONFIG, *overrides(shards, run_dir, steps=steps),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_training_on_fuzzed_shards_neither_crashes_nor_hangs_and_counts_what_it_rejects(tmp_path, shards, mds_shards,
                                                                                         fmt):
    from degla_scale.data.samples import REASONS

    data = damaged_copy(shards if fmt == "wds" else mds_shards, tmp_path / "damaged", seed=3)
    run_dir = tmp_path / "run"
    result = train_once(data, run_dir, f"data.format={fmt}", f"data.train_shards={data}", "data.max_rejected_fraction=1")
    assert result.returncode == 0, result.stderr[-3000:]
    recs = steps_of(run_dir)
    last = recs[6]
    assert sum(last["rejected"].values()) > 0 and set(last["rejected"]) <= set(REASONS), last["rejected"]
    used = [k for r in recs.values() for ids in r["sample_ids"] for k in ids]
    assert len(used) == 6 * 8
    if fmt == "wds":  # every sample read was used once or counted (MDS refills a rejected place with a repeat)
        assert len(set(used)) == len(used) and last["samples_read"] == len(used) + sum(last["rejected"].values())
    else:
        assert last["samples_read"] == len(used)


def test_rejects_above_the_budget_stop_the_run_in_one_line(tmp_path, shards):
    data = damaged_copy(shards, tmp_path / "damaged", seed=0, actions=("cut",))
    result = train_once(data, tmp_path / "run", f"data.train_shards={data}")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("data error: ") and "samples read were rejected (> data.max_rejected_fraction=0.01): " \
        "damaged_shard" in last and "; e.g. shard " + str(data) in last, last
