"""Evaluation suites over one `Encoder`, and side-by-side reports of several models.

Each suite reads its benchmark's released files in the release's own layout (layouts and download sources in
the suite modules and README: Evaluation) and scores them as the benchmark's official code does:
sugarcrepe, aro, valse, zeroshot, retrieval. `prepare` reads and checks every requested suite (files, images,
the ARO order subsets' tagger and their perturbations) once, before any model is loaded; `evaluate` then
scores one model on all of them. Results are {suite: Scores}, each {metric: percent} with `averaged_over`.
"""
from __future__ import annotations

from pathlib import Path

from degla_scale.config import EVAL_SUITES as SUITES, EvalConfig
from degla_scale.eval.common import Encoder, Scores, Suite


def prepare_suite(suite: str, ev: EvalConfig) -> Suite:
    root = Path(ev.root(suite))
    if suite == "sugarcrepe":
        from degla_scale.eval.sugarcrepe import prepare_sugarcrepe
        return prepare_sugarcrepe(root, ev.sugarcrepe)
    if suite == "aro":
        from degla_scale.eval.aro import prepare_aro
        return prepare_aro(root, ev.aro)
    if suite == "valse":
        from degla_scale.eval.valse import prepare_valse
        return prepare_valse(root, ev.valse)
    if suite == "zeroshot":
        from degla_scale.eval.zeroshot import prepare_zeroshot
        return prepare_zeroshot(root, ev.zeroshot)
    if suite == "retrieval":
        from degla_scale.eval.retrieval import prepare_retrieval
        return prepare_retrieval(root, ev.retrieval)
    raise ValueError(f"evaluation suite {suite!r} is not one of {SUITES}")


def prepare(ev: EvalConfig) -> dict[str, Suite]:
    """Every suite of `ev.suites`, read and checked: a missing file, image or tagger fails here, in one line."""
    return {suite: prepare_suite(suite, ev) for suite in ev.suites}


def evaluate(encoder: Encoder, suites: dict[str, Suite]) -> dict[str, Scores]:
    return {name: suite.score(encoder) for name, suite in suites.items()}


def averages_note(results: dict[str, dict[str, Scores]]) -> list[str]:
    """One line per reported average: what it is the mean of (the first model that reports it says)."""
    seen: dict[str, list[str]] = {}
    for per_model in results.values():
        for suite, scores in per_model.items():
            for key, members in getattr(scores, "averaged_over", {}).items():
                seen.setdefault(f"{suite}/{key}", members)
    return [f"{key} = mean of {', '.join(members)}" for key, members in seen.items()]


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
