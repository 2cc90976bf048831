"""Miniature replication of the paper's two claims on the built-in synthetic data.

From one pre-trained tiny CLIP, fine-tune with equal steps and data under each objective below, for several
seeds, then measure compositional accuracy per negative type (the synthetic SugarCrepe-format files) and
zero-shot accuracy on the held-out single-object classification split:

    clip                plain CLIP loss (no negatives)
    negclip             hard negatives in the global loss only (NegCLIP-style)
    degla               the full DeGLA objective (global + IGC + TGC + distillation to the EMA teacher)
    degla_no_igc / degla_no_tgc / degla_no_distill   one term removed
    degla_official_tgc  DeGLA with the official code's TGC grouping (row i with negatives k·b + i)

Claims checked: (1) DeGLA gains composition (over the pre-trained model and over plain CLIP fine-tuning);
(2) DeGLA keeps zero-shot skill better than NegCLIP-style fine-tuning.

    make demo   # once: the synthetic data and the pre-trained tiny CLIP (runs/tiny_pretrain)
    python benchmarks/replicate_tiny.py --steps 300 --seeds 0 1 2 --parallel 2

Each run is `launch/train.py` on one process (finished runs are skipped on a rerun). Writes, in --out
(default runs/benchmarks/; --results benchmarks/results for the committed record), NAME.csv (one row per
variant and seed), NAME.md (mean ± std, verdicts, the command) and NAME.png; NAME is --name (replicate_tiny).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_output_args, environment, print_written  # noqa: E402

NO_TEACHER = ["objective.igc_weight=0", "objective.tgc_weight=0", "objective.distill_weight=0"]
VARIANTS = {
    "clip": ["data.num_negatives=0", *NO_TEACHER],
    "negclip": NO_TEACHER,
    "degla": [],
    "degla_no_igc": ["objective.igc_weight=0"],
    "degla_no_tgc": ["objective.tgc_weight=0"],
    "degla_no_distill": ["objective.distill_weight=0"],
    "degla_official_tgc": ["objective.tgc_grouping=official", "objective.backend=torch"],
}
TYPES = ("reshuffle", "swap_noun", "swap_adj", "replace_adj", "replace_noun")
METRICS = (*TYPES, "comp_avg", "zeroshot_acc1")


def train(name: str, seed: int, args, threads: int) -> Path:
    run_dir = args.work / f"{name}_s{seed}"
    if (run_dir / "final/student.pt").is_file():
        return run_dir
    command = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
               f"run_dir={run_dir}", f"seed={seed}", f"model.pretrained={args.pretrained}",
               f"data.train_shards={args.data / 'finetune'}", f"data.batch_size={args.batch_size}",
               f"schedule.max_steps={args.steps}", "logging.progress=false", "logging.tensorboard=false",
               f"checkpoint.every={args.steps}", *VARIANTS[name]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    return run_dir


def evaluate(state_file: Path, data: Path) -> dict[str, float]:
    from degla_scale.config import ModelConfig
    from degla_scale.eval.common import ModelEncoder
    from degla_scale.eval.models import ModelSpec, load_encoder
    from degla_scale.eval.sugarcrepe import evaluate_sugarcrepe
    from degla_scale.eval.zeroshot import evaluate_zeroshot

    encoder: ModelEncoder = load_encoder(ModelSpec.parse(str(state_file)), ModelConfig("degla-tiny"), 256, "cpu")
    comp = evaluate_sugarcrepe(encoder, data / "sugarcrepe", TYPES)
    zeroshot = evaluate_zeroshot(encoder, data / "zeroshot")
    return {**{t: comp[t] for t in TYPES}, "comp_avg": comp["average"], "zeroshot_acc1": zeroshot["acc1"]}


def summarise(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """variant → metric → (mean, std over seeds)."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        values = [r for r in rows if r["variant"] == name]
        out[name] = {m: (statistics.mean(float(r[m]) for r in values),
                         statistics.stdev(float(r[m]) for r in values) if len(values) > 1 else 0.0) for m in METRICS}
    return out


