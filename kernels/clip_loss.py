"""Fused global contrastive loss with hard negatives (docs/objective.md, term 1), and its reference.

Legend (one rank):
    b   rows: this rank's images                       B  positives over all ranks (= images)
    C   columns: the gathered texts, B positives then B·K negatives (sample-major)
    D   embedding width                                 S = s · I · Tᵀ  [b, C], never materialised

    loss = ( mean_i [LSE_c S_ic − S_i,o+i]  +  mean_{j local} [LSE_{all images} S_·j − S_j−o,j] ) / 2
    with o = the rank's row offset (its first sample's global index).

Forward: one program per block of rows streams column tiles of S (an fp32 accumulator over D chunks)
with an online max/sum, giving each row's LSE over all C texts; from the same tiles it writes the
block's partial LSE of every positive column over its rows. The partials are reduced over row blocks
and then over ranks (a [W, B] all-gather), so the t2i LSE covers every image of every rank.

Backward recomputes S in column chunks: a Triton kernel turns each S tile straight into dS (softmax of
the row plus, on positive columns, softmax of the column) and its share of d(scale); two GEMMs per
chunk then give dI and dT. Memory: the saved tensors are the inputs plus b + B LSEs, O((b + C)·D);
the transients are one dS chunk of b × `chunk_columns` (by default sized to `CHUNK_BYTES`) and an
fp32 [b, D] accumulator for dI.

Multi-rank: rank r differentiates the t2i terms of *every* positive column through its own image rows,
so its gradients are not ∂L_r but their sum over ranks is ∂(Σ_r L_r): after the all-gather's
reduce-scatter of dT and the usual averaging over ranks the optimizer sees the one-process gradient,
as with the torch path. This assumes every rank back-propagates the same upstream gradient (data
parallelism does).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _rows_unit_stride

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the CPU interpreter: one small tile, no timing runs
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


CHUNK_BYTES = 8 * 2**20  # default dS chunk: enough columns per GEMM to keep tensor cores busy, little memory
MIN_BLOCK = min(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _configs())  # sizes per-block buffers


INTERPRET_DOT: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _scores_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, D, stride_img, stride_txt,
                 BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """I[rows] · T[cols]ᵀ accumulated in fp32 over D in BLOCK_K chunks → [BLOCK_M, BLOCK_N]."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(img_ptr + rows[:, None] * stride_img + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        t = tl.load(txt_ptr + cols[:, None] * stride_txt + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if INTERPRET_DOT:  # the interpreter's bf16 dot returns garbage (triton 3.8); bf16 products are exact in fp32
            a, t = a.to(tl.float32), t.to(tl.float32)
        if ALLOW_TF32:
            acc = tl.dot(a, tl.trans(t), acc, input_precision="tf32")
        else:
            acc = tl.dot(a, tl.trans(t), acc, input_precision="ieee")
    return acc


@triton.autotune(configs=_configs(), key=["b", "C", "D"])
@triton.jit
def _lse_fwd_kernel(img_ptr, txt_ptr, row_lse_ptr, col_part_ptr, scale_ptr, b, C, P, D, stride_img, stride_txt,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr):
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)  # read on the device: no host sync for the learnable scale
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < b
    m_row = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < C
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
            tl.store(col_part_ptr + pid * P + cols, lse_col, mask=cols < P)
    tl.store(row_lse_ptr + rows, m_row + tl.log(l_row), mask=row_ok)


