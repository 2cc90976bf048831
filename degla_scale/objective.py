"""The DeGLA objective (docs/objective.md), in PyTorch.

Shape legend (per rank unless said otherwise):
    b  samples on this rank          B = W·b samples over all W ranks
    K  hard negatives per sample     D  embedding width
    N  = b·(1+K) captions on this rank: rows 0..b-1 positives, then negatives sample-major
         (negative k of sample i is row b + i·K + k)

    img_BD   [b, D]     student image embeddings (L2-normalised)
    txt_ND   [N, D]     student caption embeddings
    t_img_BD, t_txt_ND  the teacher's embeddings of the same inputs (no gradient)

Every term is a mean over this rank's rows except distillation (a sum). With W ranks the global term
uses features all-gathered *with gradient*, and each rank's distillation sum is scaled by W, so after the
usual gradient averaging across ranks the optimizer sees exactly the one-process gradient of the whole
batch, distillation included (its whole-batch sum, as the official code weighs it). The reported
`distill` is that scaled share, so its mean over ranks is the whole batch's sum.

Two implementations share this interface: eager PyTorch here (explicit [b, B(1+K)] logits) and the
fused Triton kernels of `kernels.clip_loss` / `kernels.grounded_loss` (`backend="triton"`; the
default `auto` uses them on CUDA). With the kernels, gradients flow through `total` only: the
unweighted grounded terms are reported values.
"""
from __future__ import annotations

from dataclasses import dataclass

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from degla_scale.distributed import all_gather_with_grad


@dataclass
class DeGLALoss:
    """The weighted total and each unweighted term (0-dim tensors; a skipped term reads 0)."""

    total: torch.Tensor
    clip: torch.Tensor
    igc: torch.Tensor
    tgc: torch.Tensor
    distill: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 embeddings are upcast so softmax statistics accumulate in fp32; fp64 stays fp64 (tests).
    return torch.promote_types(x.dtype, torch.float32)