def verdicts(summary: dict) -> list[str]:
    def mean(name, metric):
        return summary[name][metric][0]

    lines = []
    if {"degla", "pretrained", "clip"} <= summary.keys():
        gain = mean("degla", "comp_avg") - mean("pretrained", "comp_avg")
        over_clip = mean("degla", "comp_avg") - mean("clip", "comp_avg")
        holds = gain > 0 and over_clip > 0
        lines.append(f"Claim 1 (DeGLA gains composition): {'holds' if holds else 'does not hold'} in miniature: "
                     f"compositional average {mean('degla', 'comp_avg'):.1f} vs {mean('pretrained', 'comp_avg'):.1f} "
                     f"pre-trained ({gain:+.1f}) and {mean('clip', 'comp_avg'):.1f} after plain CLIP fine-tuning "
                     f"({over_clip:+.1f}).")
    if {"degla", "negclip"} <= summary.keys():
        diff = mean("degla", "zeroshot_acc1") - mean("negclip", "zeroshot_acc1")
        std = max(summary["degla"]["zeroshot_acc1"][1], summary["negclip"]["zeroshot_acc1"][1])
        verdict = "holds" if diff > std else "holds only within seed noise" if diff > 0 else "does not hold"
        lines.append(f"Claim 2 (DeGLA keeps zero-shot skill better than NegCLIP): {verdict} in miniature: "
                     f"zero-shot acc@1 {mean('degla', 'zeroshot_acc1'):.1f} vs {mean('negclip', 'zeroshot_acc1'):.1f} "
                     f"({diff:+.1f}; larger seed std {std:.1f}); pre-trained {mean('pretrained', 'zeroshot_acc1'):.1f}.")
    return lines


def write_report(rows: list[dict], stem: Path, env: dict, args) -> list[str]:
    summary = summarise(rows)
    lines = ["| variant | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, metrics in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in metrics.values()) + " |")
    found = verdicts(summary)
    text = ["# Miniature replication (tiny CLIP, synthetic data)", "",
            (f"{args.steps} steps of batch {args.batch_size} per run, seeds {args.seeds}; percent, mean ± std over "
             "seeds (the pre-trained row is one model)."), "", *lines, "", *found, "",
            f"Command: `{env['command']}`  ", f"Date: {env['date']}; device: {env['device']}; torch {env['torch']}."]
    stem.with_suffix(".md").write_text("\n".join(text) + "\n")
    plot(summary, stem.with_suffix(".png"))
    return [*lines, *found]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    names = list(summary)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(METRICS))]
        means = [summary[name][m][0] for m in METRICS]
        stds = [summary[name][m][1] for m in METRICS]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(range(len(METRICS)), METRICS)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    ax.set_title("Tiny CLIP fine-tuned on synthetic data: composition per negative type and zero-shot (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, default=ROOT / "runs/tiny_pretrain/final/student.pt")
    parser.add_argument("--data", type=Path, default=ROOT / "data/synthetic")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each gets cores / parallel threads)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/replicate_tiny", help="run directories")
    add_output_args(parser, "replicate_tiny")
    args = parser.parse_args(argv)
    for path, fix in ((args.pretrained, "run `make demo` first, or pass --pretrained"),
                      (args.data / "finetune", "run `make demo` first, or pass --data")):
        if not path.exists():
            parser.error(f"{path} not found: {fix}")
    args.pretrained, args.data = args.pretrained.resolve(), args.data.resolve()
    from tqdm import tqdm

    env = environment()
    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    rows = [{"variant": "pretrained", "seed": "-", **evaluate(args.pretrained, args.data)}]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = pool.map(lambda job: (job, train(*job, args, threads)), jobs)
        for (name, seed), run_dir in tqdm(runs, total=len(jobs), desc="fine-tune + evaluate", unit="run"):
            rows.append({"variant": name, "seed": seed, **evaluate(run_dir / "final/student.pt", args.data)})
    stem = args.out / args.name
    args.out.mkdir(parents=True, exist_ok=True)
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "seed", *METRICS, "steps", "batch", "date", "command"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "steps": args.steps, "batch": args.batch_size, "date": env["date"],
                             "command": env["command"]})
    print("\n".join(write_report(rows, stem, env, args)))
    print_written(*(stem.with_suffix(suffix) for suffix in (".csv", ".md", ".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
