"""Preemption: SIGTERM (a scheduler's stop) or SIGUSR1 (SLURM's `--signal=USR1@T`, sent before the time
limit) on any rank makes every rank finish its step, save a checkpoint and exit 0 (the trainer saves at
the next step where the EMA teacher refreshes, so that the resumed run is the uninterrupted one: at most
teacher.refresh_every − 1 steps later).

The handler only records the signal. After each step the ranks agree on it with one tiny all-reduce of a
CPU tensor over a gloo group (the step's own collectives already keep the ranks in lockstep, so it waits
for nothing, and it never touches the GPU), so all of them stop after the same step.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from degla_scale import distributed as D

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Install in the main thread first thing (a signal during start-up is kept for the first step);
    `requested()` after every step; `restore()` at the end."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self._group = None  # made on first use, once the process group exists

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> str | None:
        """Collective: the signal's name if any rank has received one, else None."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        if D.is_dist():
            if self._group is None:
                self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return signal.Signals(int(flag)).name if int(flag) else None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a scheduler signals every process of the job, data workers included;
    they keep serving the last step's batches, and end with their rank."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
