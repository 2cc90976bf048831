"""The kernels' autotuning and launch plan: what a GPU does that the single interpreter config never shows.

On a GPU the autotuner times every config on the caller's buffers before the first result is used,
so a config that leaves an output slot unwritten inherits whatever the config timed before it wrote
there. Here each autotuned kernel gets several configs of different block sizes and a `do_bench`
that really runs the kernel, and the *first* call is checked against the float64 reference.
"""
import itertools

import pytest
import torch

import kernels.clip_loss as cl
from kernels.launch_plan import MIN_WAVES, forward_plan
from kernels.tuning import config
from test_clip_loss import inputs, loss_and_grads, reference_f64


def running_bench(timings_ms, calls):
    """A do_bench that runs the kernel once per config, as triton's does, and reports the given times."""
    times = iter(timings_ms)

    def bench(kernel_call, quantiles=None):
        kernel_call()
        calls.append(1)
        t = next(times)
        return [t, t, t]
    return bench


FWD_SETS = {"BLOCK_K 16|32": [config(1, 1, BLOCK_K=16), config(1, 1, BLOCK_K=32)],
            "BLOCK_K 32|16|16": [config(1, 1, BLOCK_K=32), config(1, 1, BLOCK_K=16), config(2, 1, BLOCK_K=16)]}
BWD_SETS = {"BLOCK_M 32|16": [config(1, 1, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16), config(1, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)],
            "BLOCK_N 16|32|32": [config(1, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), config(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                                 config(1, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)]}


@pytest.mark.parametrize("winner", ["first", "last"])
@pytest.mark.parametrize("fwd_set,bwd_set", list(zip(FWD_SETS, BWD_SETS)))
def test_first_autotuned_call_matches_reference(fwd_set, bwd_set, winner, monkeypatch):
    monkeypatch.setattr(cl, "INTERPRET_SMS", 3)  # several column splits at this size
    b, K, D = 37, 3, 40  # C = 148 columns: not a multiple of any tile
    img, txt, scale = inputs(b, K, D, torch.float32)
    want = loss_and_grads(lambda i, t, s: reference_f64(i, t, s, b), img, txt, scale)
    fwd_cfgs, bwd_cfgs = FWD_SETS[fwd_set], BWD_SETS[bwd_set]

    def timings(n):  # the chosen winner is the fastest; the others take turns being timed last
        return ([1.0] + [2.0] * (n - 1) if winner == "first" else [2.0] * (n - 1) + [1.0]) * 4
    fwd_calls, bwd_calls = [], []
    with cl.LSE_FWD.use(fwd_cfgs, running_bench(timings(len(fwd_cfgs)), fwd_calls)), \
            cl.DSCORES.use(bwd_cfgs, running_bench(timings(len(bwd_cfgs)), bwd_calls)):
        got = loss_and_grads(lambda i, t, s: cl.clip_loss(i, t, s, num_pos=b, chunk_columns=64), img, txt, scale)
        chosen_fwd, chosen_bwd = cl.LSE_FWD.chosen(), cl.DSCORES.chosen()
    assert len(fwd_calls) == len(fwd_cfgs) and len(bwd_calls) >= len(bwd_cfgs), "every config was timed"
    want_fwd = fwd_cfgs[0] if winner == "first" else fwd_cfgs[-1]
    assert chosen_fwd == [want_fwd] and (bwd_cfgs[0] if winner == "first" else bwd_cfgs[-1]) in chosen_bwd
    for name, g, w in zip(("loss", "img", "txt", "scale"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} on the first call: {m}")


@pytest.mark.parametrize("sms", [1, 4, 64])
@pytest.mark.parametrize("b,C", [(37, 148), (5, 77), (64, 193)])
def test_forward_splits_at_odd_shapes(b, C, sms, monkeypatch):
    monkeypatch.setattr(cl, "INTERPRET_SMS", sms)
    plan = forward_plan(b, C, 24, sms, list(cl.FWD_CONFIGS["fp32"]))
    if sms == 64:
        assert plan.splits > 1, plan
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(b, 24, generator=g, dtype=torch.float64), dim=-1).float()
    txt = torch.nn.functional.normalize(torch.randn(C, 24, generator=g, dtype=torch.float64), dim=-1).float()
    scale = torch.tensor(20.0)
    want = loss_and_grads(lambda i, t, s: reference_f64(i, t, s, b), img, txt, scale)
    got = loss_and_grads(lambda i, t, s: cl.clip_loss(i, t, s, num_pos=b), img, txt, scale)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-6)


