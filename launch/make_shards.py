"""Make training shards and evaluation files.

    python launch/make_shards.py --from synthetic --out data/synthetic [--format wds|mds] [--seed 0] [--num-negatives 4]
    python launch/make_shards.py --from degla-json FILE --image-root DIR --format mds --out DIR --num-negatives 4
    python launch/make_shards.py --from jsonl FILE [--image-root DIR] [--negatives FILE.jsonl] --out DIR
    python launch/make_shards.py --from wds URLS --negatives FILE.jsonl --out DIR

Converted records are validated (missing or unreadable image, fewer than K negatives, empty caption or
negative, a negative equal to the positive); bad ones go to OUT/rejects.jsonl with the reason, and the run
ends with counts. A good record keeps every negative it has (K or more); training picks K of them
(data.negatives_pick). An interrupted conversion resumes from OUT/progress.json.

`synthetic` writes pretrain/ and finetune/ shards (webdataset or MDS, with manifest.json), SugarCrepe-format
evaluation files and a zero-shot split (see degla_scale/data/synthetic.py).
"""
import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, nargs="+", metavar="KIND [INPUT]",
                        help="synthetic | degla-json FILE | jsonl FILE | wds URLS")
    parser.add_argument("--image-root", help="folder the records' image paths are relative to (degla-json: COCO train2014)")
    parser.add_argument("--negatives", help="side file of negatives, one {id or key, negatives, types} per line")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="wds", choices=["wds", "mds"], help="webdataset tar or mosaicml-streaming MDS shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-negatives", type=int, default=4, help="K: the fewest negatives a record must have (synthetic: exactly K per sample)")
    parser.add_argument("--pretrain-samples", type=int, default=24000)
    parser.add_argument("--finetune-samples", type=int, default=8000)
    parser.add_argument("--eval-per-type", type=int, default=500)
    parser.add_argument("--zeroshot-per-class", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.num_negatives < 0:
        parser.error(f"--num-negatives={args.num_negatives} must be >= 0")
    kind, *inputs = args.source
    if kind != "synthetic":
        from degla_scale import cli

        return cli.run(lambda: convert_records(parser, args, kind, inputs))

    from degla_scale.data.synthetic import write_synthetic_dataset

    start = time.perf_counter()
    report = write_synthetic_dataset(
        Path(args.out), seed=args.seed, pretrain_samples=args.pretrain_samples,
        finetune_samples=args.finetune_samples, num_negatives=args.num_negatives,
        eval_per_type=args.eval_per_type, zeroshot_per_class=args.zeroshot_per_class,
        shard_size=args.shard_size, workers=args.workers, fmt=args.format,
    )
    summary = {
        "pretrain_samples": report["pretrain"]["num_samples"], "finetune_samples": report["finetune"]["num_samples"],
        "num_negatives": report["finetune"]["num_negatives"], "sugarcrepe": report["sugarcrepe"],
        "zeroshot_classes": report["zeroshot_classes"], "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))
    return 0


def convert_records(parser, args, kind: str, inputs: list[str]) -> int:
    from degla_scale.data import convert as C

    if kind not in ("degla-json", "jsonl", "wds") or len(inputs) != 1:
        parser.error(f"--from {' '.join(args.source)}: use degla-json FILE, jsonl FILE or wds URLS")
    if kind != "wds" and not Path(inputs[0]).is_file():
        parser.error(f"--from {kind} {inputs[0]}: no such file")
    if kind == "degla-json" and not args.image_root:
        parser.error("--from degla-json needs --image-root DIR (the folder holding COCO train2014 images)")
    if kind == "wds" and not args.negatives:
        parser.error("--from wds needs --negatives FILE.jsonl (the negatives of each sample key)")
    side = C.read_side_negatives(Path(args.negatives)) if args.negatives else None
    root = Path(args.image_root) if args.image_root else None
    records = {"degla-json": lambda: C.read_degla_json(Path(inputs[0]), root),
               "jsonl": lambda: C.read_jsonl(Path(inputs[0]), root, side),
               "wds": lambda: C.read_wds(inputs[0], side)}[kind]()
    report = C.convert(records, Path(args.out), args.format, args.num_negatives, args.shard_size, args.workers)
    print(json.dumps({k: v for k, v in report.items() if k not in ("shards", "shard_samples")}))
    if report["num_samples"] == 0:
        reasons = {r: n for r, n in report["rejected"].items() if n}
        raise C.DataError(f"all {report['read']} records were rejected ({reasons}), so {args.out} holds no samples: "
                          f"see {Path(args.out) / 'rejects.jsonl'} for each record's reason")
    print(f"wrote {report['num_samples']} samples to {args.out} ({len(report['shards'])} shards)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
