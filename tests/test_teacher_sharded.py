"""The ZeRO-1/2/3 sharded EMA teachers against a replicated float64 EMA computed here from the student's weights.

Two gloo ranks train a small model (sizes chosen so DeepSpeed pads its partitions) for a few steps, with
and without the EMA offloaded to a host thread; after every optimizer step the test folds the student's
full weights into its own EMA. The sharded teacher's gathered fp32 EMA, its refreshed forward weights and
(ZeRO-3) its forward output must equal that EMA's to fp32 rounding, and its checkpoint must load back on
2 ranks (own shards) and on 1 rank (re-partitioned from teacher.pt).

ZeRO-1/2 also train in bf16 on the CPU: with DeepSpeedZeroOptimizer, and (gradients accumulated in fp32) with
BF16_Optimizer at ZeRO-1, whose fp32 partitions the teacher reads from other attributes. The EMA then
follows the fp32 master weights, not the bf16 module, so the reference does too.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from degla_scale.distributed import free_port

ALPHA, STEPS = 0.8, 5
# DeepSpeed config per precision: bf16 accumulates gradients in bf16 (DeepSpeedZeroOptimizer); with them in fp32,
# DeepSpeed wraps ZeRO-1 in its BF16_Optimizer instead
PRECISIONS = {"fp32": {}, "bf16": {"bf16": {"enabled": True}},
              "bf16-fp32accum": {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 5)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def _engine(stage, precision="fp32"):
    import deepspeed

    torch.manual_seed(0)
    model = Small()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, **PRECISIONS[precision]}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _teacher(stage, engine, **kwargs):
    """The trainer's choice of layout: a replicated module (ZeRO-1/2) or a second, optimizer-less stage-3 engine."""
    if stage < 3:
        from degla_scale.teacher_sharded import ShardedEMATeacher

        return ShardedEMATeacher(engine, ALPHA, **kwargs)
    import deepspeed

    from degla_scale.teacher_sharded import ZeRO3EMATeacher

    torch.manual_seed(123)  # weights unlike the student's: the teacher's must all come from the EMA shards
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}, "steps_per_print": 1 << 30}
    teacher_engine, *_ = deepspeed.initialize(model=Small().requires_grad_(False), config=config)
    return ZeRO3EMATeacher(engine, teacher_engine, ALPHA, **kwargs)


def _full(params):
    """Full values of possibly ZeRO-3-partitioned parameters, by name."""
    import deepspeed

    params = dict(params)
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _masters(engine):
    """The student's full fp32 master weights by name: what the EMA folds in (under bf16 the module holds bf16 copies)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def _init(rank, world, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from degla_scale import accelerator

    accelerator.configure()
    import deepspeed

    deepspeed.init_distributed(dist_backend=accelerator.dist_backend())


def _train(rank, world, port, stage, offload, precision, out_dir):
    _init(rank, world, port)
    engine = _engine(stage, precision)
    dtype = next(engine.module.parameters()).dtype  # what DeepSpeed trains in (inputs must match it)
    teacher = _teacher(stage, engine, refresh_every=2, offload=offload)
    start = _masters(engine)
    ema = {n: p.double() for n, p in start.items()}
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x = torch.randn(4, 7, generator=g).to(dtype)
        with torch.no_grad():  # as in training: the teacher's forward runs between refreshes
            (teacher.engine if stage == 3 else teacher.module)(x)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        teacher.update(engine.module)
        for n, p in _masters(engine).items():
            ema[n] = ALPHA * ema[n] + (1 - ALPHA) * p.double()
    moved = max((p - start[n]).abs().max().item() for n, p in _masters(engine).items())
    teacher.refresh()
    full = teacher.full_state_dict()
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(99))
    output = teacher.engine(x) if stage == 3 else None  # the teacher's own forward (gathers its partitions)
    forward_weights = _full(teacher.module.named_parameters())
    tag = out_dir / "tag"
    tag.mkdir(exist_ok=True)
    teacher.save(tag, rank)
    reloaded = _teacher(stage, engine)  # starts from the student, then loads its own shards
    reloaded.load(tag, rank)
    torch.save({"ema": ema, "full": full, "forward": forward_weights, "reloaded": reloaded.full_state_dict(),
                "updates": reloaded.updates, "x": x, "output": output, "dtype": dtype, "moved": moved,
                "optimizer": type(engine.optimizer).__name__}, out_dir / f"rank{rank}.pt")
    _shutdown()


def _reload_one_rank(rank, world, port, stage, precision, out_dir):
    _init(rank, world, port)
    teacher = _teacher(stage, _engine(stage, precision))
    teacher.load(out_dir / "tag", rank)  # 2-rank shards do not fit: re-partition teacher.pt
    torch.save({"full": teacher.full_state_dict(), "updates": teacher.updates}, out_dir / "one_rank.pt")
    _shutdown()


def _shutdown():
    """Tear the process group down before exit: gloo threads still alive at interpreter exit can abort it."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _optimizer_class(stage, precision):
    """The ZeRO optimizer DeepSpeed must pick: the sharded teacher reads its fp32 partitions."""
    if stage == 3:
        return "DeepSpeedZeroOptimizer_Stage3"
    return "BF16_Optimizer" if precision == "bf16-fp32accum" else "DeepSpeedZeroOptimizer"