@triton.autotune(configs=_configs(), key=["b", "C", "D"], reset_to_zero=["dscale_ptr"])
@triton.jit
def _dscores_kernel(img_ptr, txt_ptr, row_lse_ptr, col_lse_ptr, ds_ptr, dscale_ptr, scale_ptr, coef_ptr, b, C, P, D, c0, chunk,
                    stride_img, stride_txt, stride_ds,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr,
                    DETERMINISTIC: tl.constexpr):
    """dS for columns [c0, c0 + chunk): coef·(softmax over the row + softmax over the column if positive)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    scale, coef = tl.load(scale_ptr), tl.load(coef_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = c0 + local
    row_ok = rows < b
    col_ok = (local < chunk) & (cols < C)
    dot = _scores_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, D, stride_img, stride_txt,
                       BLOCK_K, BLOCK_M, BLOCK_N, ALLOW_TF32)
    s_tile = scale * dot
    row_lse = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
    is_pos = cols < P
    col_lse = tl.load(col_lse_ptr + cols, mask=col_ok & is_pos, other=float("inf"))
    p = tl.exp(s_tile - row_lse[:, None]) + tl.exp(s_tile - col_lse[None, :])  # exp(-inf) = 0 off positives
    ok = row_ok[:, None] & col_ok[None, :]
    ds = tl.where(ok, coef * p, 0.0)
    tl.store(ds_ptr + rows[:, None] * stride_ds + local[None, :], ds.to(ds_ptr.dtype.element_ty), mask=ok)
    dscale = tl.sum(tl.sum(ds * dot, axis=1), axis=0)  # ∂/∂s of Σ S·dS/… = Σ dS · (I·T)
    if DETERMINISTIC:
        tl.store(dscale_ptr + pid_m * tl.num_programs(1) + pid_n, dscale)
    else:
        tl.atomic_add(dscale_ptr, dscale)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (cuBLAS accumulates in fp32 and writes fp32 without a bf16 round trip)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _ClipLSE(torch.autograd.Function):
    """(Σ_i LSE_row_i + Σ_{j local} LSE_col_j) / (2b): the clip loss minus its target logits."""

    @staticmethod
    def forward(ctx, img_BD, txt_CD, scale, num_pos, row_offset, group, chunk_columns, deterministic, allow_tf32):
        b, D = img_BD.shape
        C = txt_CD.shape[0]
        img_BD, txt_CD = _rows_unit_stride(img_BD), _rows_unit_stride(txt_CD)
        scale_f32 = scale.detach().float().reshape(1)
        row_lse_B = torch.empty(b, device=img_BD.device, dtype=torch.float32)
        blocks = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)  # noqa: E731
        # The row-block count depends on the autotuned BLOCK_M: size the partials for the smallest one
        # (unwritten rows stay -inf and drop out of the logsumexp).
        col_part_MP = torch.full((triton.cdiv(b, MIN_BLOCK), num_pos), float("-inf"), device=img_BD.device, dtype=torch.float32)
        _lse_fwd_kernel[blocks](img_BD, txt_CD, row_lse_B, col_part_MP, scale_f32, b, C, num_pos, D,
                                img_BD.stride(0), txt_CD.stride(0), ALLOW_TF32=allow_tf32)
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
        chunk = chunk_columns or CHUNK_BYTES // (b * img_BD.element_size())
        chunk = max(MIN_BLOCK, min(C, chunk))
        grad_img_BD = torch.zeros(b, D, device=img_BD.device, dtype=torch.float32)
        grad_txt_CD = torch.empty(txt_CD.shape, device=txt_CD.device, dtype=txt_CD.dtype)
        ds_chunk = torch.empty(b, chunk, device=img_BD.device, dtype=img_BD.dtype)
        dscale = torch.zeros(triton.cdiv(b, MIN_BLOCK) * triton.cdiv(chunk, MIN_BLOCK) if deterministic else 1,
                             device=img_BD.device, dtype=torch.float32)
        dscale_total = torch.zeros((), device=img_BD.device, dtype=torch.float32)
        for c0 in range(0, C, chunk):
            width = min(chunk, C - c0)
            grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_N"]))  # noqa: E731
            dscale.zero_()
            _dscores_kernel[grid](img_BD, txt_CD, row_lse_B, col_lse_P, ds_chunk, dscale, scale_f32, coef, b, C, num_pos, D,
                                  c0, width, img_BD.stride(0), txt_CD.stride(0), ds_chunk.stride(0),
                                  ALLOW_TF32=allow_tf32, DETERMINISTIC=deterministic)
            dscale_total += dscale.sum()
            ds_BW = ds_chunk[:, :width]
            grad_img_BD += _mm_fp32(ds_BW, txt_CD[c0:c0 + width])
            grad_txt_CD[c0:c0 + width] = (_mm_fp32(ds_BW.T, img_BD) * scale_f32).to(txt_CD.dtype)
        grad_img_BD = (grad_img_BD * scale_f32).to(img_BD.dtype)
        return grad_img_BD, grad_txt_CD, dscale_total.reshape(()), None, None, None, None, None, None


def clip_loss(img_BD: torch.Tensor, txt_CD: torch.Tensor, scale: torch.Tensor, num_pos: int, row_offset: int = 0,
              group: dist.ProcessGroup | None = None, chunk_columns: int | None = None, deterministic: bool = False,
              allow_tf32: bool = False) -> torch.Tensor:
    """This rank's (L_i2t + L_t2i) / 2 without a [b, C] logits matrix.

    img_BD: [b, D] this rank's images; txt_CD: [C, D] the gathered texts, positives (num_pos = B of them,
    in rank order) first; scale: the exponentiated logit scale (0-dim or [1]); row_offset: the global
    index of this rank's first sample. Accumulates in fp32 whatever the input dtype.
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
