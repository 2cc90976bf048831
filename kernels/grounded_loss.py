"""The per-sample DeGLA terms in one pass (docs/objective.md, terms 2–4), and their reference.

Legend (one rank): b samples, K negatives each, D width, N = b·(1+K) caption rows (positives, then
negatives sample-major: negative k of sample i is row b + i·K + k).

    IGC_i     = CE( s · img_i · [pos_i, neg_i1 … neg_iK] , 0 )
    TGC_i     = CE( τ · pos_i · [t_pos_i, neg_i1 … neg_iK] , 0 )     (no gradient into the teacher)
    distill_i = ‖img_i − t_img_i‖² + ‖pos_i − t_pos_i‖² + Σ_k ‖neg_ik − t_neg_ik‖²

    grounded = w_igc · mean_i IGC_i + w_tgc · mean_i TGC_i + w_distill · Σ_i distill_i

One program per sample reads its 2 + K student rows and their teacher rows once, and writes the loss
terms and the gradients of the weighted sum (bandwidth-bound: nothing is worth recomputing). The
backward only scales the stored gradients by the upstream gradient, so gradients flow through the
weighted sum; the three unweighted terms are returned for logging and carry no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _rows_unit_stride

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _grounded_kernel(img_ptr, txt_ptr, t_img_ptr, t_txt_ptr, terms_ptr, d_img_ptr, d_txt_ptr, d_scale_ptr,
                     scale_ptr, tau, c_igc, c_tgc, c_distill, b, K, D, stride_img, stride_txt, stride_t_img, stride_t_txt,
                     stride_d_img, stride_d_txt,
                     HAS_IGC: tl.constexpr, HAS_TGC: tl.constexpr, HAS_DISTILL: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    scale = tl.load(scale_ptr)  # read on the device: no host sync for the learnable scale
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    kd_ok = k_ok[:, None] & d_ok[None, :]
    neg_rows = b + i * K + ks

    img_D = tl.load(img_ptr + i * stride_img + ds, mask=d_ok, other=0.0).to(tl.float32)
    pos_D = tl.load(txt_ptr + i * stride_txt + ds, mask=d_ok, other=0.0).to(tl.float32)
    neg_KD = tl.load(txt_ptr + neg_rows[:, None] * stride_txt + ds[None, :], mask=kd_ok, other=0.0).to(tl.float32)
    d_img_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_pos_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_neg_KD = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    igc = 0.0
    tgc = 0.0
    distill = 0.0
    d_scale = 0.0

    if HAS_IGC:
        z0 = tl.sum(img_D * pos_D, axis=0)
        z_K = tl.sum(neg_KD * img_D[None, :], axis=1)
        logit_K = tl.where(k_ok, scale * z_K, float("-inf"))
        m = tl.maximum(scale * z0, tl.max(logit_K, axis=0))
        e0 = tl.exp(scale * z0 - m)
        e_K = tl.exp(logit_K - m)
        total = e0 + tl.sum(e_K, axis=0)
        igc = tl.log(total) - (scale * z0 - m)  # not m + log − logit: that cancels when the target dominates
        g0 = e0 / total - 1.0  # ∂CE/∂logit_0
        g_K = e_K / total
        d_img_D += c_igc * scale * (g0 * pos_D + tl.sum(g_K[:, None] * neg_KD, axis=0))
        d_pos_D += c_igc * scale * g0 * img_D
        d_neg_KD += c_igc * scale * g_K[:, None] * img_D[None, :]
        d_scale = c_igc * (g0 * z0 + tl.sum(g_K * z_K, axis=0))

    if HAS_TGC or HAS_DISTILL:
        t_pos_D = tl.load(t_txt_ptr + i * stride_t_txt + ds, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_TGC:
            y0 = tau * tl.sum(pos_D * t_pos_D, axis=0)
            y_K = tl.where(k_ok, tau * tl.sum(neg_KD * pos_D[None, :], axis=1), float("-inf"))
            m = tl.maximum(y0, tl.max(y_K, axis=0))
            e0 = tl.exp(y0 - m)
            e_K = tl.exp(y_K - m)
            total = e0 + tl.sum(e_K, axis=0)
            tgc = tl.log(total) - (y0 - m)  # see IGC
            g0 = e0 / total - 1.0
            g_K = e_K / total
            d_pos_D += c_tgc * tau * (g0 * t_pos_D + tl.sum(g_K[:, None] * neg_KD, axis=0))
            d_neg_KD += c_tgc * tau * g_K[:, None] * pos_D[None, :]
        if HAS_DISTILL:
            t_img_D = tl.load(t_img_ptr + i * stride_t_img + ds, mask=d_ok, other=0.0).to(tl.float32)
            t_neg_KD = tl.load(t_txt_ptr + neg_rows[:, None] * stride_t_txt + ds[None, :], mask=kd_ok,
                               other=0.0).to(tl.float32)
            r_img = img_D - t_img_D
            r_pos = pos_D - t_pos_D
            r_neg = neg_KD - t_neg_KD
            distill = tl.sum(r_img * r_img, axis=0) + tl.sum(r_pos * r_pos, axis=0) + tl.sum(tl.sum(r_neg * r_neg, axis=1), axis=0)
            d_img_D += 2.0 * c_distill * r_img
            d_pos_D += 2.0 * c_distill * r_pos
            d_neg_KD += 2.0 * c_distill * r_neg

    tl.store(terms_ptr + i * 3 + 0, igc)
    tl.store(terms_ptr + i * 3 + 1, tgc)
    tl.store(terms_ptr + i * 3 + 2, distill)
    tl.store(d_scale_ptr + i, d_scale)
    tl.store(d_img_ptr + i * stride_d_img + ds, d_img_D.to(d_img_ptr.dtype.element_ty), mask=d_ok)
    tl.store(d_txt_ptr + i * stride_d_txt + ds, d_pos_D.to(d_txt_ptr.dtype.element_ty), mask=d_ok)
    tl.store(d_txt_ptr + neg_rows[:, None] * stride_d_txt + ds[None, :], d_neg_KD.to(d_txt_ptr.dtype.element_ty), mask=kd_ok)


def launch_meta(K: int, D: int) -> dict:
    """The kernel's constexpr blocks and warps for K negatives of width D (one program holds a sample's rows)."""
    block_d = triton.next_power_of_2(D)
    return {"BLOCK_K": triton.next_power_of_2(max(K, 1)), "BLOCK_D": block_d, "num_warps": 4 if block_d <= 1024 else 8}


class _Grounded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img_BD, txt_ND, scale, t_img_BD, t_txt_ND, K, w_igc, w_tgc, w_distill, tau):
        b, D = img_BD.shape
        img_BD, txt_ND = _rows_unit_stride(img_BD), _rows_unit_stride(txt_ND)
        has_igc, has_tgc, has_distill = w_igc != 0 and K > 0, w_tgc != 0 and K > 0, w_distill != 0
        # The teacher pointers are not read unless a teacher term is on; any tensor will do then.
        t_img_BD = _rows_unit_stride(t_img_BD) if t_img_BD is not None else img_BD
        t_txt_ND = _rows_unit_stride(t_txt_ND) if t_txt_ND is not None else txt_ND
        terms_B3 = torch.empty(b, 3, device=img_BD.device, dtype=torch.float32)
        d_scale_B = torch.empty(b, device=img_BD.device, dtype=torch.float32)
        d_img_BD = torch.empty(img_BD.shape, device=img_BD.device, dtype=img_BD.dtype)
        d_txt_ND = torch.empty(txt_ND.shape, device=txt_ND.device, dtype=txt_ND.dtype)
        _grounded_kernel[(b,)](img_BD, txt_ND, t_img_BD, t_txt_ND, terms_B3, d_img_BD, d_txt_ND, d_scale_B,
                               scale.detach().float().reshape(1), float(tau), w_igc / b, w_tgc / b, float(w_distill), b, K, D,
                               img_BD.stride(0), txt_ND.stride(0), t_img_BD.stride(0), t_txt_ND.stride(0),
                               d_img_BD.stride(0), d_txt_ND.stride(0),
                               HAS_IGC=has_igc, HAS_TGC=has_tgc, HAS_DISTILL=has_distill,
                               **launch_meta(K, D))
        igc, tgc = terms_B3[:, 0].mean(), terms_B3[:, 1].mean()
        distill = terms_B3[:, 2].sum()
        ctx.save_for_backward(d_img_BD, d_txt_ND, d_scale_B.sum())
        ctx.mark_non_differentiable(igc, tgc, distill)
        return w_igc * igc + w_tgc * tgc + w_distill * distill, igc, tgc, distill

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        d_img_BD, d_txt_ND, d_scale = ctx.saved_tensors
        return grad_out * d_img_BD, grad_out * d_txt_ND, grad_out * d_scale, None, None, None, None, None, None, None


def grounded_loss(img_BD: torch.Tensor, txt_ND: torch.Tensor, scale: torch.Tensor, t_img_BD: torch.Tensor | None,
                  t_txt_ND: torch.Tensor | None, num_negatives: int, igc_weight: float, tgc_weight: float,
                  distill_weight: float, tgc_scale: float = 10.0):
    """→ (weighted sum, IGC, TGC, distill): 0-dim fp32 tensors; back-propagate through the weighted sum."""
    if img_BD.dtype not in SUPPORTED_DTYPES or txt_ND.dtype != img_BD.dtype:
        raise ValueError(f"grounded_loss takes fp32/bf16/fp16 embeddings of one dtype, got {img_BD.dtype} and {txt_ND.dtype}")
    b, K = img_BD.shape[0], num_negatives
    if txt_ND.shape[0] != b * (1 + K):
        raise ValueError(f"txt has {txt_ND.shape[0]} rows but b={b} with num_negatives={K} needs {b * (1 + K)}")
    if (tgc_weight != 0 and K > 0 or distill_weight != 0) and (t_img_BD is None or t_txt_ND is None):
        raise ValueError("tgc_weight or distill_weight is non-zero but no teacher embeddings were given")
    return _Grounded.apply(img_BD, txt_ND, scale.reshape(()), t_img_BD, t_txt_ND, K,
                           float(igc_weight), float(tgc_weight), float(distill_weight), tgc_scale)


def grounded_loss_ref(img_BD, txt_ND, scale, t_img_BD, t_txt_ND, num_negatives: int, igc_weight: float,
                      tgc_weight: float, distill_weight: float, tgc_scale: float = 10.0, upcast: bool = True):
    """Eager PyTorch with explicit [b, 1+K] logits: → (weighted sum, IGC, TGC, distill)."""
    if upcast:
        dtype = torch.promote_types(img_BD.dtype, torch.float32)
        img_BD, txt_ND, scale = img_BD.to(dtype), txt_ND.to(dtype), scale.to(dtype)
        t_img_BD, t_txt_ND = t_img_BD.to(dtype), t_txt_ND.to(dtype)
    b, K = img_BD.shape[0], num_negatives
    pos_BD, neg_BKD = txt_ND[:b], txt_ND[b:].reshape(b, K, txt_ND.shape[1])
    t_img_BD, t_txt_ND = t_img_BD.detach(), t_txt_ND.detach()

    def grouped(anchor_BD, target_BD, s):
        logits_B1K = s * torch.cat([(anchor_BD * target_BD).sum(-1, keepdim=True),
                                    torch.einsum("bd,bkd->bk", anchor_BD, neg_BKD)], dim=1)
        return torch.nn.functional.cross_entropy(logits_B1K, torch.zeros(b, dtype=torch.long, device=anchor_BD.device))

    igc = grouped(img_BD, pos_BD, scale.reshape(()))
    tgc = grouped(pos_BD, t_txt_ND[:b], tgc_scale)
    distill = (img_BD - t_img_BD).pow(2).sum() + (txt_ND - t_txt_ND).pow(2).sum()
    return igc_weight * igc + tgc_weight * tgc + distill_weight * distill, igc, tgc, distill
