"""Shared benchmark plumbing: timing percentiles, memory, the environment line, CSV rows, plots.

Every result row carries the device name, torch/triton versions, date and the exact command, so a CSV
says where each number came from. Results go to --out (default runs/benchmarks/, not tracked by git);
`--results benchmarks/results` records them in the committed folder.
"""
from __future__ import annotations

import csv
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

OUT = Path("runs/benchmarks")  # relative to where the benchmark is run; benchmarks/results/ is the committed record
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_output_args(parser, name: str) -> None:
    """--out (alias --results): the folder results are written to; --name: their file name stem."""
    parser.add_argument("--out", "--results", dest="out", type=Path, default=OUT,
                        help=f"folder for the results (default {OUT}/); --results benchmarks/results records them "
                             "in the committed folder")
    parser.add_argument("--name", default=name, help="file name stem of the results (default %(default)s)")


def print_written(*paths: Path) -> None:
    print("wrote " + ", ".join(str(p) for p in paths))


def kernel_sweep_args(argv, description: str, default_K: list[int], tiny_K: list[int], name: str,
                      extra: list[tuple[str, dict]] = (), needs_device=lambda args: True):
    """The kernel benchmarks' shared command line: B/K/D sweep, dtype, reps, --tiny CPU smoke run, output,
    and `extra` (flag, add_argument keywords) of the script's own; `needs_device(args)` False skips the device check;
    → (parsed args with --tiny applied, the device to run on: see `device_for_kernels`)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--B", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--K", type=int, nargs="+", default=default_K)
    parser.add_argument("--D", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help=f"CPU smoke run: B ∈ {{16, 32}}, K ∈ {set(tiny_K)}, D=32, 3 reps")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    add_output_args(parser, name)
    args = parser.parse_args(argv)
    device = device_for_kernels(parser, args.tiny) if needs_device(args) else "cpu"
    if args.tiny:
        args.B, args.K, args.D, args.reps = [16, 32], tiny_K, [32], 3
    return args, device

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; SXM unless named).
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


# HBM bandwidth, TB/s (vendor datasheets; SXM unless named): the memory roofline of the traffic models.
HBM_TBPS = {"H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8, "A100": 2.04, "L40S": 0.864, "A10": 0.6}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)" + (", Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "")


def _for_device(table: dict[str, float]) -> float | None:
    name = device_name()
    for key in sorted(table, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return table[key]
    return None


def bf16_peak_tflops() -> float | None:
    return _for_device(BF16_PEAK_TFLOPS)


def hbm_tbps() -> float | None:
    return _for_device(HBM_TBPS)


def environment() -> dict:
    import triton

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join(["TRITON_INTERPRET=1"] * (os.environ.get("TRITON_INTERPRET") == "1") +
                                ["python", *sys.argv])}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentiles(samples_ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else samples_ms * 9
    return q[1], statistics.median(samples_ms), q[7]  # p20, p50, p80


def time_phases(make_inputs: Callable, loss_fn: Callable, reps: int, warmup: int = 2) -> dict[str, tuple]:
    """p20/p50/p80 in ms of forward, backward and both, each rep on fresh leaf inputs."""
    fwd, bwd, both = [], [], []
    for rep in range(warmup + reps):
        args = make_inputs()
        _sync()
        t0 = time.perf_counter()
        loss = loss_fn(*args)
        _sync()
        t1 = time.perf_counter()
        loss.backward()
        _sync()
        t2 = time.perf_counter()
        if rep >= warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            both.append((t2 - t0) * 1e3)
        del loss, args
    return {"fwd": percentiles(fwd), "bwd": percentiles(bwd), "both": percentiles(both)}


def peak_memory_mib(make_inputs: Callable, loss_fn: Callable) -> tuple[float, float] | tuple[None, None]:
    """GPU memory of one forward + backward: (peak above the inputs, peak above inputs + their gradients).

    The first counts the gradients every implementation must produce; the second is the working memory
    the loss itself needs (logits for eager, tiles and chunks for the kernel). (None, None) on CPU."""
    if not torch.cuda.is_available():
        return None, None
    args = make_inputs()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = loss_fn(*args)
    loss.backward()
    del loss
    torch.cuda.synchronize()
    peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    return (peak - base) / 2**20, (peak - after) / 2**20


def saved_for_backward_mib(make_inputs: Callable, loss_fn: Callable) -> float:
    """Bytes autograd keeps between forward and backward (any device): the O(B·N) vs O((B+N)·D) test."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t
    args = make_inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(*args)
    return sum(sizes) / 2**20


def measure(make_inputs: Callable, loss_fn: Callable, reps: int) -> dict | None:
    """Timing percentiles and memory of one implementation at one shape, as CSV fields (None: out of memory)."""
    try:
        times = time_phases(make_inputs, loss_fn, reps)
        memory, working = peak_memory_mib(make_inputs, loss_fn)
        saved = saved_for_backward_mib(make_inputs, loss_fn)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    fields = {f"{phase}_{q}_ms": round(v, 4) for phase in ("fwd", "bwd", "both")
              for q, v in zip(("p20", "p50", "p80"), times[phase])}
    fields.update(peak_mem_mib=round(memory, 1) if memory is not None else "",
                  working_mem_mib=round(working, 1) if working is not None else "", saved_mib=round(saved, 3))
    return fields


def device_for_kernels(parser, tiny: bool) -> str:
    """"cuda", or "cpu" for the --tiny run under Triton's interpreter; otherwise exit 2 with what to add."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("no GPU: set TRITON_INTERPRET=1 (before Python starts) to run the kernel under Triton's "
                     "interpreter, with --tiny")
    if not tiny:
        parser.exit(2, f"{parser.prog}: no GPU, and the default shapes are GPU-sized (far too slow under "
                       "Triton's interpreter): add --tiny for the CPU smoke run\n")
    return "cpu"


def append_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fields = list(rows[0]) if new else next(csv.reader(path.open()))  # append in the file's own column order
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)  # a column the file lacks raises instead of shifting cells
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def plot_p50(rows: list[dict], path: Path, title: str, panel_keys: tuple[str, ...], x_key: str = "B") -> Path:
    """One panel per combination of `panel_keys`; p50 of forward+backward per implementation with its p20–p80 band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({tuple(r[k] for k in panel_keys) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in rows if tuple(r[k] for k in panel_keys) == panel and r["both_p50_ms"] != ""]
        for impl in sorted({r["impl"] for r in mine}):
            pts = sorted((r[x_key], r["both_p20_ms"], r["both_p50_ms"], r["both_p80_ms"]) for r in mine if r["impl"] == impl)
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[2] for p in pts], marker="o", label=impl)
            ax.fill_between(xs, [p[1] for p in pts], [p[3] for p in pts], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel("forward + backward, ms (p50, p20–p80)")
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel)))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
