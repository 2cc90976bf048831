"""Evaluate checkpoints on the SugarCrepe-format files and zero-shot split of a config.

    python launch/eval.py --config configs/tiny.yaml --checkpoint runs/tiny/final/student.pt [--out r.json]
    python launch/eval.py --compare before.json after.json       # print a before/after table
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config naming the model and the evaluation data")
    parser.add_argument("--checkpoint", help=".pt file, run directory or DeepSpeed checkpoint folder (default: model.pretrained)")
    parser.add_argument("--which", choices=["student", "teacher"], default="student")
    parser.add_argument("--label", help="name of this model in tables (default: the checkpoint path)")
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="print a table comparing saved results")
    args, overrides = parser.parse_known_args(argv)

    from degla_scale.eval import comparison_table

    if args.compare:
        results = {}
        for path in args.compare:
            saved = json.loads(Path(path).read_text())
            results[saved["label"]] = saved["results"]
        print(comparison_table(results))
        return 0
    if not args.config:
        parser.error("--config is required unless --compare is given")

    from degla_scale.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import torch

    from degla_scale.eval import evaluate
    from degla_scale.eval.common import load_for_eval

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_for_eval(cfg.model, args.checkpoint, args.which)
    results = evaluate(cfg, model, device)
    label = args.label or args.checkpoint or f"{cfg.model.name}:{cfg.model.pretrained}"
    print(comparison_table({label: results}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"label": label, "checkpoint": args.checkpoint, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
