"""Evaluation during training: on 2 ranks the evaluations come at the configured steps, equal launch/eval.py
on the same weights, leave the run's samples and losses as they are without evaluation, and best/ holds the
best one; a planted zero-shot drop warns at each crossing (also into W&B's offline run) or stops the run
with a checkpoint; a SIGKILLed run resumes with the same cadence and the best so far."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_trainer import ROOT, launch_two_ranks, overrides, records, steps_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from degla_scale.data.synthetic import write_sugarcrepe, write_zeroshot

    root = tmp_path_factory.mktemp("eval_data")
    write_sugarcrepe(root / "sugarcrepe", seed=0, per_type=4)
    write_zeroshot(root / "zeroshot", seed=0, per_class=1)
    return root


def eval_overrides(eval_data, every=2, *extra):
    return [f"evaluation.every={every}", f"evaluation.data_root={eval_data}", "evaluation.batch_size=16", *extra]


def evals_of(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if r.get("event") == "eval"}


def run_fault(shards, run_dir, *extra, env=None, steps=6, check=True):
    done = subprocess.run([sys.executable, str(ROOT / "tests/fault_inject.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                           *overrides(shards, run_dir, steps=steps), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_evaluate_on_schedule_as_launch_eval_and_keep_the_best(tmp_path, eval_data, two_rank_reference):
    data, reference = two_rank_reference("wds")
    run = tmp_path / "run"
    best = "checkpoint.best_metric=eval/sugarcrepe/average"
    launch_two_ranks(data[1].split("=", 1)[1], run, 29571, *data, "checkpoint.every=2", "checkpoint.keep_last=1", best,
                     *eval_overrides(eval_data, 2, "evaluation.teacher=true"), steps=5)
    evals = evals_of(run)
    assert sorted(evals) == [0, 2, 4, 5]  # before training, every 2 steps, and at the end
    assert all(any(k.startswith("eval_teacher/zeroshot/") for k in r) for r in evals.values())
    # evaluation leaves training as it was: the same samples and losses as the reference run without it
    got = steps_of(run)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step, r in got.items():
        assert r["sample_ids"] == reference[step]["sample_ids"]
        assert r["loss.total"] == reference[step]["loss.total"], step

    # the last evaluation is what launch/eval.py says of the final weights; best/ holds the best evaluation's
    chosen = json.loads((run / "best" / "best.json").read_text())
    averages = {s: r["eval/sugarcrepe/average"] for s, r in evals.items()}
    assert chosen["step"] == min(s for s, v in averages.items() if v == max(averages.values()))  # first of the best
    assert chosen["value"] == max(averages.values())
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, str(ROOT / "launch/eval.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                           "--out", str(out), "--model", f"s={run}/final/student.pt", "--model", f"t={run}/final/teacher.pt",
                           "--model", f"best={run}/best/student.pt", "model.pretrained=null",
                           f"evaluation.data_root={eval_data}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    offline = json.loads((out / "results.json").read_text())["results"]
    last = evals[5]
    for label, prefix in (("s", "eval"), ("t", "eval_teacher")):
        for suite, scores in offline[label].items():
            for metric, value in scores.items():
                assert last[f"{prefix}/{suite}/{metric}"] == pytest.approx(value, abs=1e-9), (label, suite, metric)
    assert offline["best"]["sugarcrepe"]["average"] == pytest.approx(chosen["value"], abs=1e-9)
    # keep_last=1 removed the older checkpoints, not best/; the curve is drawn
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000005"]
    assert (run / "best" / "student.pt").is_file() and (run / "eval_curve.png").stat().st_size > 0


def test_planted_drop_warns_at_each_crossing_and_reaches_wandb_offline(tmp_path, shards, eval_data):
    # The fault hook lowers the student's measured zero-shot scores by 50 points at steps 2, 3 and 5: the line is
    # crossed at 2 and again at 5 (3 stays below: no second line), and the run goes on.
    run = tmp_path / "warn"
    done = run_fault(shards, run, *eval_overrides(eval_data, 1, "evaluation.max_zeroshot_drop=10"), "logging.wandb=true",
                     env={"FAULT_ZEROSHOT_SHIFT": "2,3,5:-50", "WANDB_MODE": "offline"})
    alarms = [line for line in done.stderr.splitlines() if "evaluation.max_zeroshot_drop=10" in line]
    assert [line.split(":")[0] for line in alarms] == ["step 2", "step 5"], done.stderr[-3000:]
    evals = evals_of(run)
    assert [s for s, r in evals.items() if r.get("zeroshot_alarm")] == [2, 3, 5]
    assert (run / "final" / "student.pt").is_file()
    # W&B offline: the run's file holds every evaluation's and every loss record's numbers under their keys
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert wandb_file.name == f"run-{(run / 'wandb_id').read_text().strip()}.wandb"
    raw = wandb_file.read_bytes()
    for r in list(evals.values()) + list(steps_of(run).values()):
        for key in ("eval/zeroshot/acc1", "loss.total"):
            if key in r:
                assert key.replace(".", "/").encode() in raw and json.dumps(r[key]).encode() in raw, (r["step"], key)


def test_planted_drop_with_stop_on_drop_ends_with_a_checkpoint(tmp_path, shards, eval_data):
    run = tmp_path / "stop"
    done = run_fault(shards, run, *eval_overrides(eval_data, 1, "evaluation.max_zeroshot_drop=10",
                                                  "evaluation.stop_on_drop=true"),
                     env={"FAULT_ZEROSHOT_SHIFT": "2:-50"}, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3 and lines[-1].startswith("training stopped: step 2: zero-shot acc1"), done.stderr[-3000:]
    assert "saved the checkpoint of step 2" in lines[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert not (run / "final").exists() and records(run)[-1]["event"] == "stopped"


def test_sigkill_resume_keeps_cadence_and_the_best_so_far(tmp_path, shards, eval_data):
    # A planted peak at step 2 makes it the best zero-shot evaluation for sure; the run is killed after its
    # checkpoint of step 6 (or 9) and resumed: evaluations continue at the next multiples of 2 (not again at the
    # resumed step), and best/ stays step 2's. At ZeRO-3, whose weights are gathered for each evaluation.
    run = tmp_path / "killed"
    extra = [*eval_overrides(eval_data, 2, "evaluation.teacher=true"), "checkpoint.best_metric=eval/zeroshot/acc1",
             "zero.stage=3"]
    cmd = [sys.executable, str(ROOT / "tests/fault_inject.py"), "--config", str(ROOT / "configs/tiny.yaml"),
           *overrides(shards, run, steps=10), *extra]
    env = {**os.environ, "FAULT_ZEROSHOT_SHIFT": "2:+50"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and max(steps_of(run) if (run / "train.jsonl").exists() else [0], default=0) < 7:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step"))  # step00000006
    assert saved in (6, 9)  # checkpoint.every=3; killed after step 7 at the earliest
    before = json.loads((run / "best" / "best.json").read_text())
    assert before["step"] == 2
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    starts = [i for i, r in enumerate(records(run)) if r.get("event") == "start"]
    after = [r["step"] for r in records(run)[starts[1]:] if r.get("event") == "eval"]
    assert after == [s for s in (8, 10) if s > saved]
    assert sorted(evals_of(run)) == [0, 2, 4, 6, 8, 10]
    assert all("eval_teacher/zeroshot/acc1" in r for r in evals_of(run).values())
    assert json.loads((run / "best" / "best.json").read_text()) == before
