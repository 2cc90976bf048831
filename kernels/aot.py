"""Ahead-of-time builds of every kernel variant for real GPU targets, without a GPU.

A variant is one kernel × one config (or launch shape) × input dtype × flags × architecture, compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` and the divisibility attributes the
JIT passes at training sizes (16-aligned pointers and integers), so the binary is the one a GPU would
run. From it: registers, local memory (spills) and stack from `cuobjdump --dump-resource-usage`, the
shared memory Triton allocates, an occupancy estimate, and whether the arch's tensor-core instruction is
in the PTX. Triton's own cache is keyed by content (source, signature, options), so a second build of an
unchanged variant is a cache read.

Import this only with TRITON_INTERPRET unset: under the interpreter `triton.jit` returns interpreted
functions, which cannot be compiled (benchmarks/kernel_compile.py runs it in a clean subprocess).
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import clip_loss, grounded_loss
from kernels.tuning import family

ARCHS = {"sm_80": 80, "sm_90a": 90, "sm_100a": 100}
# Per-block shared memory a kernel may opt into, and per SM (CUDA programming guide, compute capabilities).
SMEM_PER_BLOCK = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024, "sm_100a": 227 * 1024}
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90a": 228 * 1024, "sm_100a": 228 * 1024}
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32
TENSOR_CORE_OP = {"sm_80": "mma.sync", "sm_90a": "wgmma", "sm_100a": "tcgen05"}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GROUNDED_WIDTHS = (512, 768, 1024, 1280)  # ViT-B/32 … bigG/14 embedding widths
GROUNDED_K = 4


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    arch: str
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int
    uses_dot: bool

    @property
    def label(self) -> str:
        flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        return f"{self.kernel} {self.dtype} {self.arch} {flags} w{self.num_warps} s{self.num_stages}"


@dataclass
class Build:
    variant: Variant
    seconds: float = 0.0
    registers: int = 0
    local_bytes: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    blocks_per_sm: int = 0
    tensor_cores: bool | None = None
    error: str = ""
    problems: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {**asdict(self.variant), "label": self.variant.label, **{k: v for k, v in asdict(self).items() if k != "variant"}}


def _torch_family(dtype: str) -> str:
    import torch

    return family(getattr(torch, TORCH_DTYPE[dtype]))


def variants(flags: bool = True) -> list[Variant]:
    """Every kernel × config × dtype × arch; flags=True adds the TF32 variants of the fp32 dots."""
    out = []
    for arch in ARCHS:
        for dtype in DTYPES:
            tf32_options = (False, True) if flags and dtype == "fp32" else (False,)
            for (bm, bn), cfgs in clip_loss.GPU_FWD_CONFIGS[_torch_family(dtype)].items():
                for cfg, tf32 in itertools.product(cfgs, tf32_options):
                    meta = {**cfg.kwargs, "BLOCK_M": bm, "BLOCK_N": bn, "ALLOW_TF32": tf32}
                    out.append(Variant("lse_fwd", dtype, arch, tuple(sorted(meta.items())), cfg.num_warps,
                                       cfg.num_stages, True))
            for cfg, tf32 in itertools.product(clip_loss.GPU_BWD_CONFIGS[_torch_family(dtype)], tf32_options):
                meta = {**cfg.kwargs, "ALLOW_TF32": tf32}
                out.append(Variant("dscores", dtype, arch, tuple(sorted(meta.items())), cfg.num_warps, cfg.num_stages, True))
            for D in GROUNDED_WIDTHS:
                launch = grounded_loss.launch_meta(GROUNDED_K, D)
                warps = launch.pop("num_warps")
                meta = {**launch, "HAS_IGC": True, "HAS_TGC": True, "HAS_DISTILL": True}
                out.append(Variant("grounded", dtype, arch, tuple(sorted(meta.items())), warps, 1, False))
    return out


# Argument kinds per kernel: "in" = a pointer to the input dtype, "f32p" = a pointer to fp32,
# "int" = a 32-bit integer the JIT sees 16-divisible at training sizes, "i32" = one it does not (K), "f32" = a float.
_ARGS = {
    "lse_fwd": (clip_loss._lse_fwd_kernel, {"img_ptr": "in", "txt_ptr": "in", "row_part_ptr": "f32p", "col_part_ptr": "f32p",
                                            "scale_ptr": "f32p"}),
    "dscores": (clip_loss._dscores_kernel, {"img_ptr": "in", "txt_ptr": "in", "row_lse_ptr": "f32p", "col_lse_ptr": "f32p",
                                            "ds_ptr": "in", "scale_ptr": "f32p", "coef_ptr": "f32p"}),
    "grounded": (grounded_loss._grounded_kernel, {"img_ptr": "in", "txt_ptr": "in", "t_img_ptr": "in", "t_txt_ptr": "in",
                                                  "terms_ptr": "f32p", "d_img_ptr": "in", "d_txt_ptr": "in",
                                                  "d_scale_ptr": "f32p", "scale_ptr": "f32p", "tau": "f32", "c_igc": "f32",
                                                  "c_tgc": "f32", "c_distill": "f32", "K": "i32"}),
}


def _source(v: Variant) -> ASTSource:
    fn, kinds = _ARGS[v.kernel]
    constexprs = dict(v.constexprs)
    types = {"in": f"*{DTYPES[v.dtype]}", "f32p": "*fp32", "int": "i32", "i32": "i32", "f32": "fp32"}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind = kinds.get(name, "int")
        signature[name] = types[kind]
        if kind in ("in", "f32p", "int"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def blocks_per_sm(arch: str, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident programs per SM from registers (allocated per warp in units of 256), shared memory and
    threads; ignores the L1/shared carve-out choice, so an upper bound."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = REGS_PER_SM // max(1, regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM[arch] // shared_bytes if shared_bytes else MAX_BLOCKS_PER_SM
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, MAX_BLOCKS_PER_SM)


def build(v: Variant) -> Build:
    result = Build(v)
    start = time.perf_counter()
    try:
        compiled = triton.compile(_source(v), target=GPUTarget("cuda", ARCHS[v.arch], 32),
                                  options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    except Exception as exc:  # a build failure is a finding, reported with the variant
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        result.problems.append(f"does not compile: {result.error}")
        return result
    result.seconds = round(time.perf_counter() - start, 2)
    usage = _resource_usage(compiled.asm["cubin"])
    result.registers, result.local_bytes, result.stack_bytes = usage["REG"], usage["LOCAL"], usage["STACK"]
    result.shared_bytes = compiled.metadata.shared + usage["SHARED"]
    result.blocks_per_sm = blocks_per_sm(v.arch, result.registers, result.shared_bytes, v.num_warps)
    if v.uses_dot and v.dtype != "fp32":
        result.tensor_cores = TENSOR_CORE_OP[v.arch] in compiled.asm["ptx"]
    if result.local_bytes or result.stack_bytes:
        result.problems.append(f"spills: {result.local_bytes} B local, {result.stack_bytes} B stack per thread")
    if result.shared_bytes > SMEM_PER_BLOCK[v.arch]:
        result.problems.append(f"shared memory {result.shared_bytes} B > the {SMEM_PER_BLOCK[v.arch]} B limit")
    if result.tensor_cores is False:
        result.problems.append(f"no {TENSOR_CORE_OP[v.arch]} in the PTX")
    return result

