"""Run logs: JSONL (the record of truth), TensorBoard, and a loss-curve plot drawn from the JSONL."""
from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    """Rank 0 appends one JSON object per record to `train.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "train.jsonl"
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key.replace(".", "/"), value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
