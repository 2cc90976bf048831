"""The per-sample IGC + TGC + distillation kernel against a float64 reference written here, loop by loop."""
import pytest
import torch

from kernels.grounded_loss import grounded_loss
from test_clip_loss import DEVICE, DTYPES, assert_within_twice_torch_error, nan_padded, unit


def reference_f64(img, txt, scale, t_img, t_txt, K, w_igc, w_tgc, w_distill, tau=10.0):
    img, txt, scale, t_img, t_txt = (x.double() for x in (img, txt, scale, t_img, t_txt))
    b = img.shape[0]

    def ce(logits):  # target 0
        return torch.logsumexp(logits, 0) - logits[0]
    negs = [[txt[b + i * K + k] for k in range(K)] for i in range(b)]
    igc = sum(ce(torch.stack([scale * img[i] @ c for c in [txt[i], *negs[i]]])) for i in range(b)) / b
    tgc = sum(ce(torch.stack([tau * txt[i] @ c for c in [t_txt[i], *negs[i]]])) for i in range(b)) / b
    distill = ((img - t_img) ** 2).sum() + ((txt - t_txt) ** 2).sum()
    return w_igc * igc + w_tgc * tgc + w_distill * distill, igc, tgc, distill


def eager(img, txt, scale, t_img, t_txt, K, w_igc, w_tgc, w_distill, tau=10.0):
    """The same in the input dtype, as a PyTorch user would write it (the error baseline)."""
    b, D = img.shape
    pos, neg = txt[:b], txt[b:].reshape(b, K, D)
    zeros = torch.zeros(b, dtype=torch.long, device=img.device)
    ce = torch.nn.functional.cross_entropy
    igc = ce(scale * torch.cat([(img * pos).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", img, neg)], 1), zeros)
    tgc = ce(tau * torch.cat([(pos * t_txt[:b]).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", pos, neg)], 1), zeros)
    distill = ((img - t_img) ** 2).sum() + ((txt - t_txt) ** 2).sum()
    return w_igc * igc + w_tgc * tgc + w_distill * distill, igc, tgc, distill


def inputs(b, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = unit(torch.randn(b, D, generator=g, dtype=torch.float64))
    txt = unit(torch.randn(b * (1 + K), D, generator=g, dtype=torch.float64))
    t_img = unit(img + 0.3 * torch.randn(b, D, generator=g, dtype=torch.float64))
    t_txt = unit(txt + 0.3 * torch.randn(b * (1 + K), D, generator=g, dtype=torch.float64))
    return [x.to(DEVICE, dtype) for x in (img, txt, torch.tensor(14.3, dtype=torch.float64), t_img, t_txt)]


def run(fn, img, txt, scale, t_img, t_txt, *args):
    img, txt, scale = (x.detach().clone().requires_grad_(True) for x in (img, txt, scale))
    out = fn(img, txt, scale, t_img, t_txt, *args)
    out[0].backward()
    return [o.detach().double() for o in out], [img.grad.double(), txt.grad.double(), scale.grad.double()]


WEIGHTS = [(0.1, 0.1, 0.005), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,K,D", [(37, 3, 48), (8, 4, 64), (1, 4, 16), (5, 1, 20)])
@pytest.mark.parametrize("weights", WEIGHTS, ids=["degla", "igc", "tgc", "distill"])
def test_matches_reference_within_torch_error(b, K, D, weights, dtype):
    x = inputs(b, K, D, dtype)
    want_terms, want_grads = run(reference_f64, *x, K, *weights)
    got_terms, got_grads = run(grounded_loss, *x, K, *weights)
    torch_terms, torch_grads = run(eager, *x, K, *weights)
    assert_within_twice_torch_error([got_terms[0], *got_grads], [torch_terms[0], *torch_grads],
                                    [want_terms[0], *want_grads], dtype)
    for i, name in ((1, "igc"), (2, "tgc"), (3, "distill")):  # the reported unweighted terms
        if weights[i - 1] != 0:
            err, torch_err = (got_terms[i] - want_terms[i]).abs().item(), (torch_terms[i] - want_terms[i]).abs().item()
            assert err <= 2 * torch_err + 1e-3 * (dtype != torch.float32) + 1e-6, name


def test_k0_has_only_distillation():
    x = inputs(6, 0, 16, torch.float32)
    (total, igc, tgc, distill), grads = run(grounded_loss, *x, 0, 0.1, 0.1, 0.005)
    want, want_grads = run(reference_f64, *x, 0, 0.0, 0.0, 0.005)
    assert igc == 0 and tgc == 0
    torch.testing.assert_close(total, want[0], rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_no_out_of_bounds_reads():
    b, K, D = 37, 3, 48
    img, txt, scale, t_img, t_txt = inputs(b, K, D, torch.float32)
    want_terms, want_grads = run(reference_f64, img, txt, scale, t_img, t_txt, K, 0.1, 0.1, 0.005)
    padded = lambda i, t, s, ti, tt, *a: grounded_loss(nan_padded(i), nan_padded(t), s, nan_padded(ti), nan_padded(tt), *a)  # noqa: E731
    got_terms, got_grads = run(padded, img, txt, scale, t_img, t_txt, K, 0.1, 0.1, 0.005)
    for g, w in zip(got_terms + got_grads, want_terms + want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_teacher_needed_for_tgc_and_distill():
    img, txt, scale, _, _ = inputs(2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="no teacher"):
        grounded_loss(img, txt, scale, None, None, 1, 0.1, 0.1, 0.0)
    total, igc, _, _ = grounded_loss(img, txt, scale, None, None, 1, 0.1, 0.0, 0.0)  # IGC alone needs none
    torch.testing.assert_close(total, 0.1 * igc)


@pytest.mark.gpu
def test_compiled_kernel_at_training_size():
    x = inputs(4096, 4, 768, torch.bfloat16)
    want_terms, want_grads = run(eager, *[t.double() for t in x], 4, *WEIGHTS[0])  # vectorised float64
    got_terms, got_grads = run(grounded_loss, *x, 4, *WEIGHTS[0])
    torch_terms, torch_grads = run(eager, *x, 4, *WEIGHTS[0])
    assert_within_twice_torch_error([got_terms[0], *got_grads], [torch_terms[0], *torch_grads],
                                    [want_terms[0], *want_grads], torch.bfloat16)
