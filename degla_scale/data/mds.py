"""mosaicml-streaming (MDS) shards: the same samples and batches as the webdataset reader, with
StreamingDataset's own deterministic partitioning and resume state.

Columns: `key` str, `jpg` jpeg (the original JPEG bytes), `caption` str, `negatives` json, `types` json,
`crc` uint32 (`samples.sample_crc`; shards written before it have none and are not checked). No pickle
columns (unsafe to load).

Damaged shards: streaming checks a shard's hash only when it downloads one (and only if asked), and reads a
local shard's offsets as they are. So this reader reads each sample's bytes itself (`read_columns`) and
checks them: a shard cut short, empty, or with broken offsets or column sizes gives `damaged_shard` for each
sample it cannot frame (the samples before a cut still read); then the same checks as the webdataset reader
(`samples.decode_checked`), each under its own reason. Every sample index of the epoch is asked for once,
so every sample is used or counted.

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

from degla_scale.data.reader import Batch, DataError, DataPosition
from degla_scale.preemption import ignore_in_worker
from degla_scale.data.samples import Rejected, decode_checked, parse_json, pick_negatives, sample_crc

COLUMNS = {"key": "str", "jpg": "jpeg", "caption": "str", "negatives": "json", "types": "json", "crc": "uint32"}


def check_mds(path: str) -> None:
    if not (Path(path) / "index.json").is_file():
        raise DataError(f"data.train_shards={path!r} holds no MDS index.json: make MDS shards with "
                        "launch/make_shards.py --format mds, or set data.format=wds")


def mds_stats(path: str) -> tuple[int, int]:
    """(K negatives of the first readable sample, number of samples) of local MDS shards."""
    from streaming import LocalDataset

    check_mds(path)
    local = LocalDataset(path)
    for idx in range(min(len(local), 1000)):
        shard_id, rel = local.spanner[idx]
        try:
            negatives = parse_json(read_columns(local.shards[shard_id], rel)[0]["negatives"])
        except (Rejected, KeyError):
            continue
        return len(negatives) if isinstance(negatives, list) else 0, len(local)
    raise DataError(f"none of the first {min(len(local), 1000)} samples in {path} is readable: the MDS shards are "
                    "damaged, remake them with launch/make_shards.py")


def shard_path(shard) -> str:
    """The local file of a streaming shard reader."""
    return os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)


def read_columns(shard, rel: int) -> tuple[dict[str, bytes], str]:
    """Sample `rel` of a streaming MDS shard reader → ({column: its bytes}, shard path), every offset and size
    checked against the file; raises `Rejected` (damaged_shard) where streaming would read past the end, read
    garbage or fail on a short buffer. (An MDS shard: uint32 sample count, count + 1 uint32 offsets, then
    each sample: uint32 sizes of its variable-size columns, then the columns' bytes in order.)"""
    path, n = shard_path(shard), shard.samples
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4)
            if len(head) < 4 or int.from_bytes(head, "little") != n:
                raise Rejected("damaged_shard", f"{path}: {size} bytes, its sample count does not read {n}")
            f.seek(4 + 4 * rel)
            pair = f.read(8)
            begin, end = int.from_bytes(pair[:4], "little"), int.from_bytes(pair[4:], "little")
            if len(pair) < 8 or not 4 * (n + 2) <= begin <= end <= size:
                raise Rejected("damaged_shard", f"{path}: sample {rel}'s offsets are outside its {size} bytes")
            f.seek(begin)
            data = f.read(end - begin)
    except OSError as exc:
        raise Rejected("damaged_shard", f"{path}: {type(exc).__name__}") from None
    sizes, at = [], 0
    for fixed in shard.column_sizes:
        if fixed:
            sizes.append(fixed)
        else:
            sizes.append(int.from_bytes(data[at:at + 4], "little"))
            at += 4
    if at + sum(sizes) != len(data):
        raise Rejected("damaged_shard", f"{path}: sample {rel}'s column sizes do not add up to its bytes")
    columns = {}
    for name, length in zip(shard.column_names, sizes):
        columns[name] = data[at:at + length]
        at += length
    return columns, path


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
            crc = sample_crc(record["key"], record["jpg"], record["caption"].encode("utf-8"), record["negatives"])
            with Image.open(scratch) as image:
                sink.write({**record, "jpg": image, "crc": crc})
            count += 1
    return count


