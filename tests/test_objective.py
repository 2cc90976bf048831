"""degla_loss against an explicit-logits reference written here, loop by loop, in float64 (docs/objective.md)."""
import math

import pytest
import torch

from degla_scale.objective import degla_loss

TERMS = ("total", "clip", "igc", "tgc", "distill")


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def ce(logits, target):
    return -(logits[target] - torch.logsumexp(logits, 0))


def reference_loss(img, txt, scale, t_img, t_txt, K, w_igc=0.1, w_tgc=0.1, w_distill=0.005, tau=10.0, official=False):
    """Per-row cross-entropies over explicitly listed logits; negative k of sample i is row b + i*K + k.
    `official`: TGC pairs row i with rows b + k*b + i instead (the official code's grouping, an ablation)."""
    b = img.shape[0]
    pos = txt[:b]
    negs = [[txt[b + i * K + k] for k in range(K)] for i in range(b)]
    tgc_negs = [[txt[b + k * b + i] for k in range(K)] for i in range(b)] if official else negs
    i2t = sum(ce(torch.stack([scale * img[i] @ txt[j] for j in range(len(txt))]), i) for i in range(b)) / b
    t2i = sum(ce(torch.stack([scale * pos[i] @ img[j] for j in range(b)]), i) for i in range(b)) / b
    clip = (i2t + t2i) / 2
    igc = sum(ce(torch.stack([scale * img[i] @ c for c in [pos[i], *negs[i]]]), 0) for i in range(b)) / b
    tgc = sum(ce(torch.stack([tau * pos[i] @ c for c in [t_txt[i], *tgc_negs[i]]]), 0) for i in range(b)) / b
    distill = ((img - t_img) ** 2).sum() + ((txt - t_txt) ** 2).sum()
    total = clip + w_igc * igc + w_tgc * tgc + w_distill * distill
    return {"total": total, "clip": clip, "igc": igc, "tgc": tgc, "distill": distill}