GPU_TILES = list(cl.GPU_FWD_CONFIGS["16bit"])  # the compiled bf16/fp16 kernels' tiles


@pytest.mark.parametrize("b", [256, 512, 1024, 4096, 16384])
@pytest.mark.parametrize("C", [8192, 20480, 81920, 327680, 10**6])
def test_plan_fills_two_waves_on_132_sms(b, C):
    plan = forward_plan(b, C, 768, 132, GPU_TILES)
    assert plan.waves(132) >= MIN_WAVES, plan


@pytest.mark.parametrize("b", [1, 32, 37, 100, 256, 1000, 4096, 16384])
@pytest.mark.parametrize("C", [1, 160, 8192, 81920, 999_983, 10**6])
@pytest.mark.parametrize("sms", [1, 108, 132, 148])
def test_plan_covers_every_row_and_column_once(b, C, sms):
    plan = forward_plan(b, C, 768, sms, GPU_TILES)
    col_tiles = -(-C // plan.block_n)
    assert (plan.block_m, plan.block_n) in GPU_TILES
    assert (plan.row_blocks - 1) * plan.block_m < b <= plan.row_blocks * plan.block_m
    assert (plan.splits - 1) * plan.tiles_per_split < col_tiles <= plan.splits * plan.tiles_per_split  # no empty split
    assert plan.programs <= max(4 * sms, plan.row_blocks) + plan.row_blocks  # partial buffers stay small
    if b <= 64:
        assert plan.block_m == 64, "a short batch does not pay for 128-row tiles"


def test_plan_for_the_data_parallel_shape():
    """b = 256 local rows against 64 ranks × 256 × (1 + 4) gathered texts: was 2 programs, 98.5% idle."""
    plan = forward_plan(256, 81920, 768, 132, GPU_TILES)
    assert (plan.block_m, plan.block_n) == (128, 128) and plan.waves(132) >= MIN_WAVES


@pytest.mark.parametrize("b,C,sms", [x for x in itertools.product([0, 4], repeat=3) if 0 in x])
def test_plan_rejects_empty_problems(b, C, sms):
    with pytest.raises(ValueError, match="needs b, C, num_sms"):
        forward_plan(b, C, 8, sms, GPU_TILES)


def test_objective_deterministic_gives_bit_identical_losses(tmp_path):
    """objective.deterministic=true: two runs whose autotuners would pick different configs (as two
    processes timing on a noisy GPU can) give the same bits, because one pinned config runs."""
    from degla_scale.config import load_config
    from degla_scale.trainer import objective_loss

    cfg = load_config("configs/tiny.yaml", ["objective.backend=triton", "objective.deterministic=true"])
    b, K, D = 12, cfg.data.num_negatives, 40
    g = torch.Generator().manual_seed(2)
    x = [torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1) for n in (b, b * (1 + K), b, b * (1 + K))]
    scale = torch.tensor(14.3)
    fwd = [config(1, 1, BLOCK_K=16), config(1, 1, BLOCK_K=32)]
    bwd = [config(1, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), config(1, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)]

    def one_run(favoured, deterministic):
        cfg.objective.deterministic = deterministic
        times = lambda n: [1.0 if i == favoured else 2.0 for i in range(n)] * 8  # noqa: E731
        with cl.LSE_FWD.use(fwd, running_bench(times(2), [])), cl.DSCORES.use(bwd, running_bench(times(2), [])):
            img, txt = (t.clone().requires_grad_(True) for t in x[:2])
            out = objective_loss(cfg, img, txt, scale, x[2], x[3])
            out.total.backward()
            chosen = cl.LSE_FWD.chosen() + cl.DSCORES.chosen()
        return [out.total.detach(), out.clip.detach(), img.grad, txt.grad], chosen

    tuned = [one_run(favoured, deterministic=False) for favoured in (0, 1)]
    assert tuned[0][1] != tuned[1][1], "the autotuned runs picked different configs"
    pinned = [one_run(favoured, deterministic=True) for favoured in (0, 1)]
    assert pinned[0][1] == pinned[1][1] == [], "no autotuning when deterministic"
    for a, b_ in zip(pinned[0][0], pinned[1][0]):
        assert torch.equal(a, b_)
    for a, w in zip(pinned[0][0], tuned[0][0]):  # and it is the same loss
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
