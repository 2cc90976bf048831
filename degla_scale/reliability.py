"""Non-finite losses and gradients: one policy (`reliability.nonfinite`), the same at every ZeRO stage and
precision.

Detection. Each step records, on the device, which loss terms were non-finite and whether the gradients
were; the flags are read (one small all-gather) only at log steps and before a checkpoint is written,
so detection adds no host sync to the step. The gradient verdict comes from the optimizer: DeepSpeed's
ZeRO-1/2/3 and BF16 optimizers already take the global gradient norm every step and skip the update
when it is not finite (counted in `engine.skipped_steps`); ZeRO-0 in fp32 hands the step to the plain
torch optimizer, which checks nothing, so `install_gradient_gate` gives it the same check.

Policy. stop: the run ends at the next read, before any checkpoint holding the bad step is written, so
`resume: auto` continues from the last good one. skip: the step's update (weights, optimizer state, EMA
teacher, learning-rate schedule) is dropped on every rank alike; the data and the step counter move on.
Skipping needs the verdict on the host before the update, which the DeepSpeed optimizers read anyway; at
ZeRO-0 fp32 the gate reads one flag per step, and only under skip.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from degla_scale import distributed as D

TERMS = ("clip", "igc", "tgc", "distill")  # the loss terms checked, then "gradients"


class RunStopped(RuntimeError):
    """The run stopped itself on a rule of its config; the message is one line (exit code 3)."""


class NonFiniteError(RunStopped):
    """The run stopped on a non-finite loss or gradient."""


class NonFiniteWatch:
    """The first non-finite step since the last read on this rank, and what was non-finite in it, on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.first_step = torch.zeros((), dtype=torch.long, device=self.device)  # 0: none yet
        self.what_F = torch.zeros(len(TERMS) + 1, dtype=torch.bool, device=self.device)  # terms…, gradients

    def record(self, step: int, loss_terms_T: torch.Tensor, grads_bad: torch.Tensor | bool) -> None:
        """`loss_terms_T`: this step's [clip, igc, tgc, distill] (any micro-batch non-finite taints the sum)."""
        # a host bool becomes a fill kernel's argument: no host-to-device copy, which would wait for the GPU
        grads_1 = grads_bad.reshape(1).to(self.device) if torch.is_tensor(grads_bad) else \
            torch.full((1,), bool(grads_bad), dtype=torch.bool, device=self.device)
        bad_F = torch.cat([~torch.isfinite(loss_terms_T), grads_1])
        new = bad_F.any() & (self.first_step == 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.what_F = torch.where(new, bad_F, self.what_F)

    def read(self) -> str | None:
        """Collective: the earliest bad step over all ranks as 'step S, rank R, loss term clip' (None if none); resets."""
        local = torch.cat([self.first_step.reshape(1), self.what_F.long()])
        if D.is_dist():
            parts = [torch.empty_like(local) for _ in range(D.world_size())]
            dist.all_gather(parts, local)
        else:
            parts = [local]
        self.reset()
        found = [(int(p[0]), rank, p[1:].tolist()) for rank, p in enumerate(parts) if int(p[0]) > 0]
        if not found:
            return None
        # the earliest step; in it, a rank whose own loss went bad (every rank sees the all-reduced gradients)
        step, rank, what = min(found, key=lambda f: (f[0], not any(f[2][:len(TERMS)]), f[1]))
        terms = [t for t, bad in zip(TERMS, what) if bad]
        return f"step {step}, rank {rank}, " + (f"loss term {', '.join(terms)}" if terms else "gradients")


class GradientGate:
    """The non-finite check DeepSpeed's own optimizers make, for a plain torch optimizer (ZeRO-0 fp32).

    Wraps `optimizer.step`: takes the norm of the (already all-reduced and clipped: NaN and inf survive
    clipping) gradients on the device; under skip it reads that flag and, when it is set, sets
    `optimizer.overflow`, which the engine reads to skip the learning-rate step and count the skip."""

    def __init__(self, optimizer: torch.optim.Optimizer, skip: bool):
        self.optimizer, self.skip, self._step = optimizer, skip, optimizer.step
        self.bad = torch.zeros((), dtype=torch.bool)
        optimizer.overflow = False
        optimizer.step = self.step

    @torch.no_grad()
    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.bad = ~torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads \
            else torch.zeros((), dtype=torch.bool)
        self.optimizer.overflow = self.skip and bool(self.bad)
        if self.optimizer.overflow:
            return None  # the engine zeroes the gradients after every step
        return self._step(*args, **kwargs)


def install_gradient_gate(engine, skip: bool) -> GradientGate | None:
    """A gate for the optimizers that check nothing; None for DeepSpeed's own, which skip by themselves."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        return None
    return GradientGate(engine.optimizer, skip)
