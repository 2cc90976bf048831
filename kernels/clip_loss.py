"""Fused global contrastive loss with hard negatives (docs/objective.md, term 1), and its reference.

Legend (one rank):
    b   rows: this rank's images                       B  positives over all ranks (= images)
    C   columns: the gathered texts, B positives then B·K negatives (sample-major)
    D   embedding width                                 S = s · I · Tᵀ  [b, C], never materialised

    loss = ( mean_i [LSE_c S_ic − S_i,o+i]  +  mean_{j local} [LSE_{all images} S_·j − S_j−o,j] ) / 2
    with o = the rank's row offset (its first sample's global index).

Forward: a 2-D grid (kernels/launch_plan.py): each program takes one block of rows and one run of
column tiles, streams S tiles (an fp32 accumulator over D chunks) with an online max/sum, and writes
each row's partial LSE over its columns; from the same tiles it writes the block's partial LSE of every
positive column over its rows. Partials are merged by logsumexp: row partials over the splits, column
partials over the row blocks and then over ranks (a [W, B] all-gather), so the t2i LSE covers every
image of every rank. The partial buffers are sized by the plan, which fixes the tile shape; the
autotuner only chooses BLOCK_K, warps and stages, so every config it times writes every slot.

Backward recomputes S in column chunks: a Triton kernel turns each S tile straight into s·dS (softmax
of the row plus, on positive columns, softmax of the column), written once in the input dtype; per
chunk one cuBLAS GEMM accumulates dI in place into a single fp32 [b, D] buffer and one writes dT
straight into its rows of the gradient. d(scale) = Σ dS ⊙ (I·Tᵀ) = Σ (dI ⊙ I) / s, from the finished dI:
no atomics, no extra output. dI and dT stay in cuBLAS rather than inside the kernel (flash-attention's
backward) because D (512–1280) is 4–10× an attention head: a program's [BLOCK_M, D] fp32 dI
accumulator does not fit on chip, so fusing would mean per-tile atomics on dI or recomputing S per D
slab. Memory: the saved tensors are the inputs plus b + B LSEs, O((b + C)·D); the transients are one
s·dS chunk of b × `chunk_columns` (by default `backward_chunk`) and the fp32 dI accumulator.

Multi-rank: rank r differentiates the t2i terms of *every* positive column through its own image rows,
so its gradients are not ∂L_r but their sum over ranks is ∂(Σ_r L_r): after the all-gather's
reduce-scatter of dT and the usual averaging over ranks the optimizer sees the one-process gradient,
as with the torch path. This assumes every rank back-propagates the same upstream gradient (data
parallelism does).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _rows_unit_stride
from kernels.launch_plan import forward_plan
from kernels.tuning import INTERPRET, Tuned, config, family

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_BYTES = 8 * 2**20  # s·dS chunk floor: enough columns per GEMM to keep tensor cores busy, little memory
INTERPRET_SMS = 4  # the SM count the launch plan assumes under the CPU interpreter (tests change it)

# The forward's configs per dtype family and tile (largest first: the launch plan picks the tile, the
# autotuner BLOCK_K, warps and stages); the backward's per family (its tile is autotuned). fp32's IEEE dot
# keeps its operands in registers: smaller tiles, narrower K, fewer stages. tests/kernels/test_compile.py
# builds every one of these for sm_80/sm_90a/sm_100a.
GPU_FWD_CONFIGS = {
    "16bit": {(128, 128): [config(8, 3, BLOCK_K=64), config(8, 4, BLOCK_K=32)],
              (64, 128): [config(4, 3, BLOCK_K=64), config(8, 3, BLOCK_K=64)],
              (64, 64): [config(4, 3, BLOCK_K=64), config(4, 4, BLOCK_K=32)]},
    "fp32": {(64, 128): [config(8, 2, BLOCK_K=32)],
             (64, 64): [config(8, 2, BLOCK_K=32), config(4, 2, BLOCK_K=16)]},
}
GPU_BWD_CONFIGS = {"16bit": [config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
                             config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)],
                   "fp32": [config(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), config(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16)]}
# The interpreter: small tiles, one config each (tests swap in several, with a benchmark that runs them).
_INTERPRET_FWD = {(32, 32): [config(1, 1, BLOCK_K=16)], (16, 16): [config(1, 1, BLOCK_K=16)]}
FWD_CONFIGS = {"16bit": _INTERPRET_FWD, "fp32": _INTERPRET_FWD} if INTERPRET else GPU_FWD_CONFIGS
BWD_CONFIGS = ({fam: [config(1, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)] for fam in FWD_CONFIGS} if INTERPRET else
               GPU_BWD_CONFIGS)


def fwd_group(fam: str, tile: tuple[int, int]) -> str:
    return f"{fam}/{tile[0]}x{tile[1]}"


INTERPRET_DOT: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _scores_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, D, stride_img, stride_txt,
                 BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """I[rows] · T[cols]ᵀ accumulated in fp32 over D in BLOCK_K chunks → [BLOCK_M, BLOCK_N]."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    img_rows = img_ptr + rows.to(tl.int64)[:, None] * stride_img  # int64: C·D passes 2³¹ at a million columns
    txt_rows = txt_ptr + cols.to(tl.int64)[:, None] * stride_txt
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(img_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        t = tl.load(txt_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if INTERPRET_DOT:  # the interpreter's bf16 dot returns garbage (triton 3.8); bf16 products are exact in fp32
            a, t = a.to(tl.float32), t.to(tl.float32)
        if ALLOW_TF32:
            acc = tl.dot(a, tl.trans(t), acc, input_precision="tf32")
        else:
            acc = tl.dot(a, tl.trans(t), acc, input_precision="ieee")
    return acc


@triton.jit
def _lse_fwd_kernel(img_ptr, txt_ptr, row_part_ptr, col_part_ptr, scale_ptr, b, C, P, D, tiles_per_split,
                    stride_img, stride_txt,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """Program (row block m, split s): row_part[s, rows] = LSE over the split's columns;
    col_part[m, positive cols of the split] = LSE over the block's rows."""
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)  # read on the device: no host sync for the learnable scale
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < b
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(C, n_begin + tiles_per_split * BLOCK_N)
    m_row = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        s_tile = scale * _scores_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, D, stride_img, stride_txt,
                                      BLOCK_K, BLOCK_M, BLOCK_N, ALLOW_TF32)
        s_row = tl.where(col_ok[None, :], s_tile, float("-inf"))
        m_new = tl.maximum(m_row, tl.max(s_row, axis=1))
        l_row = l_row * tl.exp(m_row - m_new) + tl.sum(tl.exp(s_row - m_new[:, None]), axis=1)
        m_row = m_new
        if n0 < P:  # a tile holding positive columns: their LSE over this block's rows
            s_col = tl.where(row_ok[:, None], s_tile, float("-inf"))
            m_col = tl.max(s_col, axis=0)
            lse_col = m_col + tl.log(tl.sum(tl.exp(s_col - m_col[None, :]), axis=0))
            tl.store(col_part_ptr + pid_m * P + cols, lse_col, mask=cols < P)
    tl.store(row_part_ptr + pid_s * b + rows, m_row + tl.log(l_row), mask=row_ok)


@triton.jit
def _dscores_kernel(img_ptr, txt_ptr, row_lse_ptr, col_lse_ptr, ds_ptr, scale_ptr, coef_ptr, b, C, P, D, c0, chunk,
                    stride_img, stride_txt, stride_ds,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """s·dS for columns [c0, c0 + chunk): s·coef·(softmax over the row + softmax over the column if positive)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    scale, coef = tl.load(scale_ptr), tl.load(coef_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = c0 + local
    row_ok = rows < b
    col_ok = (local < chunk) & (cols < C)
    s_tile = scale * _scores_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, D, stride_img, stride_txt,
                                  BLOCK_K, BLOCK_M, BLOCK_N, ALLOW_TF32)
    row_lse = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
    is_pos = cols < P
    col_lse = tl.load(col_lse_ptr + cols, mask=col_ok & is_pos, other=float("inf"))
    p = tl.exp(s_tile - row_lse[:, None]) + tl.exp(s_tile - col_lse[None, :])  # exp(-inf) = 0 off positives
    ok = row_ok[:, None] & col_ok[None, :]
    ds = tl.where(ok, (scale * coef) * p, 0.0)
    tl.store(ds_ptr + rows.to(tl.int64)[:, None] * stride_ds + local[None, :], ds.to(ds_ptr.dtype.element_ty), mask=ok)


LSE_FWD = Tuned(_lse_fwd_kernel, {fwd_group(fam, tile): cfgs for fam, tiles in FWD_CONFIGS.items() for tile, cfgs in tiles.items()},
                key=["b", "C", "D"])
DSCORES = Tuned(_dscores_kernel, BWD_CONFIGS, key=["b", "C", "D", "chunk"])


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else INTERPRET_SMS


def backward_chunk(b: int, C: int, D: int, element_size: int, chunk_columns: int | None) -> int:
    """Columns of s·dS per backward step (within [1, C]): `chunk_columns`, or the larger of what fits in
    CHUNK_BYTES and the width at which re-reading and re-writing the fp32 dI accumulator (b·D·(8 + e)
    bytes per chunk) costs at most half the chunk's own s·dS traffic (written once, read twice: 3·b·chunk·e)."""
    if chunk_columns is None:
        e = element_size
        chunk_columns = max(CHUNK_BYTES // (b * e), -(-2 * D * (8 + e) // (3 * e)))
    return max(1, min(C, chunk_columns))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc fp32: cuBLAS reads 16-bit a, b and accumulates into fp32 acc directly."""
    if a.is_cuda and a.dtype != torch.float32:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, NotImplementedError):  # a torch without the mixed-dtype addmm (< 2.8): upcast below
            pass
    acc.addmm_(a.float(), b.float())  # fp32 inputs, or the CPU (no mixed-dtype GEMM there)


class _ClipLSE(torch.autograd.Function):
    """(Σ_i LSE_row_i + Σ_{j local} LSE_col_j) / (2b): the clip loss minus its target logits."""

    @staticmethod
    def forward(ctx, img_BD, txt_CD, scale, num_pos, row_offset, group, chunk_columns, deterministic, allow_tf32):
        b, D = img_BD.shape
        C = txt_CD.shape[0]
        img_BD, txt_CD = _rows_unit_stride(img_BD), _rows_unit_stride(txt_CD)
        scale_f32 = scale.detach().float().reshape(1)
        fam = family(img_BD.dtype)
        plan = forward_plan(b, C, D, num_sms(img_BD.device), list(FWD_CONFIGS[fam]))
        row_part_SB = torch.empty(plan.splits, b, device=img_BD.device, dtype=torch.float32)
        col_part_MP = torch.empty(plan.row_blocks, num_pos, device=img_BD.device, dtype=torch.float32)
        LSE_FWD.launch(plan.grid, fwd_group(fam, (plan.block_m, plan.block_n)), deterministic, img_BD, txt_CD, row_part_SB, col_part_MP, scale_f32,
                       b, C, num_pos, D, plan.tiles_per_split, img_BD.stride(0), txt_CD.stride(0),
                       BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, ALLOW_TF32=allow_tf32)
        row_lse_B = torch.logsumexp(row_part_SB, dim=0)
        col_lse_P = torch.logsumexp(col_part_MP, dim=0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            world = dist.get_world_size(group)
            parts_WP = torch.empty(world, num_pos, device=img_BD.device, dtype=torch.float32)
            dist.all_gather(list(parts_WP.unbind(0)), col_lse_P, group=group)
            col_lse_P = torch.logsumexp(parts_WP, dim=0)
        ctx.save_for_backward(img_BD, txt_CD, row_lse_B, col_lse_P, scale_f32)
        ctx.meta = (num_pos, chunk_columns, deterministic, allow_tf32)
        local_cols = col_lse_P[row_offset:row_offset + b]
        return (row_lse_B.sum() + local_cols.sum()) / (2 * b)

    @staticmethod
    def backward(ctx, grad_out):
        img_BD, txt_CD, row_lse_B, col_lse_P, scale_f32 = ctx.saved_tensors
        num_pos, chunk_columns, deterministic, allow_tf32 = ctx.meta
        b, D = img_BD.shape
        C = txt_CD.shape[0]
        coef = (grad_out.detach().float() / (2 * b)).reshape(1)  # stays on the device
        chunk = backward_chunk(b, C, D, img_BD.element_size(), chunk_columns)
        grad_img_acc_BD = torch.zeros(b, D, device=img_BD.device, dtype=torch.float32)
        grad_txt_CD = torch.empty(txt_CD.shape, device=txt_CD.device, dtype=txt_CD.dtype)
        sds_chunk = torch.empty(b, chunk, device=img_BD.device, dtype=img_BD.dtype)
        for c0 in range(0, C, chunk):
            width = min(chunk, C - c0)
            grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_N"]))  # noqa: E731
            DSCORES.launch(grid, family(img_BD.dtype), deterministic, img_BD, txt_CD, row_lse_B, col_lse_P, sds_chunk,
                           scale_f32, coef, b, C, num_pos, D, c0, width, img_BD.stride(0), txt_CD.stride(0),
                           sds_chunk.stride(0), ALLOW_TF32=allow_tf32)
            sds_BW = sds_chunk[:, :width]
            _addmm_fp32_(grad_img_acc_BD, sds_BW, txt_CD[c0:c0 + width])
            torch.mm(sds_BW.T, img_BD, out=grad_txt_CD[c0:c0 + width])
        grad_scale = (grad_img_acc_BD * img_BD).sum() / scale_f32[0]
        return grad_img_acc_BD.to(img_BD.dtype), grad_txt_CD, grad_scale, None, None, None, None, None, None


def clip_loss(img_BD: torch.Tensor, txt_CD: torch.Tensor, scale: torch.Tensor, num_pos: int, row_offset: int = 0,
              group: dist.ProcessGroup | None = None, chunk_columns: int | None = None, deterministic: bool = False,
              allow_tf32: bool = False) -> torch.Tensor:
    """This rank's (L_i2t + L_t2i) / 2 without a [b, C] logits matrix.

    img_BD: [b, D] this rank's images; txt_CD: [C, D] the gathered texts, positives (num_pos = B of them,
    in rank order) first; scale: the exponentiated logit scale (0-dim or [1]); row_offset: the global
    index of this rank's first sample. Accumulates in fp32 whatever the input dtype. deterministic: one
    fixed config per kernel instead of autotuning (bit-identical from run to run); allow_tf32: fp32
    inputs use TF32 tensor cores.
    """
    if img_BD.dtype not in SUPPORTED_DTYPES or txt_CD.dtype != img_BD.dtype:
        raise ValueError(f"clip_loss takes fp32/bf16/fp16 embeddings of one dtype, got {img_BD.dtype} and {txt_CD.dtype}")
    b = img_BD.shape[0]
    if not 0 <= row_offset <= num_pos - b or num_pos > txt_CD.shape[0]:
        raise ValueError(f"row_offset={row_offset} with b={b} rows does not fit num_pos={num_pos} positives of {txt_CD.shape[0]} texts")
    scale = scale.reshape(())
    lse = _ClipLSE.apply(img_BD, txt_CD, scale, num_pos, row_offset, group, chunk_columns, deterministic, allow_tf32)
    pos_BD = txt_CD[row_offset:row_offset + b]
    target = (img_BD.float() * pos_BD.float()).sum(-1).mean()  # S_i,o+i appears once in i2t and once in t2i
    return lse - scale.float() * target


def clip_loss_ref(img_BD: torch.Tensor, txt_CD: torch.Tensor, scale: torch.Tensor, num_pos: int, row_offset: int = 0,
                  all_img_GD: torch.Tensor | None = None, upcast: bool = True) -> torch.Tensor:
    """Explicit-logits reference (eager PyTorch): the same loss with [b, C] and [b, B] logits in memory.

    all_img_GD: every rank's images for the t2i rows (defaults to img_BD: one process). upcast=True
    computes in fp32 (fp64 stays fp64); False keeps the input dtype, as an eager bf16 baseline would.
    """
    if all_img_GD is None:
        all_img_GD = img_BD
    if upcast:
        dtype = torch.promote_types(img_BD.dtype, torch.float32)
        img_BD, txt_CD, all_img_GD = img_BD.to(dtype), txt_CD.to(dtype), all_img_GD.to(dtype)
        scale = scale.to(dtype)
    b = img_BD.shape[0]
    targets_B = torch.arange(b, device=img_BD.device) + row_offset
    logits_i2t_BC = scale.reshape(()) * img_BD @ txt_CD.T
    logits_t2i_BG = scale.reshape(()) * txt_CD[row_offset:row_offset + b] @ all_img_GD.T
    return (F.cross_entropy(logits_i2t_BC, targets_B) + F.cross_entropy(logits_t2i_BG, targets_B)) / 2
