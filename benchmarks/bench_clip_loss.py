"""Global contrastive loss with hard negatives: fused Triton kernel vs eager, torch.compile, open_clip, Inf-CL.

    python benchmarks/bench_clip_loss.py                 # GPU: B ∈ {1024, 4096, 16384}, K ∈ {0, 4}, D ∈ {512, 768, 1024}
    TRITON_INTERPRET=1 python benchmarks/bench_clip_loss.py --tiny   # CPU: tiny shapes, proves the script end to end

Per (implementation, B, K, D): forward, backward and both at p20/p50/p80 (ms); effective TFLOP/s
counted as 8·B·N·D per forward+backward (N = B·(1+K) texts; forward 2BND, backward 6BND) and as % of the
GPU's dense bf16 peak; peak GPU memory above the inputs, and above inputs + gradients (the working
memory of the loss itself); the bytes saved for backward (any device). The sweep also runs the
data-parallel shape (--dp b:C, default 256 local rows × 81920 gathered columns: 64 ranks, K=4), where
one rank's rows meet every rank's texts.

For the fused kernel each shape also prints its traffic model: the HBM bytes a forward and a backward
must move (inputs once, partial LSEs, the s·dS chunks written once and read by two GEMMs, the fp32 dI
accumulator read and written per chunk, dT written once) against the time its FLOPs take at peak.
Rows are appended to OUT/clip_loss.csv (--out, default runs/benchmarks/), and a plot is written beside it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (BF16_PEAK_TFLOPS, DTYPES, HBM_TBPS, append_rows, bf16_peak_tflops, hbm_tbps, kernel_sweep_args,  # noqa: E402
                               environment, measure, plot_p50, print_written)
from kernels.clip_loss import backward_chunk, clip_loss, clip_loss_ref  # noqa: E402
from kernels.launch_plan import forward_plan  # noqa: E402

DP_SHAPE = "256:81920"  # b local rows : C gathered columns (64 ranks × 256 × (1 + 4))


def traffic_model(b: int, C: int, D: int, element_size: int, num_sms: int = 132) -> dict:
    """HBM bytes of one fused forward and backward (each input read once per pass: L2 serves the re-reads
    within a wave), and the FLOPs: forward 2bCD, backward 6bCD (S recomputed, then the dI and dT GEMMs)."""
    from kernels.clip_loss import GPU_FWD_CONFIGS

    e = element_size
    plan = forward_plan(b, C, D, num_sms, list(GPU_FWD_CONFIGS["16bit" if e == 2 else "fp32"]))
    num_pos = C  # an upper bound on the positive columns' partials
    fwd = (b + C) * D * e + 4 * (plan.splits * b + plan.row_blocks * num_pos) * 2  # partials written, then merged
    chunk = backward_chunk(b, C, D, e, None)
    chunks = -(-C // chunk)
    bwd = ((b + C) * D * e          # recompute S
           + 3 * b * C * e          # s·dS written once, read by the dI and the dT GEMM
           + C * D * e              # T read by the dI GEMM
           + chunks * b * D * (8 + e)  # fp32 dI accumulator read + written, and I read by the dT GEMM, per chunk
           + C * D * e)             # dT written once
    return {"fwd_mb": round(fwd / 1e6, 1), "bwd_mb": round(bwd / 1e6, 1), "chunks": chunks,
            "fwd_gflop": 2 * b * C * D / 1e9, "bwd_gflop": 6 * b * C * D / 1e9}


def roofline_line(model: dict, peak_tflops: float | None, tbps: float | None) -> str:
    """'fwd 37.7 MB = 0.011 ms at 3.35 TB/s vs 0.130 ms of FLOPs at 989 TFLOP/s; bwd …'."""
    parts = []
    for phase in ("fwd", "bwd"):
        mb, gflop = model[f"{phase}_mb"], model[f"{phase}_gflop"]
        if peak_tflops and tbps:
            parts.append(f"{phase} {mb:,.1f} MB = {mb / 1e3 / tbps:.3f} ms at {tbps} TB/s vs "
                         f"{gflop / peak_tflops:.3f} ms of FLOPs at {peak_tflops:g} TFLOP/s")
        else:
            parts.append(f"{phase} {mb:,.1f} MB, {gflop:,.2f} GFLOP")
    return "; ".join(parts) + f" ({model['chunks']} backward chunks)"


def implementations(K: int, on_gpu: bool, num_pos: int) -> dict:
    """name → loss(img_BD, txt_ND, logit_scale) for one process (num_pos positives among the columns)."""
    impls = {
        "fused": lambda img, txt, s: clip_loss(img, txt, s.exp(), num_pos=num_pos),
        "eager": lambda img, txt, s: clip_loss_ref(img, txt, s.exp(), num_pos=num_pos, upcast=False),
    }
    if on_gpu:  # compiling for the CPU takes minutes per shape; the CPU run only proves the script
        compiled = torch.compile(lambda img, txt, s: clip_loss_ref(img, txt, s.exp(), num_pos=num_pos, upcast=False))
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


def shapes(args) -> list[tuple[str, int, int, int, int]]:
    """(kind, b rows, K, D, C columns): the global sweep (b = B, C = B·(1+K)), then the data-parallel shape(s)."""
    out = [("global", B, K, D, B * (1 + K)) for K in args.K for D in args.D for B in args.B]
    for spec in args.dp:
        b, C = (int(x) for x in spec.split(":"))
        out += [("data-parallel", b, 4, D, C) for D in args.D if D == 768 or len(args.D) == 1]
    return out


def main(argv=None) -> list[dict]:
    args, device = kernel_sweep_args(argv, __doc__.split("\n")[0], default_K=[0, 4], tiny_K=[0, 2], name="clip_loss",
                                     extra=[("--dp", {"nargs": "*", "default": [DP_SHAPE],
                                                      "help": "data-parallel shapes b:C (default %(default)s)"}),
                                            ("--model", {"metavar": "GPU", "choices": sorted(HBM_TBPS),
                                                         "help": "print only the traffic model of the shapes for this "
                                                                 "GPU's datasheet peak and bandwidth (no GPU needed)"})],
                                     needs_device=lambda a: a.model is None)
    if args.model:
        for kind, b, K, D, C in shapes(args):
            model = traffic_model(b, C, D, DTYPES[args.dtype].itemsize)
            line = roofline_line(model, BF16_PEAK_TFLOPS[args.model], HBM_TBPS[args.model])
            print(f"{args.model} {args.dtype} {kind} b={b} C={C} D={D}: {line}")
        return []
    if args.tiny:
        args.dp = ["16:160"]
    on_gpu = device == "cuda"
    dtype = DTYPES[args.dtype]
    env, peak, tbps = environment(), bf16_peak_tflops(), hbm_tbps()
    rows = []
    for kind, b, K, D, C in shapes(args):
        num_pos = C // (1 + K)

        def make_inputs():
            g = torch.Generator(device=device).manual_seed(0)
            img = torch.nn.functional.normalize(torch.randn(b, D, device=device, generator=g), dim=-1)
            txt = torch.nn.functional.normalize(torch.randn(C, D, device=device, generator=g), dim=-1)
            return (img.to(dtype).requires_grad_(True), txt.to(dtype).requires_grad_(True),
                    torch.tensor(2.66, device=device, requires_grad=True))
        model = traffic_model(b, C, D, dtype.itemsize)
        print(f"  traffic model {kind} b={b} C={C} D={D}: {roofline_line(model, peak, tbps)}", flush=True)
        impls = implementations(K, on_gpu, num_pos) if kind == "global" else \
            {k: v for k, v in implementations(K, on_gpu, num_pos).items() if k in ("fused", "eager", "compile")}
        for name, fn in impls.items():
            if name in ("open_clip", "inf_cl"):  # plain CLIP: only the B positives
                fn = (lambda f: lambda img, txt, s: f(img, txt[:img.shape[0]], s))(fn)
            fields = measure(make_inputs, fn, args.reps)
            if fields is None:
                print(f"{name:>9} {kind} b={b} C={C} D={D}: out of memory")
                continue
            tflops = 8 * b * C * D / (fields["both_p50_ms"] * 1e-3) / 1e12
            row = {**env, "impl": name, "shape": kind, "B": b, "K": K, "D": D, "C": C, "dtype": args.dtype, **fields,
                   "tflops": float(f"{tflops:.4g}"), "pct_bf16_peak": round(100 * tflops / peak, 1) if peak else "",
                   **({"fwd_mb": model["fwd_mb"], "bwd_mb": model["bwd_mb"]} if name == "fused" else {"fwd_mb": "", "bwd_mb": ""})}
            rows.append(row)
            print(f"{name:>9} {kind:>13} b={b:>5} C={C:>6} D={D:>4}: fwd+bwd p50 {row['both_p50_ms']:9.3f} ms  "
                  f"{tflops:9.4g} TFLOP/s  peak {row['peak_mem_mib'] or 'n/a'} MiB  saved {row['saved_mib']} MiB",
                  flush=True)
    path = append_rows(args.out / f"{args.name}.csv", rows)
    plot = plot_p50([r for r in rows if r["shape"] == "global"], args.out / f"{args.name}.png",
                    f"global contrastive loss, {args.dtype} — {env['device']}", ("K", "D"))
    print_written(path, plot)
    return rows


if __name__ == "__main__":
    main()
