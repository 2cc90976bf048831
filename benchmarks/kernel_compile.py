"""Compile every Triton kernel variant for sm_80 / sm_90a / sm_100a on this machine (no GPU needed).

    python benchmarks/kernel_compile.py                          # check: exit 1 if any variant fails
    python benchmarks/kernel_compile.py --md benchmarks/results/kernel_compile.md   # and write the table

Each variant (kernel × config × dtype × flags × arch, kernels/aot.py) must compile, fit the arch's
per-block shared memory, spill nothing, and (16-bit dots) use the arch's tensor-core instruction. The
table lists registers, shared memory and resident programs per SM for each. Triton's cache makes a
rerun of unchanged kernels a cache read.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs real JIT functions, not the interpreter's
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import aot  # noqa: E402


def markdown(builds: list[aot.Build], command: str, seconds: float) -> str:
    import torch
    import triton

    lines = ["# Kernel compile report\n",
             f"- Command: `{command}`",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
             f"triton {triton.__version__}, torch {torch.__version__}; built on the CPU, no GPU",
             f"- {len(builds)} variants, {sum(not b.problems for b in builds)} pass, {seconds:.0f} s "
             f"({os.cpu_count()} cores); checks: compiles, shared ≤ per-block limit, 0 spill bytes, tensor-core op",
             "- Occupancy: resident programs per SM from registers, shared memory and threads (an upper bound)\n",
             "| kernel | dtype | arch | meta | warps | stages | regs | shared KiB | programs/SM | tensor cores | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in builds:
        v = b.variant
        meta = " ".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in v.constexprs)
        tc = {None: "n/a", True: aot.TENSOR_CORE_OP[v.arch], False: "**none**"}[b.tensor_cores]
        lines.append(f"| {v.kernel} | {v.dtype} | {v.arch} | {meta} | {v.num_warps} | {v.num_stages} | {b.registers} | "
                     f"{b.shared_bytes / 1024:.1f} | {b.blocks_per_sm} | {tc} | {'; '.join(b.problems) or 'ok'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel builds (default: all cores)")
    parser.add_argument("--md", type=Path, help="write the table here (benchmarks/results/kernel_compile.md)")
    parser.add_argument("--json", type=Path, help="write every build's figures here")
    args = parser.parse_args(argv)
    variants = aot.variants()
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        builds = list(pool.map(aot.build, variants, chunksize=4))
    seconds = time.perf_counter() - start
    failed = [b for b in builds if b.problems]
    for b in failed:
        print(f"FAIL {b.variant.label}: {'; '.join(b.problems)}")
    print(f"{len(builds) - len(failed)}/{len(builds)} variants pass ({seconds:.0f} s, {args.jobs} jobs)")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(builds, "python " + " ".join(sys.argv), seconds))
        print(f"wrote {args.md}")
    if args.json:
        args.json.write_text(json.dumps([b.row() for b in builds], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
