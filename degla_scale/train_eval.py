"""Evaluation during training (`evaluation.every`): the configured suites scored on the student and, with
`evaluation.teacher`, the EMA teacher, before training, every N optimizer steps and at the end; the best
evaluation's weights kept in `best/` (`checkpoint.best_metric`); the forgetting alarm
(`evaluation.max_zeroshot_drop`, `evaluation.stop_on_drop`); `eval_curve.png`.

What is scored is what `launch/eval.py` would score on a checkpoint of that step: the fp32 weights (the ZeRO
masters, gathered once per evaluation; the fp32 EMA for the teacher) in an fp32 copy of the model that lives
on the CPU between evaluations. The distinct images and texts of every suite are split across the ranks
(`ModelEncoder(share=...)`) and the embeddings gathered, so every rank holds the same scores and takes the
same decisions. Training state is only read: RNG states are restored, so the run goes on exactly as without.

`run_dir/eval_state.json` keeps the first evaluation's zero-shot accuracy (the alarm's baseline), the best
evaluation so far and whether the last one was below the alarm line, for a resumed run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from degla_scale import distributed as D
from degla_scale.cli import notice
from degla_scale.config import Config, ConfigError
from degla_scale.eval import evaluate, prepare
from degla_scale.eval.common import ModelEncoder, Scores
from degla_scale.eval.models import load_state
from degla_scale.export import engine_state_dict
from degla_scale.logs import read_jsonl
from degla_scale.models import build_clip, image_transform, open_clip_layout, tokenizer
from degla_scale.reliability import RunStopped

STATE_FILE = "eval_state.json"
COMPOSITION_SUITES = ("sugarcrepe", "aro", "valse")


class ForgettingStop(RunStopped):
    """evaluation.stop_on_drop: zero-shot accuracy fell past evaluation.max_zeroshot_drop."""


@dataclass
class EvalState:
    baseline: float | None = None  # the student's zero-shot acc1 at the first evaluation
    best_step: int | None = None
    best_value: float | None = None
    below: bool = False  # the last evaluation was past the alarm line

    @classmethod
    def load(cls, run_dir: Path) -> "EvalState":
        path = run_dir / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, run_dir / STATE_FILE)


def zeroshot_accuracy(scores: Scores) -> float:
    """The zero-shot top-1 the alarm watches: a single dataset's acc1, else the average over datasets."""
    for key in ("acc1", "average/acc1"):
        if key in scores:
            return scores[key]
    return next(v for k, v in scores.items() if k.endswith("/acc1"))


def flatten(prefix: str, results: dict[str, Scores]) -> dict[str, float]:
    return {f"{prefix}/{suite}/{metric}": value for suite, scores in results.items() for metric, value in scores.items()}


class TrainEvaluator:
    """Built on every rank at setup (the suites are read and checked before the model loads)."""

    def __init__(self, cfg: Config, device: torch.device, resuming: bool):
        self.cfg, self.device = cfg, device
        self.run_dir = Path(cfg.run_dir)
        self.suites = prepare(cfg.evaluation)
        with torch.random.fork_rng(devices=[]):  # the model's random init must not move the training RNG
            self.clip = build_clip(cfg.model, load_weights=False).float().eval()
        self.transform, self.tokenize = image_transform(cfg.model), tokenizer(cfg.model)
        self.state = EvalState.load(self.run_dir) if resuming else EvalState()  # a fresh start forgets old bests

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.evaluation.every
        return step % every == 0 or step == total_steps

    def _score(self, state: dict) -> dict[str, Scores]:
        load_state(self.clip, state)
        encoder = ModelEncoder(self.clip, self.transform, self.tokenize, self.cfg.evaluation.batch_size, self.device,
                               share=(D.rank(), D.world_size()), progress=self.cfg.logging.progress)
        try:
            return evaluate(encoder, self.suites)
        finally:
            self.clip.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def evaluate(self, engine, teacher, step: int) -> tuple[dict, bool]:
        """Score the student (and teacher) at `step`: (the log record, whether the run must stop). Collective."""
        start = time.perf_counter()
        cpu_rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        weights = {"student": engine_state_dict(engine)}
        results = {"eval": self._score(weights["student"])}
        if self.cfg.evaluation.teacher and teacher is not None:
            weights["teacher"] = open_clip_layout(teacher.full_state_dict())
            results["eval_teacher"] = self._score(weights["teacher"])
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        record = {"event": "eval", "step": step}
        for prefix, per_suite in results.items():
            record.update(flatten(prefix, per_suite))
        self._keep_best(record, weights)
        stop = self._alarm(record, results["eval"])
        record["seconds"] = time.perf_counter() - start
        if D.rank() == 0:
            self.state.save(self.run_dir)
        return record, stop

    def _keep_best(self, record: dict, weights: dict) -> None:
        """A better `checkpoint.best_metric` than any so far: its weights replace best/ (rank 0 writes)."""
        metric, mode = self.cfg.checkpoint.best_metric, self.cfg.checkpoint.best_mode
        if metric is None:
            return
        if metric not in record:
            raise ConfigError(f"checkpoint.best_metric={metric!r} is not among the evaluation's metrics: "
                           f"{', '.join(k for k in record if k.startswith('eval'))}")
        value, best = record[metric], self.state.best_value
        if best is not None and not (value > best if mode == "max" else value < best):
            return
        self.state.best_step, self.state.best_value = record["step"], value
        record["best"] = True
        if D.rank() != 0:
            return
        which = "teacher" if metric.startswith("eval_teacher/") else "student"
        best_dir = self.run_dir / "best"
        best_dir.mkdir(parents=True, exist_ok=True)
        torch.save(weights[which], best_dir / f"{which}.pt.tmp")
        os.replace(best_dir / f"{which}.pt.tmp", best_dir / f"{which}.pt")
        (best_dir / "best.json").write_text(json.dumps({"step": record["step"], "metric": metric, "value": value,
                                                        "mode": mode, "weights": f"{which}.pt"}))

    def _alarm(self, record: dict, student: dict[str, Scores]) -> bool:
        """The forgetting alarm: one line at each crossing below baseline − max_zeroshot_drop; True to stop."""
        if "zeroshot" not in student:
            return False
        accuracy = zeroshot_accuracy(student["zeroshot"])
        if self.state.baseline is None:
            self.state.baseline = accuracy
        drop = self.cfg.evaluation.max_zeroshot_drop
        if drop is None:
            return False
        below = accuracy < self.state.baseline - drop
        crossed = below and not self.state.below
        self.state.below = below
        if below:
            record["zeroshot_alarm"] = True
        if crossed:
            stopping = self.cfg.evaluation.stop_on_drop
            line = (f"step {record['step']}: zero-shot acc1 {accuracy:.1f} is {self.state.baseline - accuracy:.1f} "
                    f"points below the first evaluation's {self.state.baseline:.1f}, past "
                    f"evaluation.max_zeroshot_drop={drop}" + ("" if stopping else " (warning; training goes on)"))
            record["alarm"] = line
            if stopping:
                return True
            notice(line)
        return False