def make_inputs(b, K, D, scale=14.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = unit(torch.randn(b, D, generator=g, dtype=dtype))
    txt = unit(torch.randn(b * (1 + K), D, generator=g, dtype=dtype))
    t_img = unit(img + 0.3 * torch.randn(b, D, generator=g, dtype=dtype))
    t_txt = unit(txt + 0.3 * torch.randn(b * (1 + K), D, generator=g, dtype=dtype))
    return img, txt, torch.tensor(scale, dtype=dtype), t_img, t_txt


def losses_and_grads(fn, img, txt, scale, t_img, t_txt):
    img, txt, scale = (x.clone().requires_grad_(True) for x in (img, txt, scale))
    out = fn(img, txt, scale, t_img, t_txt)
    out["total"].backward()
    return {k: v.detach() for k, v in out.items()}, (img.grad, txt.grad, scale.grad)


def ours(K, **weights):
    def fn(img, txt, scale, t_img, t_txt):
        out = degla_loss(img, txt, scale, t_img, t_txt, num_negatives=K, **weights)
        return {t: getattr(out, t) for t in TERMS}
    return fn


def check_against_reference(b, K, D, scale=14.3, **weights):
    inputs = make_inputs(b, K, D, scale)
    ref_weights = {"w_igc": weights.get("igc_weight", 0.1), "w_tgc": weights.get("tgc_weight", 0.1),
                   "w_distill": weights.get("distill_weight", 0.005)}
    got, got_grads = losses_and_grads(ours(K, **weights), *inputs)
    want, want_grads = losses_and_grads(lambda *a: reference_loss(*a, K, **ref_weights), *inputs)
    for term in TERMS:
        expected = want[term] if term == "total" or term == "clip" or weights.get(f"{term}_weight", 1) != 0 else 0.0
        torch.testing.assert_close(got[term], torch.as_tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12,
                                   msg=f"term {term}")
    for name, g, w in zip(("img", "txt", "scale"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"grad {name}")


@pytest.mark.parametrize("b,K,D", [(8, 4, 16), (5, 3, 7), (1, 4, 8), (1, 0, 8), (6, 0, 12), (7, 1, 9), (3, 5, 33)])
def test_matches_reference(b, K, D):
    check_against_reference(b, K, D)


def test_scale_100():
    check_against_reference(6, 4, 16, scale=100.0)


@pytest.mark.parametrize("zero", ["igc_weight", "tgc_weight", "distill_weight"])
def test_zero_weight_terms_match_reference(zero):
    check_against_reference(5, 3, 8, **{zero: 0.0})


def test_zero_weights_skip_computation():
    """A NaN teacher poisons any term that is computed; with those weights 0 the loss stays finite."""
    img, txt, scale, t_img, t_txt = make_inputs(4, 2, 8)
    nan = torch.full_like(t_img, float("nan")), torch.full_like(t_txt, float("nan"))
    out = degla_loss(img, txt, scale, *nan, num_negatives=2, igc_weight=0.1, tgc_weight=0.0, distill_weight=0.0)
    assert torch.isfinite(out.total) and out.tgc == 0 and out.distill == 0
    out = degla_loss(img, txt, scale, None, None, num_negatives=2, igc_weight=0.0, tgc_weight=0.0, distill_weight=0.0)
    assert out.igc == 0 and torch.isfinite(out.total)
    # NaN negatives reach only IGC/TGC and the global loss; with K = 0 there are none.
    out = degla_loss(img, txt[:4], scale, *nan, num_negatives=0, igc_weight=0.0, tgc_weight=0.0, distill_weight=0.0)
    assert torch.isfinite(out.total)
    with pytest.raises(ValueError, match="teacher"):
        degla_loss(img, txt, scale, None, None, num_negatives=2, tgc_weight=0.1)


def test_zero_igc_weight_does_less_work():
    """Count the ops dispatched: w_igc = 0 must not compute the IGC logits at all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    img, txt, scale, t_img, t_txt = make_inputs(4, 2, 8)
    counts = {}
    for w in (0.0, 0.1):
        with Count() as c:
            degla_loss(img, txt, scale, t_img, t_txt, num_negatives=2, igc_weight=w)
        counts[w] = c.n
    assert counts[0.0] < counts[0.1]


def test_duplicate_captions():
    """Identical positives (two images share a caption) are still separate columns and targets."""
    img, txt, scale, t_img, t_txt = make_inputs(4, 2, 8)
    txt = txt.clone()
    txt[1] = txt[0]
    t_txt = t_txt.clone()
    t_txt[1] = t_txt[0]
    inputs = (img, txt, scale, t_img, t_txt)
    got, got_grads = losses_and_grads(ours(2), *inputs)
    want, want_grads = losses_and_grads(lambda *a: reference_loss(*a, 2), *inputs)
    torch.testing.assert_close(got["total"], want["total"], rtol=1e-10, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_each_sample_uses_its_own_negatives():
    """img_i = pos_i = e_i, and every negative of sample j is unit(Σ_{i≠j} e_i): orthogonal to its own
    sample, but not to any other. Grouped with its own negatives each row's IGC/TGC logits are exactly
    [s, 0, …, 0], so both terms equal log(1 + K·e^{-s}); pairing any row with another sample's negatives
    (e.g. the official code's repeat(1, K), row i with negatives k·b + i) gives a different value."""
    b, K, D, s = 5, 3, 8, 10.0
    eye = torch.eye(D, dtype=torch.float64)
    img = eye[:b].clone()
    neg_BKD = torch.stack([unit(eye[:b].sum(0) - eye[j]).expand(K, D) for j in range(b)])
    txt = torch.cat([img, neg_BKD.reshape(b * K, D)])
    out = degla_loss(img, txt, torch.tensor(s, dtype=torch.float64), img, txt, num_negatives=K, tgc_scale=s)
    expected = math.log(1 + K * math.exp(-s))
    assert out.igc.item() == pytest.approx(expected, rel=1e-9)
    assert out.tgc.item() == pytest.approx(expected, rel=1e-9)

    # The official pairing, computed by hand, differs: that is the mistake this test would catch.
    official_negs = [[txt[b + k * b + i] for k in range(K)] for i in range(b)]
    official = sum(ce(torch.stack([s * img[i] @ c for c in [img[i], *official_negs[i]]]), 0) for i in range(b)) / b
    assert abs(official.item() - expected) > 1e-3


@pytest.mark.parametrize("b,K", [(5, 3), (4, 4), (3, 2)])  # K = 1: both groupings coincide
def test_official_tgc_grouping_ablation_matches_its_reference(b, K):
    inputs = make_inputs(b, K, 8)
    got, got_grads = losses_and_grads(ours(K, tgc_grouping="official"), *inputs)
    want, want_grads = losses_and_grads(lambda *a: reference_loss(*a, K, official=True), *inputs)
    for term in TERMS:
        torch.testing.assert_close(got[term], want[term], rtol=1e-10, atol=1e-12, msg=f"term {term}")
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    own = losses_and_grads(ours(K), *inputs)[0]
    assert abs(own["tgc"] - got["tgc"]) > 1e-6 and own["igc"] == got["igc"]  # only TGC changes
    with pytest.raises(ValueError, match="no Triton kernel"):
        degla_loss(*inputs, num_negatives=K, backend="triton", tgc_grouping="official")


def test_wrong_caption_count_is_rejected():
    img, txt, scale, t_img, t_txt = make_inputs(4, 2, 8)
    with pytest.raises(ValueError, match="num_negatives=3"):
        degla_loss(img, txt, scale, t_img, t_txt, num_negatives=3)


def test_low_precision_inputs_upcast():
    img, txt, scale, t_img, t_txt = make_inputs(8, 4, 16)
    out64 = degla_loss(img, txt, scale, t_img, t_txt, num_negatives=4)
    out16 = degla_loss(img.bfloat16(), txt.bfloat16(), scale.float(), t_img.bfloat16(), t_txt.bfloat16(), num_negatives=4)
    assert out16.total.dtype == torch.float32
    assert out16.total.item() == pytest.approx(out64.total.item(), rel=2e-2)


# ---- the fused Triton backend (interpreted on CPU) against the same float64 reference


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter otherwise


def check_triton_against_reference(b, K, D, scale=14.3, inputs=None, **weights):
    inputs32 = [x.float().to(DEVICE) for x in (inputs or make_inputs(b, K, D, scale))]
    ref_weights = {"w_igc": weights.get("igc_weight", 0.1), "w_tgc": weights.get("tgc_weight", 0.1),
                   "w_distill": weights.get("distill_weight", 0.005)}
    got, got_grads = losses_and_grads(ours(K, backend="triton", **weights), *inputs32)
    want, want_grads = losses_and_grads(lambda *a: reference_loss(*a, K, **ref_weights),
                                        *[x.double().cpu() for x in inputs32])
    for term in TERMS:
        expected = want[term] if term in ("total", "clip") or weights.get(f"{term}_weight", 1) != 0 else 0.0
        torch.testing.assert_close(got[term].double().cpu(), torch.as_tensor(expected, dtype=torch.float64),
                                   rtol=2e-5, atol=1e-6, msg=f"term {term}")
    for name, g, w in zip(("img", "txt", "scale"), got_grads, want_grads):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=2e-6, msg=f"grad {name}")


@pytest.mark.parametrize("b,K,D", [(8, 4, 16), (5, 3, 7), (1, 4, 8), (6, 0, 12), (3, 5, 33)])
def test_triton_backend_matches_reference(b, K, D):
    check_triton_against_reference(b, K, D)


@pytest.mark.parametrize("zero", ["igc_weight", "tgc_weight", "distill_weight"])
def test_triton_backend_zero_weights(zero):
    check_triton_against_reference(5, 3, 8, **{zero: 0.0})


def test_triton_backend_scale_100_and_duplicate_captions():
    check_triton_against_reference(6, 4, 16, scale=100.0)
    img, txt, scale, t_img, t_txt = make_inputs(4, 2, 8)
    txt, t_txt = txt.clone(), t_txt.clone()
    txt[1], t_txt[1] = txt[0], t_txt[0]
    check_triton_against_reference(4, 2, 8, inputs=(img, txt, scale, t_img, t_txt))


def test_triton_backend_groups_each_sample_with_its_own_negatives():
    b, K, D, s = 5, 3, 8, 10.0
    eye = torch.eye(D, device=DEVICE)
    img = eye[:b].clone()
    neg_BKD = torch.stack([unit(eye[:b].sum(0) - eye[j]).expand(K, D) for j in range(b)])
    txt = torch.cat([img, neg_BKD.reshape(b * K, D)])
    out = degla_loss(img, txt, torch.tensor(s, device=DEVICE), img, txt, num_negatives=K, tgc_scale=s, backend="triton")
    expected = math.log(1 + K * math.exp(-s))  # 1.4e-4; fp32's log(1.00014) is good to ~1e-7 absolute
    assert out.igc.item() == pytest.approx(expected, abs=1e-6)  # another sample's negatives: off by > 1e-3
    assert out.tgc.item() == pytest.approx(expected, abs=1e-6)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    img, txt, scale, t_img, t_txt = (x.float() for x in make_inputs(2, 1, 8))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        degla_loss(img, txt, scale, t_img, t_txt, num_negatives=1, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        degla_loss(img, txt, scale, t_img, t_txt, num_negatives=1, backend="cuda")
    assert degla_loss(img, txt, scale, t_img, t_txt, num_negatives=1, backend="auto").total.isfinite()
