"""Run logs: JSONL (the record of truth), TensorBoard, optionally Weights & Biases, and a loss-curve plot
drawn from the JSONL."""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path

WANDB_FIX = "pip install '.[wandb]', or set logging.wandb=false"


def check_wandb() -> None:
    """logging.wandb=true: wandb must import (checked on every rank before the run starts)."""
    from degla_scale.config import ConfigError

    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(f"logging.wandb=true needs the wandb package: {WANDB_FIX}") from None


def start_wandb(run_dir: Path, cfg):
    """A W&B run for `cfg` (its project, name and tags; the whole config as W&B's config), resumed under the
    same id when the run directory is resumed. WANDB_MODE=offline keeps it on disk (run_dir/wandb/)."""
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    lg = cfg.logging
    return wandb.init(project=lg.wandb_project, name=lg.wandb_name or run_dir.name, tags=list(lg.wandb_tags),
                      config=asdict(cfg), dir=str(run_dir), id=run_id, resume="allow")


class RunLog:
    """Rank 0 appends one JSON object per record to `train.jsonl` and mirrors its numbers to TensorBoard and,
    given `wandb` (the run's Config), to Weights & Biases."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, wandb=None):
        self.enabled = enabled
        self.path = run_dir / "train.jsonl"
        self.tb = self.wandb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            if wandb is not None:
                self.wandb = start_wandb(run_dir, wandb)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "step" not in record:
            return
        scalars = {key.replace(".", "/"): value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(runs: dict[str, Path], out_png: Path) -> None:
    """One panel per loss term, one line per run (label → train.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ["loss.total", "loss.clip", "loss.igc", "loss.tgc", "loss.distill"]
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2))
    for label, path in runs.items():
        records = [r for r in read_jsonl(path) if "loss.total" in r]
        for ax, term in zip(axes, terms):
            steps = [r["step"] for r in records if r.get(term) is not None]
            values = [r[term] for r in records if r.get(term) is not None]
            if any(values):
                ax.plot(steps, values, label=label)
    for ax, term in zip(axes, terms):
        ax.set_title(term)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
