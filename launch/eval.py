"""Evaluate models side by side on the benchmark suites: JSON, a Markdown table and a bar chart.

    python launch/eval.py --config configs/vitb32.yaml --out runs/eval \
        --model base=openclip:ViT-B-32/openai --model degla=runs/vitb32 --model ema=runs/vitb32#teacher \
        evaluation.data_root=/data/eval evaluation.suites=[sugarcrepe,aro,valse,zeroshot,retrieval]

--model [LABEL=]SOURCE (repeatable): openclip:NAME/TAG, a run directory or checkpoint (any ZeRO stage;
#teacher for the EMA teacher), a final .pt or an exported .safetensors (see degla_scale/eval/models.py).
The config gives the `evaluation` section (data root, suites, subsets) and the architecture for files that
have no run config beside them; key=value overrides follow it. Writes OUT/results.json, OUT/table.md and
OUT/chart.png.
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (its evaluation section and model)")
    parser.add_argument("--model", action="append", required=True, metavar="[LABEL=]SOURCE")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json, table.md, chart.png")
    args, overrides = parser.parse_known_args(argv)

    from degla_scale import cli

    return cli.run(lambda: evaluate_models(parser, args, overrides))


def evaluate_models(parser, args, overrides) -> int:
    import torch

    from degla_scale.config import load_config
    from degla_scale.eval import averages_note, comparison_chart, comparison_table, evaluate, prepare
    from degla_scale.eval.models import ModelSpec, load_encoder

    cfg = load_config(args.config, overrides)
    try:
        specs = [ModelSpec.parse(text) for text in args.model]
    except ValueError as exc:
        parser.error(str(exc))
    for spec in specs:
        spec.check()
    suites = prepare(cfg.evaluation)  # every file, image and tagger checked before the first model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for spec in specs:
        encoder = load_encoder(spec, cfg.model, cfg.evaluation.batch_size, device)
        results[spec.label] = evaluate(encoder, suites)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = {s.label: f"{s.source}#{s.which}" for s in specs}
    averages = averages_note(results)
    (args.out / "results.json").write_text(json.dumps({"models": sources, "results": results,
                                                       "averages": averages}, indent=1))
    table = comparison_table(results) + "\n\n" + "\n".join(f"- {line}" for line in averages)
    (args.out / "table.md").write_text(table + "\n")
    comparison_chart(results, args.out / "chart.png")
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'chart.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
