"""Evaluation suites over one `Encoder`, and side-by-side reports of several models.

Each suite reads its benchmark's released files from `data_root/<suite>/` (layouts in the suite modules):
sugarcrepe, aro, valse, zeroshot, retrieval. Results are {suite: {metric: percent}}.
"""
from __future__ import annotations

from pathlib import Path

from degla_scale.config import EVAL_SUITES as SUITES, EvalConfig
from degla_scale.eval.common import Encoder


def evaluate_suite(suite: str, encoder: Encoder, root: Path, ev: EvalConfig) -> dict[str, float]:
    if suite == "sugarcrepe":
        from degla_scale.eval.sugarcrepe import evaluate_sugarcrepe
        return evaluate_sugarcrepe(encoder, root, ev.sugarcrepe_subsets)
    if suite == "aro":
        from degla_scale.eval.aro import evaluate_aro
        return evaluate_aro(encoder, root, ev.aro_subsets)
    if suite == "valse":
        from degla_scale.eval.valse import evaluate_valse
        return evaluate_valse(encoder, root, ev.valse_pieces)
    if suite == "zeroshot":
        from degla_scale.eval.zeroshot import evaluate_zeroshot
        return evaluate_zeroshot(encoder, root, ev.zeroshot_datasets)
    if suite == "retrieval":
        from degla_scale.eval.retrieval import evaluate_retrieval
        return evaluate_retrieval(encoder, root, ev.retrieval_datasets)
    raise ValueError(f"evaluation suite {suite!r} is not one of {SUITES}")


def evaluate(encoder: Encoder, ev: EvalConfig) -> dict[str, dict[str, float]]:
    return {suite: evaluate_suite(suite, encoder, Path(ev.data_root) / suite, ev) for suite in ev.suites}


def _rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(suite, metric) in first-seen order over all models."""
    seen: dict[tuple[str, str], None] = {}
    for per_model in results.values():
        for suite, metrics in per_model.items():
            seen.update({(suite, metric): None for metric in metrics})
    return list(seen)


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown, one column per model (label → `evaluate` output) and, for two or more, the change last − first."""
    labels = list(results)
    change = len(labels) > 1
    lines = ["| metric | " + " | ".join(labels) + (" | change |" if change else " |"),
             "|---|" + "---:|" * (len(labels) + change)]
    for suite, metric in _rows(results):
        values = [results[label].get(suite, {}).get(metric) for label in labels]
        cells = ["–" if v is None else f"{v:.1f}" for v in values]
        if change:
            cells.append("–" if None in (values[0], values[-1]) else f"{values[-1] - values[0]:+.1f}")
        lines.append(f"| {suite}/{metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_chart(results: dict[str, dict], out: str | Path) -> Path:
    """One panel per suite, its metrics as groups of bars, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    suites = list(dict.fromkeys(suite for suite, _ in _rows(results)))
    metrics = {s: [m for suite, m in _rows(results) if suite == s] for s in suites}
    fig, axes = plt.subplots(len(suites), 1, figsize=(max(6.0, 0.5 * max(map(len, metrics.values())) * len(labels) + 2),
                                                      3.2 * len(suites)), squeeze=False)
    width = 0.8 / len(labels)
    for ax, suite in zip(axes[:, 0], suites):
        for i, label in enumerate(labels):
            values = [results[label].get(suite, {}).get(m, float("nan")) for m in metrics[suite]]
            ax.bar([x + (i - (len(labels) - 1) / 2) * width for x in range(len(values))], values, width, label=label)
        ax.set_xticks(range(len(metrics[suite])), metrics[suite], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(suite)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(len(labels), 4))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
