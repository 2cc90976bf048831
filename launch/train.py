"""Train CLIP with DeGLA.

    deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml [key=value ...]
    python launch/train.py --config configs/tiny.yaml run_dir=runs/mine   # one process, no launcher
    python launch/train.py --config configs/vitl14.yaml --check           # config, data, model: no training
    python launch/train.py --config configs/vitl14.yaml --print-config    # the resolved config as YAML

Any mistake in the config or data, found before or during training, ends with one line on stderr and
exit code 2. Every config key (`key=value` overrides) is listed below.
"""
import argparse
import sys


def main(argv=None) -> int:
    from degla_scale.config_reference import reference_text

    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, epilog="config keys:\n" + reference_text(),
                                     usage="%(prog)s --config FILE [--check | --print-config] [key=value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny.yaml")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, the data and the model name and weights, then exit (starts nothing)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # The DeepSpeed launcher appends --local_rank=N; the rank itself is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)

    from degla_scale import cli
    from degla_scale.config import load_config, to_yaml

    def run() -> int:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from degla_scale.trainer import preflight, train

        samples = preflight(cfg)
        if args.check:
            print(f"config OK: {cfg.model.name} ({cfg.model.pretrained or 'random init'}), {samples} samples per epoch "
                  f"with K={cfg.data.num_negatives}, run_dir {cfg.run_dir}")
            return 0
        train(cfg)
        return 0

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
