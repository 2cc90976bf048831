"""Resuming on another number of ranks (2 → 1) with the global batch kept.

A probe builds the trainer's run from a checkpoint (engine, teacher, data position) and dumps the full fp32
weights, Adam moments, EMA teacher, step and learning rate. Loaded natively on the 2 ranks that wrote it
and through DeepSpeed's universal checkpoint on 1 rank, they must be identical; the 1-rank run then trains
on and stays on the 2-rank run's loss curve.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from degla_scale.checkpoint import Layout, ResumePoint, prepare
from degla_scale.config import ConfigError
from degla_scale.data.reader import DataPosition, reshard_position
from test_export import check_round_trip
from test_trainer import launch_two_ranks, overrides, records, steps_of

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from degla_scale.config import load_config
from degla_scale.trainer import setup
out, *args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
run = setup(load_config("configs/tiny.yaml", args))
# DeepSpeed (ZeRO-1/2) links optimizer state to parameters at its next step; a freshly loaded one needs it now
getattr(run.engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
state = {"step": run.step, "lr": run.engine.get_lr()[0], "position": run.position.to_json(),
         "teacher": run.teacher.full_state_dict(), "fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
for name, p in run.engine.module.named_parameters():
    state["fp32"][name] = safe_get_full_fp32_param(p).cpu()
    for key in ("exp_avg", "exp_avg_sq"):
        state[key][name] = safe_get_full_optimizer_state(p, key).cpu()
if torch.distributed.get_rank() == 0:
    torch.save(state, out)
"""


def _copy_checkpoint(src_run: Path, tag: str, dst_run: Path) -> None:
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    (dst_run / "checkpoints/latest").write_text(tag)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.long)])  # 3: ~80 s
def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, shards, stage):
    common = [f"zero.stage={stage}", "checkpoint.every=4"]
    reference = tmp_path / "two"
    curve = launch_two_ranks(shards, reference, 29541, *common, steps=8)  # 8 steps, batch 8 on each of 2 ranks
    if stage == 3:  # the export round trip on a partitioned 2-rank checkpoint (tests/test_export.py)
        check_round_trip(reference, tmp_path, early_tag="step00000004")
    tag = "step00000004"
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + PROBE)

    native = tmp_path / "native"
    _copy_checkpoint(reference, tag, native)
    launch_two_ranks(shards, native, 29542, *common, steps=8, script=probe, script_args=[str(tmp_path / "native.pt")])

    one = tmp_path / "one"
    _copy_checkpoint(reference, tag, one)
    one_rank = [*overrides(shards, one, steps=8), *common, "data.batch_size=16"]  # same global batch, 16
    for script, args in ((probe, [str(tmp_path / "one.pt")]), (ROOT / "launch/train.py", ["--config", "configs/tiny.yaml"])):
        done = subprocess.run([sys.executable, str(script), *args, *one_rank], cwd=ROOT, capture_output=True, text=True,
                              timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (one / "checkpoints/universal" / tag / "zero").is_dir()

    want, got = torch.load(tmp_path / "native.pt"), torch.load(tmp_path / "one.pt")
    assert got["step"] == want["step"] == 4 and got["lr"] == want["lr"]
    assert all(v.abs().sum() > 0 for v in want["exp_avg_sq"].values())  # 4 steps in: moments a reset would lose
    for part in ("fp32", "exp_avg", "exp_avg_sq", "teacher"):
        assert got[part].keys() == want[part].keys()
        for name in want[part]:
            torch.testing.assert_close(got[part][name], want[part][name], rtol=0, atol=0, msg=f"{part} {name}")
    assert got["position"] == {"epoch": 0, "batches": 4, "consumed": [64], "rejected": {}, "stream": None,
                               "samples_read": 64, "reject_examples": {}}  # 4 steps × 16

    resumed = steps_of(one)
    start = [r for r in records(one) if r.get("event") == "start"]
    assert start[0]["resumed"] and start[0]["world_size"] == 1 and sorted(resumed) == [5, 6, 7, 8]
    for step, r in resumed.items():
        assert r["lr"] == pytest.approx(curve[step]["lr"], rel=1e-12), step  # the schedule carries on
        # Other samples (the 1-rank stream), so the same curve only up to sampling noise; the contrastive
        # term over the same global batch of 16 is comparable.
        assert r["loss.clip"] == pytest.approx(curve[step]["loss.clip"], rel=0.1), step


def test_resume_with_another_global_batch_is_refused(tmp_path):
    point = ResumePoint(tmp_path, "step00000004", Layout(4, world_size=2, batch_size=8, grad_accum=1))
    with pytest.raises(ConfigError) as info:
        prepare(point, Layout(0, world_size=1, batch_size=8, grad_accum=1), zero_stage=2, bf16=False)
    message = str(info.value)
    assert "\n" not in message and "global batch of 16" in message and "data.batch_size" in message


def test_reshard_position_keeps_the_step_and_the_reject_counts():
    saved = [DataPosition(1, 6, [20, 21], {"unreadable_image": 1}), DataPosition(1, 6, [22, 19], {"unreadable_image": 2, "empty_caption": 1})]
    # 3 optimizer steps of 2 micro-batches each on 2 ranks → 3 steps of 1 micro-batch of 32 on 2 workers of 1 rank
    mine = [reshard_position(saved, saved_accum=2, accum=1, num_workers=2, batch_size=32, rank=r) for r in range(2)]
    assert mine[0] == DataPosition(1, 3, [64, 32], {"unreadable_image": 3, "empty_caption": 1})
    assert mine[1].rejected == {} and mine[1].batches == 3
    with pytest.raises(ValueError, match="disagree"):
        reshard_position([saved[0], DataPosition(2, 6, [1, 1], {})], 2, 1, 2, 32, 0)


@pytest.mark.slow
def test_mds_two_rank_checkpoint_resumes_on_one_rank_with_the_same_samples(tmp_path, shards, mds_shards):
    """StreamingDataset's state counts samples over all ranks: after 2 → 1 each later step's global batch
    holds exactly the samples the 2-rank run put in it (the order within it may differ)."""
    data = ["data.format=mds", f"data.train_shards={mds_shards}", "checkpoint.every=2"]
    reference = launch_two_ranks(shards, tmp_path / "two", 29561, *data, steps=5)
    one = tmp_path / "one"
    _copy_checkpoint(tmp_path / "two", "step00000002", one)
    done = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", "configs/tiny.yaml",
                           *overrides(shards, one, steps=5), *data, "data.batch_size=16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = steps_of(one)
    assert sorted(resumed) == [3, 4, 5]
    for step, r in resumed.items():
        (ids,) = r["sample_ids"]  # one rank
        want = [k for rank_ids in reference[step]["sample_ids"] for k in rank_ids]
        assert len(ids) == 16 and sorted(ids) == sorted(want), f"step {step} saw other samples"
