"""Compile gate: every Triton kernel × config × dtype × arch builds for real GPUs, on this CPU machine.

Runs benchmarks/kernel_compile.py in a clean process (compiling needs TRITON_INTERPRET unset) and holds
each variant to: it compiles; shared memory within the arch's per-block limit; zero spill bytes;
for 16-bit dots the arch's tensor-core instruction (mma.sync / wgmma / tcgen05) in the PTX. Cold, the
126 builds take about a minute on 2 cores; Triton's content-keyed cache makes a rerun seconds.
"""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels.clip_loss as cl
import kernels.grounded_loss as gl

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024, "sm_100a": 227 * 1024}  # per-block shared memory opt-in limit
TENSOR_CORE_OP = {"sm_80": "mma.sync", "sm_90a": "wgmma", "sm_100a": "tcgen05"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/kernel_compile.py", "--jobs", str(os.cpu_count()), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert out.exists(), proc.stderr[-2000:]
    return json.loads(out.read_text()), proc


def kernel_names(module) -> set[str]:
    """The module's launchable Triton kernels (JIT functions named *_kernel; helpers are inlined into them)."""
    return {name for name, obj in vars(module).items() if name.endswith("_kernel") and hasattr(obj, "fn")
            and inspect.isfunction(obj.fn)}


def test_every_kernel_config_dtype_and_arch_is_built(builds):
    rows, _ = builds
    fwd = sum(len(c) for c in cl.GPU_FWD_CONFIGS["16bit"].values()) * 2 + sum(len(c) for c in cl.GPU_FWD_CONFIGS["fp32"].values()) * 2
    bwd = len(cl.GPU_BWD_CONFIGS["16bit"]) * 2 + len(cl.GPU_BWD_CONFIGS["fp32"]) * 2  # fp32 twice: IEEE and TF32
    grounded = 4 * 3  # four embedding widths × three dtypes
    counts = {k: sum(r["kernel"] == k for r in rows) for k in ("lse_fwd", "dscores", "grounded")}
    assert counts == {"lse_fwd": 3 * fwd, "dscores": 3 * bwd, "grounded": 3 * grounded}
    assert {r["arch"] for r in rows} == set(ARCHS) and {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    assert kernel_names(cl) | kernel_names(gl) == {"_lse_fwd_kernel", "_dscores_kernel", "_grounded_kernel"}, \
        "a new kernel must be added to kernels/aot.py"


def test_every_variant_compiles_fits_and_does_not_spill(builds):
    rows, proc = builds
    bad = []
    for r in rows:
        if r["error"]:
            bad.append(f"{r['label']}: {r['error']}")
            continue
        if r["shared_bytes"] > ARCHS[r["arch"]]:
            bad.append(f"{r['label']}: shared {r['shared_bytes']} B")
        if r["local_bytes"] or r["stack_bytes"]:
            bad.append(f"{r['label']}: spills {r['local_bytes']} B local, {r['stack_bytes']} B stack")
        if r["uses_dot"] and r["dtype"] != "fp32" and r["tensor_cores"] is not True:
            bad.append(f"{r['label']}: no {TENSOR_CORE_OP[r['arch']]}")
        assert r["registers"] > 0 and r["blocks_per_sm"] >= 1, r["label"]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-2000:]