@pytest.mark.parametrize("stage,offload,precision", [
    (1, False, "fp32"), (1, True, "fp32"), (2, False, "fp32"), (2, True, "fp32"), (3, False, "fp32"), (3, True, "fp32"),
    (1, False, "bf16"), (2, False, "bf16"), (1, False, "bf16-fp32accum"),
], ids=["zero1", "zero1-offload", "zero2", "zero2-offload", "zero3", "zero3-offload",
        "zero1-bf16", "zero2-bf16", "zero1-bf16-fp32accum"])
def test_sharded_teacher_equals_replicated_ema_and_reloads_on_fewer_ranks(tmp_path, stage, offload, precision):
    mp.spawn(_train, args=(2, free_port(), stage, offload, precision, tmp_path), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    bf16 = precision != "fp32"
    # The EMA and the masters it folds in are fp32 whatever the training precision, so it matches the float64
    # reference to fp32 rounding in bf16 too. The bf16 forward weights are that EMA rounded to nearest: within
    # 2^-9 relative (bf16 keeps 8 significant bits), asserted as 2^-8.
    forward_rtol = 2 ** -8 if bf16 else 1e-6
    for r in results:
        assert r["updates"] == STEPS
        assert r["dtype"] == (torch.bfloat16 if bf16 else torch.float32)
        assert r["optimizer"] == _optimizer_class(stage, precision)
        assert r["moved"] > 1e-2  # the student trained: an EMA of unmoving weights would match trivially
        for name, want in r["ema"].items():
            torch.testing.assert_close(r["full"][name].double(), want, rtol=1e-6, atol=1e-7, msg=name)
            torch.testing.assert_close(r["forward"][name].double(), want, rtol=forward_rtol, atol=1e-7, msg=name)
            torch.testing.assert_close(r["forward"][name], r["full"][name].to(r["dtype"]), rtol=0, atol=0, msg=name)
            torch.testing.assert_close(r["reloaded"][name], r["full"][name], rtol=0, atol=0, msg=name)
        if stage == 3:
            want = torch.func.functional_call(Small().double(), r["ema"], (r["x"].double(),))
            torch.testing.assert_close(r["output"].double(), want, rtol=1e-5, atol=1e-6)
    for name in results[0]["ema"]:  # the ranks trained on different data but hold one student and one EMA
        torch.testing.assert_close(results[0]["full"][name], results[1]["full"][name], rtol=0, atol=0)

    mp.spawn(_reload_one_rank, args=(1, free_port(), stage, precision, tmp_path), nprocs=1, join=True)
    one = torch.load(tmp_path / "one_rank.pt")
    assert one["updates"] == STEPS
    for name, value in results[0]["full"].items():
        torch.testing.assert_close(one["full"][name], value, rtol=0, atol=0, msg=name)