def _dataset_class():
    from streaming import StreamingDataset

    class DeGLAStreamingDataset(StreamingDataset):
        """Decodes, checks and transforms each sample in the loader's workers, and picks its K negatives for
        `self.pick_epoch` (set before each epoch's workers start); a bad sample comes back as
        {"error": reason, "shard": path, "idx": idx} so the collate step can count and replace it."""

        def __init__(self, *, num_negatives: int, transform: Callable, negatives_pick: str, pick_seed: int, **kwargs):
            super().__init__(**kwargs)
            self.num_negatives, self.transform = num_negatives, transform
            self.negatives_pick, self.pick_seed, self.pick_epoch = negatives_pick, pick_seed, 0

        def get_item(self, idx: int, retry: int = 7):
            shard_id, rel = self.spanner[idx]
            shard = self.shards[shard_id]
            path = shard_path(shard)
            try:
                if not os.path.isfile(path):  # a remote stream's shard not here yet: streaming downloads it
                    try:
                        self.prepare_shard(shard_id)
                    except Exception as exc:
                        raise Rejected("damaged_shard", f"{path} is missing ({type(exc).__name__})") from None
                columns, path = read_columns(shard, rel)
                return self._decode(columns)
            except Rejected as exc:
                return {"error": exc.reason, "shard": path, "idx": idx}

        def _decode(self, columns: dict[str, bytes]) -> dict:
            if "key" not in columns or "jpg" not in columns or "caption" not in columns:
                raise Rejected("malformed_record", f"the shards have columns {sorted(columns)}")
            negatives = parse_json(columns["negatives"]) if "negatives" in columns else []
            crc = int.from_bytes(columns["crc"], "little") if "crc" in columns else None
            image, caption, negatives = decode_checked(columns["key"], columns["jpg"], columns["caption"],
                                                       negatives or [], crc, self.num_negatives,
                                                       getattr(self.transform, "draft_size", None))
            key = columns["key"].decode("utf-8", "replace")
            negatives = pick_negatives(negatives, self.num_negatives, self.negatives_pick, self.pick_seed,
                                       self.pick_epoch, key)
            return {"key": key, "image": self.transform(image), "caption": caption, "negatives": negatives}

    return DeGLAStreamingDataset


def _collate(tokenize: Callable, dataset):
    """Samples → a Batch of the same size: bad samples are counted and their places filled with the good ones
    of the batch; a batch with none is filled with the next readable sample of the dataset after its first
    (deterministic, so a resumed run fills it alike), not counted again."""
    def collate(samples: list[dict]) -> Batch:
        good = [s for s in samples if "error" not in s]
        bad = [s for s in samples if "error" in s]
        rejected = Counter(s["error"] for s in bad)
        examples = {}
        for s in bad:
            examples.setdefault(s["error"], s["shard"])
        if not good:
            good = [_next_readable(dataset, bad[0]["idx"])]
        # Keep the batch size (ranks gather equal-sized features): repeat good samples in the bad ones' places.
        good = good + [good[i % len(good)] for i in range(len(samples) - len(good))]
        positives = [s["caption"] for s in good]
        negatives = [n for s in good for n in s["negatives"]]
        return Batch(torch.stack([s["image"] for s in good]), tokenize(positives + negatives),
                     [s["key"] for s in good], rejected=rejected, read=len(samples), reject_examples=examples)
    return collate


def _next_readable(dataset, idx: int) -> dict:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    dataset = info.dataset if info is not None else dataset  # this worker's copy
    n = dataset.size
    for step in range(1, n):
        sample = dataset.get_item((idx + step) % n)
        if "error" not in sample:
            return sample
    raise DataError(f"no sample of the {n} in the MDS shards is readable (e.g. {dataset.get_item(idx)['shard']}): "
                    "remake the shards with launch/make_shards.py")


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
                                   collate_fn=_collate(tokenize, self.dataset), drop_last=True, pin_memory=pin_memory,
                                   prefetch_factor=4 if num_workers else None, persistent_workers=False,
                                   worker_init_fn=ignore_in_worker)

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
        for batch in self.loader:
            position.batches += 1
            position.add(batch)
            position.stream = self.loader.state_dict()
            yield batch
        raise DataError(f"the MDS epoch ended after {position.batches} batches on this rank: "
                        "data.num_samples exceeds the samples in the shards")