def split_captions(txt_ND: torch.Tensor, b: int, num_negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split caption rows into positives [b, D] and negatives [b, K, D] (sample-major)."""
    if txt_ND.shape[0] != b * (1 + num_negatives):
        raise ValueError(
            f"txt has {txt_ND.shape[0]} rows but b={b} images with num_negatives={num_negatives} need "
            f"{b * (1 + num_negatives)}: pass positives then b·K negatives in sample-major order"
        )
    pos_BD = txt_ND[:b]
    neg_BKD = txt_ND[b:].reshape(b, num_negatives, txt_ND.shape[1])
    return pos_BD, neg_BKD


def global_contrastive_loss(
    img_BD: torch.Tensor, pos_BD: torch.Tensor, neg_BKD: torch.Tensor, scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """(L_i2t + L_t2i) / 2 over this rank's rows, against features gathered from every rank."""
    b, D = img_BD.shape
    rank, world = _rank_world(group)
    all_img_GD = all_gather_with_grad(img_BD, group)  # G = B images over all ranks
    all_pos_GD = all_gather_with_grad(pos_BD, group)
    all_neg_GD = all_gather_with_grad(neg_BKD.reshape(-1, D), group)  # B·K, still sample-major
    targets_B = torch.arange(b, device=img_BD.device) + rank * b

    columns_CD = torch.cat([all_pos_GD, all_neg_GD])  # C = B + B·K texts
    logits_i2t_BC = scale * img_BD @ columns_CD.T
    logits_t2i_BG = scale * pos_BD @ all_img_GD.T
    return (F.cross_entropy(logits_i2t_BC, targets_B) + F.cross_entropy(logits_t2i_BG, targets_B)) / 2


def grouped_contrastive_loss(
    anchor_BD: torch.Tensor, target_BD: torch.Tensor, neg_BKD: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """Cross-entropy of each anchor over [its target, its own K negatives], target first.

    IGC: anchor = image, target = positive caption, scale = s.
    TGC: anchor = positive caption, target = teacher's embedding of it, scale = τ.
    """
    logit_pos_B1 = (anchor_BD * target_BD).sum(-1, keepdim=True)
    logit_neg_BK = torch.einsum("bd,bkd->bk", anchor_BD, neg_BKD)
    logits_B1K = scale * torch.cat([logit_pos_B1, logit_neg_BK], dim=1)
    return F.cross_entropy(logits_B1K, torch.zeros(len(anchor_BD), dtype=torch.long, device=anchor_BD.device))


def distill_loss(img_BD, txt_ND, t_img_BD, t_txt_ND) -> torch.Tensor:
    """Σ (img − t_img)² + Σ (txt − t_txt)² over every element of this rank's rows."""
    return (img_BD - t_img_BD).pow(2).sum() + (txt_ND - t_txt_ND).pow(2).sum()


def degla_loss(
    img_BD: torch.Tensor,
    txt_ND: torch.Tensor,
    scale: torch.Tensor,
    t_img_BD: torch.Tensor | None = None,
    t_txt_ND: torch.Tensor | None = None,
    *,
    num_negatives: int,
    igc_weight: float = 0.1,
    tgc_weight: float = 0.1,
    distill_weight: float = 0.005,
    tgc_scale: float = 10.0,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    tgc_grouping: str = "own",
    deterministic: bool = False,
) -> DeGLALoss:
    """L = L_clip + w_igc·L_igc + w_tgc·L_tgc + w_distill·L_distill (docs/objective.md).

    `scale` is the exponentiated logit scale (0-dim or shape [1]). A zero weight skips its term, so
    the teacher embeddings may be None when `tgc_weight == distill_weight == 0`. `backend`: "torch",
    "triton" or "auto" (Triton for CUDA tensors). `tgc_grouping="official"` is an ablation: TGC pairs row i
    with negatives k·b + i (the official code's `repeat(1, K)`), in eager PyTorch only. `deterministic`:
    the kernels run one fixed config (no autotuning), so repeated runs are bit-identical.
    """
    if tgc_grouping not in ("own", "official"):
        raise ValueError(f"tgc_grouping={tgc_grouping!r} is not one of own, official")
    if tgc_grouping == "official" and backend == "triton":
        raise ValueError("tgc_grouping='official' (an ablation) has no Triton kernel: use backend='torch' or 'auto'")
    if tgc_grouping == "own" and _use_triton(backend, img_BD):
        return _degla_loss_triton(img_BD, txt_ND, scale, t_img_BD, t_txt_ND, num_negatives, igc_weight, tgc_weight,
                                  distill_weight, tgc_scale, group, deterministic)
    dtype = _compute_dtype(img_BD)
    img_BD, txt_ND, scale = img_BD.to(dtype), txt_ND.to(dtype), scale.to(dtype).reshape(())
    b, K = img_BD.shape[0], num_negatives
    pos_BD, neg_BKD = split_captions(txt_ND, b, K)
    zero = img_BD.new_zeros(())

    needs_teacher = tgc_weight != 0 or distill_weight != 0
    if needs_teacher:
        if t_img_BD is None or t_txt_ND is None:
            raise ValueError("tgc_weight or distill_weight is non-zero but no teacher embeddings were given")
        t_img_BD, t_txt_ND = t_img_BD.detach().to(dtype), t_txt_ND.detach().to(dtype)

    clip = global_contrastive_loss(img_BD, pos_BD, neg_BKD, scale, group)
    world = _rank_world(group)[1]
    # With K = 0 the grouped terms are a softmax over one logit: exactly 0, so skip them too.
    igc = grouped_contrastive_loss(img_BD, pos_BD, neg_BKD, scale) if igc_weight != 0 and K > 0 else zero
    if tgc_weight != 0 and K > 0:
        # official: the flat negatives read K-major, so row i meets negative rows k·b + i (other samples')
        tgc_neg_BKD = neg_BKD if tgc_grouping == "own" else txt_ND[b:].reshape(K, b, -1).transpose(0, 1)
        tgc = grouped_contrastive_loss(pos_BD, t_txt_ND[:b], tgc_neg_BKD, tgc_scale)
    else:
        tgc = zero
    # × W: after gradient averaging, the whole batch's sum (docs/objective.md)
    distill = world * distill_loss(img_BD, txt_ND, t_img_BD, t_txt_ND) if distill_weight != 0 else zero
    total = clip + igc_weight * igc + tgc_weight * tgc + distill_weight * distill
    return DeGLALoss(total=total, clip=clip, igc=igc, tgc=tgc, distill=distill)


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if backend != "triton":
        raise ValueError(f"backend={backend!r} is not one of auto, torch, triton")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' with CPU tensors needs TRITON_INTERPRET=1 set before triton is imported "
                         "(Triton's interpreter); use backend='torch' or 'auto' on CPU")
    return True


def _degla_loss_triton(img_BD, txt_ND, scale, t_img_BD, t_txt_ND, K, igc_weight, tgc_weight, distill_weight,
                       tgc_scale, group, deterministic) -> DeGLALoss:
    from kernels.clip_loss import clip_loss
    from kernels.grounded_loss import grounded_loss

    b, D = img_BD.shape
    pos_BD, neg_BKD = split_captions(txt_ND, b, K)
    rank, world = _rank_world(group)
    columns_CD = torch.cat([all_gather_with_grad(pos_BD, group), all_gather_with_grad(neg_BKD.reshape(-1, D), group)])
    clip = clip_loss(img_BD, columns_CD, scale, num_pos=world * b, row_offset=rank * b, group=group,
                     deterministic=deterministic)
    if igc_weight == tgc_weight == distill_weight == 0:
        zero = clip.new_zeros(())
        return DeGLALoss(total=clip, clip=clip, igc=zero, tgc=zero, distill=zero)
    # The kernel weighs this rank's distillation sum by w·W (whole-batch sum after averaging, docs/objective.md).
    grounded, igc, tgc, distill = grounded_loss(img_BD, txt_ND, scale, t_img_BD, t_txt_ND, K, igc_weight, tgc_weight,
                                                distill_weight * world, tgc_scale)
    return DeGLALoss(total=clip + grounded, clip=clip, igc=igc, tgc=tgc, distill=world * distill)


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1
