"""The ZeRO-1/2 sharded EMA teacher against a replicated float64 EMA computed here from the student's weights.

Two gloo ranks train a small model (with and without the EMA offloaded to a host thread) (sizes chosen so DeepSpeed pads its flat buffers) for a few steps;
after every optimizer step the test folds the student's full weights into its own EMA. The sharded
teacher's gathered fp32 EMA and its refreshed forward weights must equal that EMA to fp32 rounding, and
its checkpoint must load back on 2 ranks (own shards) and on 1 rank (re-partitioned from teacher.pt).
"""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from degla_scale.distributed import free_port

ALPHA, STEPS = 0.8, 5


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 5)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def _engine(stage):
    import deepspeed

    torch.manual_seed(0)
    model = Small()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _init(rank, world, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from degla_scale import accelerator

    accelerator.configure()
    import deepspeed

    deepspeed.init_distributed(dist_backend=accelerator.dist_backend())


def _train(rank, world, port, stage, offload, out_dir):
    _init(rank, world, port)
    from degla_scale.teacher import ShardedEMATeacher

    engine = _engine(stage)
    teacher = ShardedEMATeacher(engine, ALPHA, refresh_every=2, offload=offload)
    ema = {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x = torch.randn(4, 7, generator=g)
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        teacher.update(engine.module)
        for n, p in engine.module.named_parameters():  # ZeRO-1/2 keep the full student on every rank
            ema[n] = ALPHA * ema[n] + (1 - ALPHA) * p.detach().double()
    teacher.refresh()
    full = teacher.full_state_dict()
    forward_weights = {n: p.detach().clone() for n, p in teacher.module.named_parameters()}
    tag = out_dir / "tag"
    tag.mkdir(exist_ok=True)
    teacher.save(tag, rank)
    reloaded = ShardedEMATeacher(engine, ALPHA)  # starts from the student, then loads its own shards
    reloaded.load(tag, rank)
    torch.save({"ema": ema, "full": full, "forward": forward_weights, "reloaded": reloaded.full_state_dict(),
                "updates": reloaded.updates}, out_dir / f"rank{rank}.pt")
    _shutdown()


def _reload_one_rank(rank, world, port, stage, out_dir):
    _init(rank, world, port)
    from degla_scale.teacher import ShardedEMATeacher

    teacher = ShardedEMATeacher(_engine(stage), ALPHA)
    teacher.load(out_dir / "tag", rank)  # 2-rank shards do not fit: re-partition teacher.pt
    torch.save({"full": teacher.full_state_dict(), "updates": teacher.updates}, out_dir / "one_rank.pt")
    _shutdown()


def _shutdown():
    """Tear the process group down before exit: gloo threads still alive at interpreter exit can abort it."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (2, True)], ids=["zero1", "zero2", "zero2-offload"])
def test_sharded_teacher_equals_replicated_ema_and_reloads_on_fewer_ranks(tmp_path, stage, offload):
    mp.spawn(_train, args=(2, free_port(), stage, offload, tmp_path), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in results:
        assert r["updates"] == STEPS
        for name, want in r["ema"].items():
            torch.testing.assert_close(r["full"][name].double(), want, rtol=1e-6, atol=1e-7, msg=name)
            torch.testing.assert_close(r["forward"][name].double(), want, rtol=1e-6, atol=1e-7, msg=name)
            torch.testing.assert_close(r["reloaded"][name], r["full"][name], rtol=0, atol=0, msg=name)
    for name in results[0]["ema"]:  # the ranks trained on different data but hold one student and one EMA
        torch.testing.assert_close(results[0]["full"][name], results[1]["full"][name], rtol=0, atol=0)

    mp.spawn(_reload_one_rank, args=(1, free_port(), stage, tmp_path), nprocs=1, join=True)
    one = torch.load(tmp_path / "one_rank.pt")
    assert one["updates"] == STEPS
    for name, value in results[0]["full"].items():
        torch.testing.assert_close(one["full"][name], value, rtol=0, atol=0, msg=name)
