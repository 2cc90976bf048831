"""Autotuned launches with swappable config lists, one list per group of launches.

A kernel's good configs differ between 16-bit inputs (tensor cores) and fp32 inputs (the IEEE FMA dot,
which spills with the 16-bit tiles), and between tile shapes when the tile is fixed by a launch plan
(a 128×128 tile needs 8 warps), so each group ("16bit", "fp32/64x64", …) gets its own `triton.autotune`
around the same JIT function.
The lists are data, not code: tests replace them (`Tuned.use`) with several configs of different block
sizes and a `do_bench` that really runs the kernel, which is how the autotuner's side effects
(every config writes the outputs while it is timed) are checked on the CPU interpreter.

`deterministic=True` launches the family's first config without autotuning: the same config on
every run and every rank, so the same summation order and bit-identical results.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def family(dtype: torch.dtype) -> str:
    """The dtype family a config list is for: tensor-core 16-bit inputs or fp32."""
    return "fp32" if dtype == torch.float32 else "16bit"


def config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def pinned_kwargs(cfg: triton.Config) -> dict:
    """The launch keywords of one config (what the autotuner would add), for a launch without it."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


class Tuned:
    """A JIT kernel with an autotune config list per group; `launch` uses the group's tuner."""

    def __init__(self, fn, configs: dict[str, list[triton.Config]], key: list[str], **autotune_kwargs):
        self.fn, self.key, self.autotune_kwargs = fn, key, autotune_kwargs
        self._set(configs, do_bench=None)

    def _set(self, configs: dict[str, list[triton.Config]], do_bench: Callable | None) -> None:
        self.configs = configs
        extra = {"do_bench": do_bench} if do_bench is not None else {}  # triton ≥ 3.2; the default times on a GPU
        self.tuners = {group: triton.autotune(configs=cfgs, key=self.key, **self.autotune_kwargs, **extra)(self.fn)
                       for group, cfgs in configs.items()}

    def launch(self, grid, group: str, deterministic: bool, *args, **kwargs) -> None:
        if deterministic:
            self.fn[grid](*args, **kwargs, **pinned_kwargs(self.configs[group][0]))
        else:
            self.tuners[group][grid](*args, **kwargs)

    def chosen(self) -> list[triton.Config]:
        """The configs the autotuners have picked so far (one per group and tuning key)."""
        return [cfg for tuner in self.tuners.values() for cfg in tuner.cache.values()]

    @contextmanager
    def use(self, configs: list[triton.Config], do_bench: Callable | None = None):
        """Give every group these configs and this benchmark, with fresh caches, until the block ends."""
        saved = self.configs
        self._set({group: configs for group in saved}, do_bench)
        try:
            yield self
        finally:
            self._set(saved, do_bench=None)
