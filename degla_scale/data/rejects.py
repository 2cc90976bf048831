"""The reject budget: stop a run whose shards are too damaged or too bad to train on.

Both readers count every sample they could not use under one of `samples.REASONS` (a damaged shard's lost
samples included), with one example shard path per reason and the samples read (used + rejected), in the
rank's `DataPosition`, which checkpoints keep. At log steps the trainer sums them over ranks
(`reject_totals`) and calls `check_reject_budget`, which raises `DataError` with one line once more than
data.max_rejected_fraction of the samples read were rejected.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from degla_scale.data.reader import DataError, DataPosition


def reject_totals(positions: Iterable[DataPosition]) -> tuple[dict[str, int], int, dict[str, str]]:
    """Every rank's `DataPosition` (e.g. gathered with `all_gather_object`, in rank order) → (rejected by
    reason, samples read, an example shard per reason): the arguments of `check_reject_budget`."""
    rejected, read, examples = Counter(), 0, {}
    for p in positions:
        rejected.update(p.rejected)
        read += p.samples_read
        for reason, path in p.reject_examples.items():
            examples.setdefault(reason, path)
    return dict(rejected), read, examples


def check_reject_budget(rejected: dict[str, int], samples_read: int, examples: dict[str, str],
                        max_fraction: float) -> None:
    """Raise `DataError` (one line: the fraction, the counts by reason, an example shard and the fix) when
    sum(rejected) / samples_read > max_fraction. `samples_read` counts used and rejected samples alike; it is
    taken as at least the rejects (a position from before it was counted resumes at 0)."""
    total = sum(rejected.values())
    if total == 0:
        return
    read = max(int(samples_read), total)
    fraction = total / read
    if fraction <= max_fraction:
        return
    ranked = sorted(((n, r) for r, n in rejected.items() if n), key=lambda nr: (-nr[0], nr[1]))
    counts = ", ".join(f"{r} {n}" for n, r in ranked)
    example = next((examples[r] for _, r in ranked if examples.get(r)), None)
    where = f"; e.g. shard {example}".replace("\n", "\\n") if example else ""
    raise DataError(f"{100 * fraction:.3g}% of {read} samples read were rejected (> data.max_rejected_fraction="
                    f"{max_fraction}): {counts}{where}: fix or remake those shards, or raise data.max_rejected_fraction")
