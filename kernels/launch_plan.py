"""The forward's launch plan: tile shape and column splits for (b rows, C columns, D width, SM count).

One program per row block streaming all C columns leaves most SMs idle whenever b is small next to C,
which is exactly data parallelism (b = 256 local rows against C = 81920 gathered texts gives 2
programs for 132 SMs). The plan splits the column range over programs as well: grid = row blocks ×
splits, each program writing a partial (max-shifted) LSE per row, merged afterwards by a logsumexp.

Rule: among the tiles no taller than b needs (a 128-row tile for 32 rows computes 75% padding), take
the largest (most reuse per loaded byte) whose grid reaches `MIN_WAVES` waves; split the columns into
equal runs of whole tiles so the grid has about `TARGET_WAVES` waves of programs. A wave is
`num_sms` programs (one resident program per SM, the conservative count). Pure Python: testable for
any GPU without one.
"""
from __future__ import annotations

from dataclasses import dataclass

TARGET_WAVES = 4  # aim: balanced tails; a plan with fewer than MIN_WAVES is used only when no tile reaches it
MIN_WAVES = 2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ForwardPlan:
    block_m: int
    block_n: int
    row_blocks: int
    splits: int
    tiles_per_split: int
    """Column tiles each program streams (the last split may hold fewer)."""

    @property
    def grid(self) -> tuple[int, int]:
        return (self.row_blocks, self.splits)

    @property
    def programs(self) -> int:
        return self.row_blocks * self.splits

    def waves(self, num_sms: int) -> float:
        return self.programs / num_sms


def _plan_for_tile(b: int, C: int, block_m: int, block_n: int, num_sms: int) -> ForwardPlan:
    row_blocks, col_tiles = cdiv(b, block_m), cdiv(C, block_n)
    wanted_splits = min(col_tiles, cdiv(TARGET_WAVES * num_sms, row_blocks))
    tiles_per_split = cdiv(col_tiles, wanted_splits)
    return ForwardPlan(block_m, block_n, row_blocks, cdiv(col_tiles, tiles_per_split), tiles_per_split)


def forward_plan(b: int, C: int, D: int, num_sms: int, tiles: list[tuple[int, int]]) -> ForwardPlan:
    """tiles: the (BLOCK_M, BLOCK_N) shapes the kernel is built for, largest first. D does not change the
    grid (the D loop is inside a program) but is part of the signature so a rule that needs it can."""
    if b < 1 or C < 1 or num_sms < 1:
        raise ValueError(f"forward_plan needs b, C, num_sms ≥ 1, got b={b}, C={C}, num_sms={num_sms}")
    smallest_m = min(bm for bm, _ in tiles)
    useful = [(bm, bn) for bm, bn in tiles if bm <= max(smallest_m, 1 << (b - 1).bit_length())]
    plans = [_plan_for_tile(b, C, bm, bn, num_sms) for bm, bn in useful]
    for plan in plans:
        if plan.waves(num_sms) >= MIN_WAVES:
            return plan
    return max(plans, key=lambda p: (p.programs, p.block_m * p.block_n))  # a small problem: as parallel as it gets
