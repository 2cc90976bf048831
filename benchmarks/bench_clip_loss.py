"""Global contrastive loss with hard negatives: fused Triton kernel vs eager, torch.compile, open_clip, Inf-CL.

    python benchmarks/bench_clip_loss.py                 # GPU: B ∈ {1024, 4096, 16384}, K ∈ {0, 4}, D ∈ {512, 768, 1024}
    TRITON_INTERPRET=1 python benchmarks/bench_clip_loss.py --tiny   # CPU: tiny shapes, proves the script end to end

Per (implementation, B, K, D): forward, backward and both at p20/p50/p80 (ms); effective TFLOP/s
counted as 8·B·N·D per forward+backward (N = B·(1+K) texts; forward 2BND, backward 6BND) and as % of the
GPU's dense bf16 peak; peak GPU memory above the inputs, and above inputs + gradients (the working
memory of the loss itself); the bytes saved for backward (any device).
Rows are appended to OUT/clip_loss.csv (--out, default runs/benchmarks/), and a plot is written beside it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (DTYPES, append_rows, bf16_peak_tflops, kernel_sweep_args,  # noqa: E402
                               environment, measure, plot_p50, print_written)
from kernels.clip_loss import clip_loss, clip_loss_ref  # noqa: E402



def implementations(K: int, on_gpu: bool) -> dict:
    """name → loss(img_BD, txt_ND, logit_scale) for one process (num_pos = B)."""
    impls = {
        "fused": lambda img, txt, s: clip_loss(img, txt, s.exp(), num_pos=img.shape[0]),
        "eager": lambda img, txt, s: clip_loss_ref(img, txt, s.exp(), num_pos=img.shape[0], upcast=False),
    }
    if on_gpu:  # compiling for the CPU takes minutes per shape; the CPU run only proves the script
        compiled = torch.compile(lambda img, txt, s: clip_loss_ref(img, txt, s.exp(), num_pos=img.shape[0], upcast=False))
        impls["compile"] = compiled
    if K == 0:
        import open_clip

        clip_loss_oc = open_clip.loss.ClipLoss()
        impls["open_clip"] = lambda img, txt, s: clip_loss_oc(img, txt, s.exp())
        try:
            from inf_cl import cal_inf_loss  # optional: pip install inf_cl
        except ImportError:
            pass
        else:
            impls["inf_cl"] = lambda img, txt, s: (cal_inf_loss(img, txt, scale=s.exp()).mean() +
                                                    cal_inf_loss(txt, img, scale=s.exp()).mean()) / 2
    return impls


def main(argv=None) -> list[dict]:
    args, device = kernel_sweep_args(argv, __doc__.split("\n")[0], default_K=[0, 4], tiny_K=[0, 2], name="clip_loss")
    on_gpu = device == "cuda"
    dtype = DTYPES[args.dtype]
    env, peak = environment(), bf16_peak_tflops()
    rows = []
    for K in args.K:
        for D in args.D:
            for B in args.B:
                N = B * (1 + K)

                def make_inputs():
                    g = torch.Generator(device=device).manual_seed(0)
                    img = torch.nn.functional.normalize(torch.randn(B, D, device=device, generator=g), dim=-1)
                    txt = torch.nn.functional.normalize(torch.randn(N, D, device=device, generator=g), dim=-1)
                    return (img.to(dtype).requires_grad_(True), txt.to(dtype).requires_grad_(True),
                            torch.tensor(2.66, device=device, requires_grad=True))
                for name, fn in implementations(K, on_gpu).items():
                    if name in ("open_clip", "inf_cl"):  # plain CLIP: only the B positives
                        fn = (lambda f: lambda img, txt, s: f(img, txt[:img.shape[0]], s))(fn)
                    fields = measure(make_inputs, fn, args.reps)
                    if fields is None:
                        print(f"{name:>9} B={B} K={K} D={D}: out of memory")
                        continue
                    tflops = 8 * B * N * D / (fields["both_p50_ms"] * 1e-3) / 1e12
                    row = {**env, "impl": name, "B": B, "K": K, "D": D, "dtype": args.dtype, **fields,
                           "tflops": float(f"{tflops:.4g}"), "pct_bf16_peak": round(100 * tflops / peak, 1) if peak else ""}
                    rows.append(row)
                    print(f"{name:>9} B={B:>5} K={K} D={D:>4}: fwd+bwd p50 {row['both_p50_ms']:9.3f} ms  "
                          f"{tflops:9.4g} TFLOP/s  peak {row['peak_mem_mib'] or 'n/a'} MiB  saved {row['saved_mib']} MiB",
                          flush=True)
    path = append_rows(args.out / f"{args.name}.csv", rows)
    plot = plot_p50(rows, args.out / f"{args.name}.png", f"global contrastive loss, {args.dtype} — {env['device']}", ("K", "D"))
    print_written(path, plot)
    return rows


if __name__ == "__main__":
    main()
