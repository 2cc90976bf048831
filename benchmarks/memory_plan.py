"""Per-GPU memory plan for a DeGLA config: what each ZeRO stage and offload choice puts on a device.

    python benchmarks/memory_plan.py --config configs/vitl14.yaml --world-size 8 --gpu-memory-gib 80
    python benchmarks/memory_plan.py --config configs/vitbigg14.yaml --world-size 8 zero.offload_optimizer=cpu

The model of static bytes and the measured (meta-device) activations are in degla_scale/memory_plan.py,
which the trainer also uses for data.batch_size=auto.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import print_written  # noqa: E402
from degla_scale.config import load_config  # noqa: E402
from degla_scale.memory_plan import GIB, plan, resolve_batch_size  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--cpu", action="store_true", help="plan the CPU run (fp32, torch loss) instead of a GPU one")
    parser.add_argument("--json", type=Path, help="also write the plan here")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if cfg.data.batch_size == "auto":  # what the trainer would pick on this GPU size
        batch, line = resolve_batch_size(cfg, args.world_size, args.gpu_memory_gib * GIB, on_gpu=not args.cpu)
        print(line)
        cfg = replace(cfg, data=replace(cfg.data, batch_size=batch))
    result = plan(cfg, args.world_size, on_gpu=not args.cpu)
    rows = [("parameters", f"{result.params / 1e6:.2f} M"), ("weights", result.weights), ("gradients", result.gradients),
            ("optimizer", result.optimizer), ("teacher", result.teacher), ("static", result.static),
            (f"activations ×{result.batch}", result.batch * result.activations_per_sample),
            (f"loss ×{result.batch}", result.batch * result.loss_per_sample), ("total", result.total)]
    z = cfg.zero
    print(f"{cfg.model.name}, ZeRO-{z.stage}, {args.world_size} rank(s), optimizer offload {z.offload_optimizer}, "
          f"param offload {z.offload_params}, teacher offload {cfg.teacher.offload}, "
          f"grad checkpointing {cfg.model.grad_checkpointing}")
    for name, value in rows:
        print(f"  {name:<18} {value if isinstance(value, str) else f'{value / GIB:9.3f} GiB'}")
    fits = result.max_batch(args.gpu_memory_gib * GIB)
    print(f"  largest micro-batch in {args.gpu_memory_gib:g} GiB (10% reserve): {fits}")
    out = {**asdict(result), "static": result.static, "total": result.total, "max_batch": fits,
           "world_size": args.world_size, "gpu_memory_gib": args.gpu_memory_gib}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print_written(args.json)
    return out


if __name__ == "__main__":
    main()
