"""launch/train.py with faults injected, for the reliability tests (run by them through the launchers).

FAULT_NAN_STEPS=3,4  FAULT_NAN_RANK=1   the loss term clip (hence the total) is NaN at those optimizer steps
                                         on that rank (every rank when FAULT_NAN_RANK is unset)
FAULT_ZEROSHOT_SHIFT=2,3:-30            the student's zero-shot scores measured at those steps' evaluations are shifted
                                         by that many points (a planted drop, or with a + a planted peak)
FAULT_DIGESTS=1                          after every step each rank appends to RUN_DIR/digests_rank{r}.jsonl a
                                         hash of the student's weights (fp32 masters where ZeRO keeps them) and of the EMA teacher
"""
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import train as entry  # noqa: E402  launch/train.py

from degla_scale import trainer  # noqa: E402
from degla_scale import distributed as D  # noqa: E402
from degla_scale.export import engine_state_dict  # noqa: E402


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


nan_steps = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s}
nan_rank = os.environ.get("FAULT_NAN_RANK")
state = {"run": None}
original_objective, original_step = trainer.objective_loss, trainer.train_step


def objective_loss(*args, **kwargs):
    out = original_objective(*args, **kwargs)
    run = state["run"]
    if run is not None and run.step + 1 in nan_steps and (nan_rank is None or int(nan_rank) == D.rank()):
        nan_clip = out.clip * float("nan")
        out = dataclasses.replace(out, clip=nan_clip, total=out.total + nan_clip)
    return out


def train_step(run, batches):
    state["run"] = run
    result = original_step(run, batches)
    if os.environ.get("FAULT_DIGESTS"):
        teacher = run.teacher.full_state_dict() if run.teacher is not None else {}
        record = {"step": run.step, "skipped": bool(result[2]),
                  "student": _digest(v for _, v in sorted(engine_state_dict(run.engine).items())),  # fp32 masters
                  "teacher": _digest(v for _, v in sorted(teacher.items()))}
        with open(Path(run.cfg.run_dir) / f"digests_rank{D.rank()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return result


trainer.objective_loss, trainer.train_step = objective_loss, train_step

if os.environ.get("FAULT_ZEROSHOT_SHIFT"):
    from degla_scale import train_eval

    steps_text, shift_text = os.environ["FAULT_ZEROSHOT_SHIFT"].split(":")
    shift_steps, shift = {int(s) for s in steps_text.split(",")}, float(shift_text)
    original_evaluate = train_eval.TrainEvaluator.evaluate
    original_score = train_eval.TrainEvaluator._score

    def evaluate(self, engine, teacher, step):
        self.planting = step in shift_steps  # the student is scored first
        return original_evaluate(self, engine, teacher, step)

    def _score(self, state):
        results = original_score(self, state)
        if getattr(self, "planting", False):
            self.planting = False
            results["zeroshot"] = train_eval.Scores({k: v + shift for k, v in results["zeroshot"].items()})
        return results

    train_eval.TrainEvaluator.evaluate, train_eval.TrainEvaluator._score = evaluate, _score

if __name__ == "__main__":
    sys.exit(entry.main())
