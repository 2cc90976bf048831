"""Evaluation: SugarCrepe-format compositional accuracy and zero-shot classification."""
from __future__ import annotations

import torch

from degla_scale.config import Config


def evaluate(cfg: Config, model, device: torch.device | str = "cpu") -> dict:
    """{"compositional": {subset: acc, ..., "average": mean}, "zeroshot": {...}} in percent."""
    from degla_scale.eval.sugarcrepe import evaluate_sugarcrepe
    from degla_scale.eval.zeroshot import evaluate_zeroshot
    from degla_scale.models import image_transform, tokenizer

    model = model.to(device).eval()
    transform, tokenize, ev = image_transform(cfg.model), tokenizer(cfg.model), cfg.evaluation
    comp = evaluate_sugarcrepe(model, transform, tokenize, ev.sugarcrepe_dir, ev.subsets, ev.batch_size, device)
    comp["average"] = sum(comp.values()) / len(comp)
    results = {"compositional": comp}
    if ev.zeroshot_dir:
        results["zeroshot"] = evaluate_zeroshot(model, transform, tokenize, ev.zeroshot_dir, ev.batch_size, device)
    return results


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown table, one column per model (label → `evaluate` output), plus the change last − first."""
    labels = list(results)
    rows = [(f"comp/{k}", lambda r, k=k: r["compositional"][k]) for k in results[labels[0]]["compositional"]]
    if "zeroshot" in results[labels[0]]:
        rows += [("zeroshot/acc1", lambda r: r["zeroshot"]["acc1"]), ("zeroshot/acc5", lambda r: r["zeroshot"]["acc5"])]
    header = "| metric | " + " | ".join(labels) + (" | change |" if len(labels) > 1 else " |")
    lines = [header, "|" + "---|" * (len(labels) + 1 + (len(labels) > 1))]
    for name, get in rows:
        values = [get(results[label]) for label in labels]
        cells = " | ".join(f"{v:.1f}" for v in values)
        change = f" | {values[-1] - values[0]:+.1f} |" if len(labels) > 1 else " |"
        lines.append(f"| {name} | {cells}{change}")
    return "\n".join(lines)
