"""One DeGLA training step on synthetic inputs: samples/s, MFU, and where the time goes.

    deepspeed --num_gpus 1 benchmarks/bench_train_step.py --config configs/vitl14.yaml
    python benchmarks/bench_train_step.py --config configs/tiny.yaml --steps 5      # CPU smoke run

The step is the trainer's own (its engine, optimizer, teacher and loss), fed random uint8 images and
token ids of the configured shapes from pinned memory, as the loader hands them over, the images
normalised on the device as the trainer does (DeviceNormalize). It is timed phase by phase with device
synchronisation: data (host → device, normalisation), teacher forward, student forward + loss,
backward, optimizer step, EMA update. MFU counts the model's forward FLOPs (torch's FlopCounterMode on
one forward) as student 3× (forward + backward) plus teacher 1×, over the step time, against the GPU's
dense bf16 peak. Weights are random (nothing is downloaded).
Peak memory (max allocated) is reported beside the memory planner's prediction for the same config
(`planned_peak_mib`, degla_scale/memory_plan.py as benchmarks/memory_plan.py prints it).
Rows are appended to OUT/train_step.csv (--out, default runs/benchmarks/), with a stacked-bar plot of the phases.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (add_output_args, append_rows, bf16_peak_tflops, environment, percentiles,  # noqa: E402
                               print_written)
from degla_scale.config import load_config  # noqa: E402
from degla_scale.engine import build_engine, init_runtime  # noqa: E402  (picks the DeepSpeed accelerator first)
from degla_scale.data.images import DeviceNormalize  # noqa: E402
from degla_scale.models import train_image_transform  # noqa: E402
from degla_scale.trainer import objective_loss, resolve_auto_batch  # noqa: E402
from degla_scale import distributed as D  # noqa: E402

PHASES = ("data", "teacher_fwd", "student_fwd", "backward", "optimizer", "ema")


def synthetic_batch(clip, b: int, K: int, generator: torch.Generator, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [b, 3, S, S] and token ids [b·(1+K), L] as the loader delivers them (pinned for a CUDA step)."""
    size = clip.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randint(0, 256, (b, 3, *size), generator=generator, dtype=torch.uint8)
    tokens = torch.randint(1, clip.vocab_size, (b * (1 + K), clip.context_length), generator=generator)
    return (images.pin_memory(), tokens.pin_memory()) if pin else (images, tokens)


def forward_flops(module, images, tokens) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(images, tokens)
    return counter.get_total_flops()


def planned_peak_mib(cfg, world: int, on_gpu: bool) -> float:
    """The memory planner's predicted peak for this config (degla_scale/memory_plan.py, the model behind
    benchmarks/memory_plan.py): a meta-device forward, so no memory and well under a second."""
    from degla_scale.memory_plan import plan

    return round(plan(cfg, world, on_gpu=on_gpu).total / 2**20, 1)


def plot_phases(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 2), 3.8))
    labels = [f"{r['model']}\nb={r['batch']} K={r['K']} z{r['zero_stage']}" for r in rows]
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        heights = [r[f"{phase}_p50_ms"] for r in rows]
        ax.bar(labels, heights, bottom=bottom, label=phase)
        bottom = [a + h for a, h in zip(bottom, heights)]
    ax.set_ylabel("ms per step (p50 of each phase)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=3)
    add_output_args(parser, "train_step")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    device, bf16 = init_runtime(cfg)
    cfg = resolve_auto_batch(cfg, D.world_size())  # data.batch_size=auto, as the trainer resolves it
    engine, teacher = build_engine(cfg, device, bf16, total_steps=args.warmup + args.steps, load_weights=False)
    b, K = cfg.data.batch_size, cfg.data.num_negatives
    clip = engine.module.clip
    generator = torch.Generator().manual_seed(D.rank())
    host_images, host_tokens = synthetic_batch(clip, b, K, generator, pin=device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    transform = train_image_transform(cfg.model)
    normalize = DeviceNormalize(transform.mean, transform.std, device)  # the trainer's: uint8 crosses, fp32 maths there
    flops_fwd = forward_flops(engine.module, normalize(host_images[:1].to(device), dtype), host_tokens[:1 + K].to(device)) * b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "step")}
    for step in range(args.warmup + args.steps):
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())
        images = normalize(host_images.to(device, non_blocking=True), dtype)
        tokens = host_tokens.to(device, non_blocking=True)
        mark()
        t_img = t_txt = None
        if teacher is not None:
            t_img, t_txt = teacher.encode(images, tokens)
        mark()
        img, txt, scale = engine(images, tokens)
        out = objective_loss(cfg, img, txt, scale, t_img, t_txt)
        mark()
        engine.backward(out.total)
        mark()
        engine.step()
        mark()
        if teacher is not None:
            teacher.update(engine.module)
        mark()
        if step >= args.warmup:
            for phase, t0, t1 in zip(PHASES, marks, marks[1:]):
                times[phase].append((t1 - t0) * 1e3)
            times["step"].append((marks[-1] - marks[0]) * 1e3)

    step_ms = percentiles(times["step"])
    model_flops = (3 + (teacher is not None)) * flops_fwd  # student forward + backward ≈ 3×, teacher forward 1×
    tflops = model_flops / (step_ms[1] * 1e-3) / 1e12
    peak = bf16_peak_tflops()
    row = {**environment(), "model": cfg.model.name, "batch": b, "K": K, "world": D.world_size(),
           "zero_stage": cfg.zero.stage, "offload_optimizer": cfg.zero.offload_optimizer, "bf16": bf16,
           "grad_checkpointing": cfg.model.grad_checkpointing, "compile": cfg.model.compile, "backend": cfg.objective.backend,
           "step_p20_ms": round(step_ms[0], 3), "step_p50_ms": round(step_ms[1], 3), "step_p80_ms": round(step_ms[2], 3),
           "samples_per_s": round(b * D.world_size() / (step_ms[1] * 1e-3), 2),
           "fwd_gflops_per_sample": round(flops_fwd / b / 1e9, 3), "tflops": float(f"{tflops:.4g}"),
           "mfu_pct": round(100 * tflops / peak, 2) if peak else "",
           "max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else "",
           "planned_peak_mib": planned_peak_mib(cfg, D.world_size(), on_gpu=device.type == "cuda")}
    for phase in PHASES:
        row[f"{phase}_p50_ms"] = round(percentiles(times[phase])[1], 3)
    # the teacher refresh runs every teacher.refresh_every steps, so the EMA phase's median can miss it
    row["ema_mean_ms"] = round(sum(times["ema"]) / len(times["ema"]), 3)
    if D.rank() == 0:
        path = append_rows(args.out / f"{args.name}.csv", [row])
        plot = plot_phases([row], args.out / f"{args.name}.png", f"DeGLA step — {row['device']}")
        breakdown = "  ".join(f"{p} {row[f'{p}_p50_ms']:.1f}" for p in PHASES)
        print(f"{cfg.model.name} b={b} K={K} ZeRO-{cfg.zero.stage}: step p50 {row['step_p50_ms']:.1f} ms, "
              f"{row['samples_per_s']} samples/s, {tflops:.3g} TFLOP/s, MFU {row['mfu_pct'] or 'n/a'}%\n"
              f"  phases (ms, p50): {breakdown}\n"
              f"  peak memory {row['max_allocated_mib'] or 'n/a'} MiB, planned {row['planned_peak_mib']} MiB")
        print_written(path, plot)
    return row


if __name__ == "__main__":
    main()
