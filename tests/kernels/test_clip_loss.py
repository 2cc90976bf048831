"""The fused global contrastive loss against an explicit-logits float64 reference written here.

Tolerance (docs/conventions.md, flash-attention's rule): at each dtype the kernel's error against the float64
result on the same rounded inputs must be at most twice eager PyTorch's own error at that dtype.
On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""
import pytest
import torch

from kernels.clip_loss import clip_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter otherwise


def reference_f64(img, txt, scale, B, offset=0, all_img=None):
    """(i2t + t2i) / 2 with every logit written out, in float64."""
    img, txt, scale = img.double(), txt.double(), scale.double()
    all_img = img if all_img is None else all_img.double()
    b = img.shape[0]
    i2t = torch.stack([torch.logsumexp(scale * txt @ img[i], 0) - scale * img[i] @ txt[offset + i] for i in range(b)])
    t2i = torch.stack([torch.logsumexp(scale * all_img @ txt[offset + i], 0) - scale * txt[offset + i] @ all_img[offset + i]
                       for i in range(b)])
    return (i2t.mean() + t2i.mean()) / 2


def eager(img, txt, scale, B):
    """What a PyTorch user writes, kept in the input dtype (the error baseline)."""
    b = img.shape[0]
    logits = scale * img @ txt.T
    targets = torch.arange(b, device=img.device)
    return (torch.nn.functional.cross_entropy(logits, targets) +
            torch.nn.functional.cross_entropy(scale * txt[:B] @ img.T, targets)) / 2


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def inputs(b, K, D, dtype, scale=14.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = unit(torch.randn(b, D, generator=g, dtype=torch.float64)).to(dtype)
    txt = unit(torch.randn(b * (1 + K), D, generator=g, dtype=torch.float64)).to(dtype)
    return img.to(DEVICE), txt.to(DEVICE), torch.tensor(scale, dtype=dtype, device=DEVICE)


def loss_and_grads(fn, img, txt, scale):
    img, txt, scale = (x.detach().clone().requires_grad_(True) for x in (img, txt, scale))
    loss = fn(img, txt, scale)
    loss.backward()
    return [loss.detach().double(), img.grad.double(), txt.grad.double(), scale.grad.double()]


def assert_within_twice_torch_error(got, torch_result, want, dtype):
    """max |kernel − f64| ≤ 2 · max |torch − f64| + 4 units in the last place of the result's dtype:
    for a single number (the loss, d(scale)) torch's error can be 0 by luck, while a sum over rows in
    another order is a few ulps off."""
    for name, g, t, w in zip(("loss", "img", "txt", "scale"), got, torch_result, want):
        err, torch_err = (g - w).abs().max().item(), (t - w).abs().max().item()
        ulp = 4 * torch.finfo(dtype).eps * w.abs().max().item()
        assert err <= 2 * torch_err + ulp, f"{name}: kernel error {err:.3g} > 2 × torch's {torch_err:.3g} + 4 ulp {ulp:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,K,D", [(37, 3, 48), (16, 4, 32), (1, 4, 16), (8, 0, 24), (64, 1, 64)])
def test_matches_reference_within_torch_error(b, K, D, dtype):
    img, txt, scale = inputs(b, K, D, dtype)
    want = loss_and_grads(lambda i, t, s: reference_f64(i, t, s, b), img, txt, scale)
    got = loss_and_grads(lambda i, t, s: clip_loss(i, t, s, num_pos=b), img, txt, scale)
    torch_result = loss_and_grads(lambda i, t, s: eager(i, t, s, b), img, txt, scale)
    assert_within_twice_torch_error(got, torch_result, want, dtype)


def test_scale_100_fp32_tight():
    img, txt, scale = inputs(20, 4, 40, torch.float32, scale=100.0)
    want = loss_and_grads(lambda i, t, s: reference_f64(i, t, s, 20), img, txt, scale)
    got = loss_and_grads(lambda i, t, s: clip_loss(i, t, s, num_pos=20), img, txt, scale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def nan_padded(x: torch.Tensor, pad_rows: int = 5, pad_cols: int = 7) -> torch.Tensor:
    """x as a view into a NaN-filled buffer with NaN rows around it and NaN columns past its end."""
    rows, cols = x.shape
    buf = torch.full((rows + 2 * pad_rows, cols + pad_cols), float("nan"), dtype=x.dtype, device=x.device)
    view = buf[pad_rows:pad_rows + rows, :cols]
    view.copy_(x)
    return view


def test_no_out_of_bounds_reads():
    """Odd b, K, D inside NaN memory: any read past a row or past the last row poisons the result."""
    b, K, D = 37, 3, 48
    img, txt, scale = inputs(b, K, D, torch.float32)
    want = loss_and_grads(lambda i, t, s: reference_f64(i, t, s, b), img, txt, scale)
    got = loss_and_grads(lambda i, t, s: clip_loss(nan_padded(i), nan_padded(t), s, num_pos=b, chunk_columns=50),
                         img, txt, scale)
    for name, g, w in zip(("loss", "img", "txt", "scale"), got, want):
        assert torch.isfinite(g).all(), f"{name} picked up NaN from outside the inputs"
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_chunked_backward_and_deterministic_mode():
    img, txt, scale = inputs(24, 4, 32, torch.float32)
    whole = loss_and_grads(lambda i, t, s: clip_loss(i, t, s, num_pos=24), img, txt, scale)
    runs = [loss_and_grads(lambda i, t, s: clip_loss(i, t, s, num_pos=24, chunk_columns=32, deterministic=True),
                           img, txt, scale) for _ in range(2)]
    for a, b_, w in zip(runs[0], runs[1], whole):
        assert torch.equal(a, b_)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_saved_for_backward_grows_with_rows_times_width_not_rows_times_columns():
    b, K, D = 64, 4, 16  # b·C = 20480 logits, (b + C)·D = 6144 embedding values
    img, txt, scale = inputs(b, K, D, torch.float32)

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t
        img_, txt_, scale_ = (x.clone().requires_grad_(True) for x in (img, txt, scale))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(img_, txt_, scale_)
        return sum(total)

    C = b * (1 + K)
    fused = saved_bytes(lambda i, t, s: clip_loss(i, t, s, num_pos=b))
    explicit = saved_bytes(lambda i, t, s: eager(i, t, s, b))
    assert explicit >= b * C * 4  # the hook sees the logits the eager path keeps
    assert fused <= 3 * (b + C) * D * 4 + 4 * (b + C) * 4, f"fused path saved {fused} bytes"


def test_rejects_bad_arguments():
    img, txt, scale = inputs(4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="row_offset=3"):
        clip_loss(img, txt, scale, num_pos=4, row_offset=3)
    with pytest.raises(ValueError, match="float64"):
        clip_loss(img.double(), txt.double(), scale, num_pos=4)


@pytest.mark.gpu
def test_compiled_kernel_at_training_size():
    """On a GPU: the compiled kernel (autotuned tiles, several dS chunks) at a real batch, bf16."""
    b, K, D = 1024, 4, 768
    img, txt, scale = inputs(b, K, D, torch.bfloat16)
    f64 = lambda i, t, s: eager(i.double(), t.double(), s.double(), b)  # noqa: E731  (explicit logits fit at this size)
    want = loss_and_grads(f64, img, txt, scale)
    got = loss_and_grads(lambda i, t, s: clip_loss(i, t, s, num_pos=b, chunk_columns=1024), img, txt, scale)
    torch_result = loss_and_grads(lambda i, t, s: eager(i, t, s, b), img, txt, scale)
    assert_within_twice_torch_error(got, torch_result, want, torch.bfloat16)
