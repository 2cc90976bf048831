"""Per-sample IGC + TGC + distillation: fused Triton kernel vs eager and torch.compile.

    python benchmarks/bench_grounded_loss.py              # GPU: b ∈ {1024, 4096, 16384}, K=4, D ∈ {512, 768, 1024}
    TRITON_INTERPRET=1 python benchmarks/bench_grounded_loss.py --tiny   # CPU smoke run

The kernel is bandwidth-bound: it reads the student and teacher rows of every sample once and writes
their gradients. Effective bandwidth = those bytes / (forward + backward time), reported against the
device's copy bandwidth measured in the same run (a large device-to-device clone).
Rows are appended to OUT/grounded_loss.csv (--out, default runs/benchmarks/), and a plot is written beside it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (DTYPES, append_rows, environment, kernel_sweep_args,  # noqa: E402
                               measure, plot_p50, print_written)
from kernels.grounded_loss import grounded_loss, grounded_loss_ref  # noqa: E402

WEIGHTS = (0.1, 0.1, 0.005)  # igc, tgc, distill: the paper's


def copy_bandwidth_gbs(device: str, mib: int) -> float:
    """Read + write bytes per second of a large clone: the practical ceiling for a bandwidth-bound kernel."""
    x = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.clone()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() / best / 1e9


def main(argv=None) -> list[dict]:
    args, device = kernel_sweep_args(argv, __doc__.split("\n")[0], default_K=[4], tiny_K=[2], name="grounded_loss")
    on_gpu = device == "cuda"
    dtype = DTYPES[args.dtype]
    env = environment()
    ceiling = copy_bandwidth_gbs(device, 1024 if on_gpu else 64)
    print(f"copy bandwidth: {ceiling:.1f} GB/s")
    impls = {"fused": grounded_loss, "eager": lambda *a: grounded_loss_ref(*a, upcast=False)}
    if on_gpu:
        impls["compile"] = torch.compile(lambda *a: grounded_loss_ref(*a, upcast=False))
    rows = []
    for K in args.K:
        for D in args.D:
            for b in args.B:
                N = b * (1 + K)

                def make_inputs():
                    g = torch.Generator(device=device).manual_seed(0)
                    rand = lambda n: torch.nn.functional.normalize(torch.randn(n, D, device=device, generator=g), dim=-1).to(dtype)  # noqa: E731
                    return (rand(b).requires_grad_(True), rand(N).requires_grad_(True),
                            torch.tensor(14.3, device=device, requires_grad=True), rand(b), rand(N))
                # student + teacher rows read once, their gradients written once
                moved = (2 * (b + N) * D + (b + N) * D) * torch.finfo(dtype).bits // 8
                for name, fn in impls.items():
                    loss = lambda img, txt, s, ti, tt, fn=fn: fn(img, txt, s, ti, tt, K, *WEIGHTS)[0]  # noqa: E731
                    fields = measure(make_inputs, loss, args.reps)
                    if fields is None:
                        print(f"{name:>8} b={b} K={K} D={D}: out of memory")
                        continue
                    gbs = moved / (fields["both_p50_ms"] * 1e-3) / 1e9
                    row = {**env, "impl": name, "B": b, "K": K, "D": D, "dtype": args.dtype, **fields,
                           "gbs": float(f"{gbs:.4g}"), "copy_gbs": round(ceiling, 1),
                           "pct_copy_bw": round(100 * gbs / ceiling, 2)}
                    rows.append(row)
                    print(f"{name:>8} b={b:>5} K={K} D={D:>4}: fwd+bwd p50 {row['both_p50_ms']:9.3f} ms  {gbs:9.4g} GB/s "
                          f"({row['pct_copy_bw']}% of copy)  peak {row['peak_mem_mib'] or 'n/a'} MiB", flush=True)
    path = append_rows(args.out / f"{args.name}.csv", rows)
    plot = plot_p50(rows, args.out / f"{args.name}.png", f"grounded terms (IGC+TGC+distill), {args.dtype} — {env['device']}", ("K", "D"))
    print_written(path, plot)
    return rows


if __name__ == "__main__":
    main()