def eval_records(log_path: Path) -> list[dict]:
    """The evaluation records of a run's JSONL by step (a step evaluated again after a resume: the last)."""
    by_step = {r["step"]: r for r in read_jsonl(log_path) if r.get("event") == "eval"}
    return [by_step[s] for s in sorted(by_step)]


def _zeroshot_of(record: dict, prefix: str) -> float | None:
    scores = Scores({k.removeprefix(f"{prefix}/zeroshot/"): v for k, v in record.items()
                     if k.startswith(f"{prefix}/zeroshot/")})
    return zeroshot_accuracy(scores) if scores else None


def curve_table(log_path: Path) -> str:
    """Markdown: per evaluation, each composition suite's average and zero-shot acc1, student then teacher."""
    records = eval_records(log_path)
    columns = [(f"{p}/{s}/average", f"{s} avg ({who})") for p, who in (("eval", "student"), ("eval_teacher", "teacher"))
               for s in COMPOSITION_SUITES if any(f"{p}/{s}/average" in r for r in records)]
    zs = [(p, f"zero-shot acc1 ({who})") for p, who in (("eval", "student"), ("eval_teacher", "teacher"))
          if any(_zeroshot_of(r, p) is not None for r in records)]
    lines = ["| step | " + " | ".join([t for _, t in columns] + [t for _, t in zs]) + " | seconds |",
             "|---:|" + "---:|" * (len(columns) + len(zs) + 1)]
    for r in records:
        cells = [f"{r[k]:.1f}" if k in r else "–" for k, _ in columns]
        cells += ["–" if (v := _zeroshot_of(r, p)) is None else f"{v:.1f}" for p, _ in zs]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + f" | {r.get('seconds', 0):.1f} |")
    return "\n".join(lines)


def plot_eval_curve(log_path: Path, out_png: Path, baseline: float | None = None, drop: float | None = None) -> Path:
    """Composition (each suite's average) and zero-shot acc1 against steps; student solid, teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = eval_records(log_path)
    fig, (comp_ax, zs_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for prefix, style in (("eval", "-"), ("eval_teacher", "--")):
        who = "student" if prefix == "eval" else "teacher"
        for suite in COMPOSITION_SUITES:
            key = f"{prefix}/{suite}/average"
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                comp_ax.plot(*zip(*points), style, marker="o", ms=3, label=f"{suite} ({who})")
        points = [(r["step"], v) for r in records if (v := _zeroshot_of(r, prefix)) is not None]
        if points:
            zs_ax.plot(*zip(*points), style, marker="o", ms=3, label=f"zero-shot acc1 ({who})")
    if baseline is not None and drop is not None:
        zs_ax.axhline(baseline - drop, color="grey", ls=":", label=f"alarm: first − {drop:g}")
    for ax, title in ((comp_ax, "composition (suite averages)"), (zs_ax, "zero-shot accuracy")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
