"""Preemption: SIGTERM (a scheduler's stop) or SIGUSR1 (SLURM's `--signal=USR1@T`, sent before the time
limit) on any rank makes every rank finish its step, save a checkpoint and exit 0 (the trainer saves at
the next step where the EMA teacher refreshes, so that the resumed run is the uninterrupted one: at most
teacher.refresh_every − 1 steps later).

The handler only records the signal. After each step the ranks agree on it with one tiny all-reduce of a
CPU tensor over a gloo group (the step's own collectives already keep the ranks in lockstep, so it waits
for nothing, and it never touches the GPU), so all of them stop after the same step.
"""
from __future__ import annotations

import os
import signal
import threading

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


WORKER_GRACE_S = 60  # a data worker outlives a SIGTERM by this long at most


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a scheduler signals every process of the job, data workers included. They
    ignore SIGUSR1, and after SIGTERM keep serving batches for WORKER_GRACE_S, so that their rank can finish its
    step and save; the rank normally shuts them down before that. (Ignoring SIGTERM for good would hang an exit
    in which Python's multiprocessing terminates and joins them.)"""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_later)


def _exit_later(signum, frame) -> None:
    timer = threading.Timer(WORKER_GRACE_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
