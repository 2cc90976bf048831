"""Two gloo ranks: loss and gradients equal the one-process result on the concatenated batch.

The reference is the loop reference of test_objective in one process on the whole batch, every term included: the three
mean terms and the distillation sum over all rows (docs/objective.md). Rank r's feature gradients include
every rank's loss through the all-gather, so they equal W × the reference gradient of its chunk (the
optimizer sees their average); the scale gradient, averaged over ranks as data parallelism does, equals
the reference's. The reported terms' mean over ranks equals the one-process terms."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from degla_scale.objective import degla_loss
from test_objective import make_inputs, reference_loss

W, b, K, D = 2, 5, 3, 12
DISTILL_WEIGHT = 0.5  # large enough that distillation moves every gradient


def chunk(x, r, rows):
    return x[r * rows:(r + 1) * rows]


def split_for_rank(img, txt, t_img, t_txt, r):
    """Rank r's rows in the per-rank layout: its b positives, then its b·K negatives."""
    pos, neg = txt[:W * b], txt[W * b:]
    t_pos, t_neg = t_txt[:W * b], t_txt[W * b:]
    return (chunk(img, r, b), torch.cat([chunk(pos, r, b), chunk(neg, r, b * K)]),
            chunk(t_img, r, b), torch.cat([chunk(t_pos, r, b), chunk(t_neg, r, b * K)]))


def _worker(rank, init_file, out_dir, backend):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # gloo ranks on CPU tensors: the kernels run interpreted
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    img, txt, scale, t_img, t_txt = inputs(backend)
    my_img, my_txt, my_t_img, my_t_txt = (x.clone() for x in split_for_rank(img, txt, t_img, t_txt, rank))
    my_img.requires_grad_(True)
    my_txt.requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    out = degla_loss(my_img, my_txt, scale, my_t_img, my_t_txt, num_negatives=K, distill_weight=DISTILL_WEIGHT,
                     backend=backend)
    out.total.backward()
    torch.save({"total": out.total.detach(), "clip": out.clip.detach(), "igc": out.igc.detach(), "tgc": out.tgc.detach(),
                "distill": out.distill.detach(), "img": my_img.grad, "txt": my_txt.grad, "scale": scale.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def inputs(backend):
    """float64 for the torch path; the Triton kernels take fp32 (the reference then runs on the rounded values)."""
    x = make_inputs(W * b, K, D, scale=20.0, seed=3)
    return x if backend == "torch" else [t.float() for t in x]


# (rtol, atol) of losses and gradients: the torch path is float64 throughout, the kernels accumulate in fp32
TOLERANCE = {"torch": (1e-9, 1e-14), "triton": (2e-5, 1e-6)}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_ranks_equal_one_process(tmp_path, backend):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend), nprocs=W, join=True)
    ranks = [{k: v.double() for k, v in torch.load(tmp_path / f"rank{r}.pt").items()} for r in range(W)]
    rtol, atol = TOLERANCE[backend]

    img, txt, scale, t_img, t_txt = (x.double() for x in inputs(backend))
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale.requires_grad_(True)
    # One process: the whole batch (txt here is [all positives; all negatives]), a non-default distillation
    # weight so that an error in its scaling cannot hide behind the contrastive terms.
    # The loop reference of test_objective, independent of the code under test.
    whole = reference_loss(img, txt, scale, t_img, t_txt, K, w_distill=DISTILL_WEIGHT)
    whole["total"].backward()

    mean = lambda key: sum(r[key] for r in ranks) / W  # noqa: E731
    torch.testing.assert_close(mean("total"), whole["total"].detach(), rtol=rtol, atol=atol)
    for term in ("clip", "igc", "tgc", "distill"):
        torch.testing.assert_close(mean(term), whole[term].detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(mean("scale"), scale.grad, rtol=rtol, atol=atol)
    for r in range(W):
        want_img, want_txt = split_for_rank(img.grad, txt.grad, img.grad, txt.grad, r)[:2]
        torch.testing.assert_close(ranks[r]["img"] / W, want_img, rtol=rtol, atol=atol)
        torch.testing.assert_close(ranks[r]["txt"] / W, want_txt, rtol=rtol, atol=atol)
