"""Autotuned launches with swappable config lists, one list per input-dtype family.

A kernel's configs differ between 16-bit inputs (tensor cores) and fp32 inputs (the IEEE FMA dot, which
spills with the 16-bit tiles), so each family gets its own `triton.autotune` around the same JIT function.
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
FAMILIES = ("16bit", "fp32")


def family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def pinned_kwargs(cfg: triton.Config) -> dict:
    """The launch keywords of one config (what the autotuner would add), for a launch without it."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


class Tuned:
    """A JIT kernel with autotune config lists per dtype family; `launch` picks the family's tuner."""

    def __init__(self, fn, configs: dict[str, list[triton.Config]], key: list[str], **autotune_kwargs):
        self.fn, self.key, self.autotune_kwargs = fn, key, autotune_kwargs
        self._set(configs, do_bench=None)

    def _set(self, configs: dict[str, list[triton.Config]], do_bench: Callable | None) -> None:
        self.configs = configs
        extra = {"do_bench": do_bench} if do_bench is not None else {}  # triton ≥ 3.2; the default times on a GPU
        self.tuners = {fam: triton.autotune(configs=cfgs, key=self.key, **self.autotune_kwargs, **extra)(self.fn)
                       for fam, cfgs in configs.items()}

    def launch(self, grid, dtype: torch.dtype, deterministic: bool, *args, **kwargs) -> None:
        fam = family(dtype)
        if deterministic:
            self.fn[grid](*args, **kwargs, **pinned_kwargs(self.configs[fam][0]))
        else:
            self.tuners[fam][grid](*args, **kwargs)

    def chosen(self, dtype: torch.dtype) -> list[triton.Config]:
        """The configs the family's autotuner has picked so far (one per tuning key)."""
        return list(self.tuners[family(dtype)].cache.values())

    @contextmanager
    def use(self, configs: list[triton.Config] | dict[str, list[triton.Config]], do_bench: Callable | None = None):
        """Swap the config lists (one list: for every family) and the benchmark, with fresh caches."""
        saved = self.configs
        self._set(configs if isinstance(configs, dict) else {fam: configs for fam in FAMILIES}, do_bench)
        try:
            yield self
        finally:
            self._set(saved, do_bench=None)
