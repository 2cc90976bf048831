"""Make training shards and evaluation files.

    python launch/make_shards.py --from synthetic --out data/synthetic [--format wds|mds] [--seed 0] [--num-negatives 4]

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
    parser.add_argument("--from", dest="source", required=True, choices=["synthetic"], help="where the samples come from")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="wds", choices=["wds", "mds"], help="webdataset tar or mosaicml-streaming MDS shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-negatives", type=int, default=4, help="K hard negatives per fine-tuning sample")
    parser.add_argument("--pretrain-samples", type=int, default=24000)
    parser.add_argument("--finetune-samples", type=int, default=8000)
    parser.add_argument("--eval-per-type", type=int, default=500)
    parser.add_argument("--zeroshot-per-class", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.num_negatives < 0:
        parser.error(f"--num-negatives={args.num_negatives} must be >= 0")

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


if __name__ == "__main__":
    sys.exit(main())
