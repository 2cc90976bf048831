"""mosaicml-streaming (MDS) shards: the same samples and batches as the webdataset reader, with
StreamingDataset's own deterministic partitioning and resume state.

Columns: `key` str, `jpg` jpeg (the original JPEG bytes), `caption` str, `negatives` json, `types` json.
No pickle columns (unsafe to load).

Resume: every batch advances `DataPosition.stream`, a copy of `StreamingDataLoader.state_dict()` (epoch and
samples consumed over all ranks), which is saved with every checkpoint and loaded before the next
iteration. The state counts samples globally, so it also resumes on another number of ranks.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import torch

from degla_scale.data.reader import Batch, DataError, DataPosition, decode_image_sample
from degla_scale.data.samples import Rejected, pick_negatives

COLUMNS = {"key": "str", "jpg": "jpeg", "caption": "str", "negatives": "json", "types": "json"}


def check_mds(path: str) -> None:
    if not (Path(path) / "index.json").is_file():
        raise DataError(f"data.train_shards={path!r} holds no MDS index.json: make MDS shards with "
                        "launch/make_shards.py --format mds, or set data.format=wds")


def mds_stats(path: str) -> tuple[int, int]:
    """(K negatives of the first sample, number of samples) of local MDS shards."""
    from streaming import LocalDataset

    check_mds(path)
    local = LocalDataset(path)
    return len(local[0].get("negatives") or []), len(local)


def write_mds(out_dir: Path, records: Iterator[dict], shard_bytes: int = 1 << 26) -> int:
    """Write {key, jpg (JPEG bytes), caption, negatives, types} records as MDS shards; returns the count."""
    import tempfile

    from PIL import Image
    from streaming import MDSWriter

    count = 0
    with tempfile.TemporaryDirectory() as tmp, MDSWriter(out=str(out_dir), columns=COLUMNS, size_limit=shard_bytes) as sink:
        scratch = Path(tmp) / "image.jpg"
        for record in records:
            # streaming's jpeg encoding stores a JPEG opened from a named file byte for byte; from memory
            # it would re-encode it (at quality 75)
            scratch.write_bytes(record["jpg"])
            with Image.open(scratch) as image:
                sink.write({**record, "jpg": image})
            count += 1
    return count


def _dataset_class():
    from streaming import StreamingDataset

    class DeGLAStreamingDataset(StreamingDataset):
        """Decodes, checks and transforms each sample in the loader's workers, and picks its K negatives for
        `self.pick_epoch` (set before each epoch's workers start); a bad sample comes back as
        {"error": reason} so the collate step can count and replace it."""

        def __init__(self, *, num_negatives: int, transform: Callable, negatives_pick: str, pick_seed: int, **kwargs):
            super().__init__(**kwargs)
            self.num_negatives, self.transform = num_negatives, transform
            self.negatives_pick, self.pick_seed, self.pick_epoch = negatives_pick, pick_seed, 0

        def get_item(self, idx: int, retry: int = 7):
            try:
                sample = super().get_item(idx, retry)
            except Exception:  # an undecodable jpeg column raises inside streaming
                return {"error": "unreadable_image"}
            try:
                # streaming opens the jpeg column lazily, so a reduced-size draft still applies
                image, caption, negatives = decode_image_sample(sample["jpg"], sample["caption"],
                                                                sample.get("negatives") or [], self.num_negatives,
                                                                getattr(self.transform, "draft_size", None))
            except Rejected as exc:
                return {"error": exc.reason}
            negatives = pick_negatives(negatives, self.num_negatives, self.negatives_pick, self.pick_seed,
                                       self.pick_epoch, sample["key"])
            return {"key": sample["key"], "image": self.transform(image), "caption": caption, "negatives": negatives}

    return DeGLAStreamingDataset


def _collate(tokenize: Callable):
    def collate(samples: list[dict]) -> Batch:
        good = [s for s in samples if "error" not in s]
        rejected = Counter(s["error"] for s in samples if "error" in s)
        if not good:
            raise DataError(f"a whole batch of {len(samples)} MDS samples is unreadable ({dict(rejected)}): "
                            "remake the shards with launch/make_shards.py")
        # Keep the batch size (ranks gather equal-sized features): repeat good samples in the bad ones' places.
        good = good + [good[i % len(good)] for i in range(len(samples) - len(good))]
        positives = [s["caption"] for s in good]
        negatives = [n for s in good for n in s["negatives"]]
        return Batch(torch.stack([s["image"] for s in good]), tokenize(positives + negatives),
                     [s["key"] for s in good], rejected=rejected)
    return collate


def _BatchLoader(*args, **kwargs):
    from streaming import StreamingDataLoader

    class BatchLoader(StreamingDataLoader):
        """Counts our `Batch` objects' samples, which its state (samples yielded) is made of."""

        def _get_batch_size(self, batch: Batch) -> int:
            return len(batch.keys)

    return BatchLoader(*args, **kwargs)


class MDSReader:
    """Iterates one epoch of batches for this rank from a `DataPosition`, updating it as it goes."""

    def __init__(self, path: str | list[str], *, batch_size: int, num_negatives: int, num_workers: int, seed: int,
                 transform: Callable, tokenize: Callable, weights: list[float] | None = None,
                 remotes: list[str | None] | None = None, negatives_pick: str = "first", pin_memory: bool = False):
        """`path`: one MDS folder, or several mixed by `weights` (streaming's Stream proportions); a source
        with a `remotes` entry is downloaded from there into its folder, a local cache. `pin_memory`: batches
        arrive in page-locked memory (CUDA)."""
        from streaming import Stream
        from streaming.base.util import clean_stale_shared_memory

        paths = [path] if isinstance(path, str) else list(path)
        remotes = remotes or [None] * len(paths)
        for p, remote in zip(paths, remotes):
            if remote is None:
                check_mds(p)
        # The DeepSpeed launcher sets LOCAL_SIZE; streaming reads LOCAL_WORLD_SIZE to lay out its shared memory.
        if "LOCAL_SIZE" in os.environ:
            os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])
        clean_stale_shared_memory()  # left behind by a killed run (every rank calls it: it ends in a barrier)
        if len(paths) == 1:
            where = {"local": paths[0], "remote": remotes[0]}
        else:
            weights = weights or [1.0] * len(paths)
            where = {"streams": [Stream(local=p, remote=r, proportion=w / sum(weights))
                                 for p, r, w in zip(paths, remotes, weights)]}
        self.dataset = _dataset_class()(**where, batch_size=batch_size, shuffle=True, shuffle_seed=seed,
                                        num_negatives=num_negatives, transform=transform,
                                        negatives_pick=negatives_pick, pick_seed=seed)
        self.loader = _BatchLoader(self.dataset, batch_size=batch_size, num_workers=num_workers,
                                   collate_fn=_collate(tokenize), drop_last=True, pin_memory=pin_memory,
                                   prefetch_factor=4 if num_workers else None, persistent_workers=False)

    def epoch(self, position: DataPosition) -> Iterator[Batch]:
        """Yield this rank's batches of `position.epoch` from `position.batches` on, forever (caller stops)."""
        if position.stream is not None:  # resume mid-epoch, or start the next epoch from the last one's state
            state = position.stream
            if state["epoch"] != position.epoch:
                state = {**state, "epoch": position.epoch, "sample_in_epoch": 0}
            self.loader.load_state_dict(state)
        elif position.epoch or position.batches:
            raise DataError(f"the checkpoint's data position (epoch {position.epoch}, batch {position.batches}) holds no "
                            "MDS state: was it written with data.format=wds? Resume with the same format")
        self.dataset.pick_epoch = position.epoch  # the workers, started by the loop below, copy the dataset
        rejected = Counter(position.rejected)
        for batch in self.loader:
            rejected.update(batch.rejected)
            position.batches += 1
            position.rejected = dict(rejected)
            position.stream = self.loader.state_dict()
            yield batch
        raise DataError(f"the MDS epoch ended after {position.batches} batches on this rank: "
                        "data.num_samples exceeds the samples in the shards")
