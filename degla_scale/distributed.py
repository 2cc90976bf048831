"""Process-group helpers: start-up that works with or without a launcher, and all-gather with gradient."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size() -> int:
    """Ranks on this node: the DeepSpeed launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE."""
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def from_slurm(env: dict) -> dict:
    """The launcher variables of a rank started by SLURM's `srun` (one task per GPU, no launcher): RANK,
    WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from SLURM's; MASTER_ADDR/PORT come from the batch script.
    Empty unless this is such a task."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return {}
    # SLURM_TASKS_PER_NODE reads like "4(x2)" or "4,3"; this node's count is SLURM_NTASKS_PER_NODE when given
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(int(per_node))}


def ensure_launcher_env() -> None:
    """Let `python launch/train.py` run as a one-process job without a launcher, or as one task of `srun`."""
    os.environ.update(from_slurm(os.environ))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" not in os.environ:
        from degla_scale.config import ConfigError

        raise ConfigError("srun started this rank without MASTER_ADDR: export MASTER_ADDR=$(scontrol show hostnames "
                          "$SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT in the batch script (README: multi-node)")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward hands each rank the sum of all ranks' gradients for its rows."""

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, group):
        ctx.group = group
        ctx.rows = x_RD.shape[0]
        world = dist.get_world_size(group)
        x_RD = x_RD.contiguous()
        if dist.get_backend(group) == "nccl":
            out_WRD = x_RD.new_empty((world * x_RD.shape[0], *x_RD.shape[1:]))
            dist.all_gather_into_tensor(out_WRD, x_RD, group=group)
            return out_WRD
        parts = [torch.empty_like(x_RD) for _ in range(world)]
        dist.all_gather(parts, x_RD, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_WRD: torch.Tensor):
        grad_WRD = grad_WRD.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            grad_RD = grad_WRD.new_empty((ctx.rows, *grad_WRD.shape[1:]))
            dist.reduce_scatter_tensor(grad_RD, grad_WRD, group=ctx.group)
        else:  # gloo has no reduce_scatter: all-reduce and keep this rank's slice
            dist.all_reduce(grad_WRD, group=ctx.group)
            start = dist.get_rank(ctx.group) * ctx.rows
            grad_RD = grad_WRD[start:start + ctx.rows]
        return grad_RD, None


def all_gather_with_grad(x_RD: torch.Tensor, group=None) -> torch.Tensor:
    """[R, ...] per rank → [W·R, ...] in rank order, differentiable (identity with one process)."""
    if not is_dist() or dist.get_world_size(group) == 1:
        return x_RD
    return _AllGatherWithGrad.apply(x_RD, group)
