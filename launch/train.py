"""Train CLIP with DeGLA.

    deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml [key=value ...]
    python launch/train.py --config configs/tiny.yaml          # one process, no launcher

Bad configs (unknown key, wrong type, missing file, K that does not match the data) end with one line
on stderr and exit code 2 before any process group starts.
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny.yaml")
    # The DeepSpeed launcher appends --local_rank=N; the rank itself is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)

    from degla_scale.config import ConfigError, load_config
    from degla_scale.data.reader import DataError

    try:
        cfg = load_config(args.config, overrides)
        from degla_scale.trainer import preflight, train

        preflight(cfg)
    except (ConfigError, DataError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
