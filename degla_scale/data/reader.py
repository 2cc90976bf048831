"""webdataset reader: (image, positive, K negatives) batches, split by rank and worker, resumable mid-epoch.

Shapes: images [b, 3, H, W]; tokens [b·(1+K), L], positives first, then negatives sample-major.

Determinism is what makes resume exact and keeps ranks in step:
- each (epoch, pass) shuffles the shard list with a seeded RNG and deals shards to (rank, worker)
  slots round-robin; passes repeat forever, so every rank can always fill its `steps_per_epoch`
  batches (uneven shards would otherwise leave ranks with different batch counts and hang collectives);
- the in-worker sample shuffle is seeded by (seed, epoch, rank, worker, pass) and stays within a pass;
- every batch carries how many raw samples its worker had consumed, so a resumed worker skips exactly
  those (before decoding), and the loader re-emits batches in the original worker round-robin order.
"""
from __future__ import annotations

import glob
import json
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from degla_scale.data.samples import Rejected, check_texts, decode_rgb, pick_negatives


class DataError(ValueError):
    """Shards missing or inconsistent with the config; one line naming the path and the fix."""


def list_shards(spec: str) -> list[str]:
    """A directory of .tar files, a brace pattern, or a glob → sorted shard paths."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    elif "{" in spec:
        import braceexpand

        shards = list(braceexpand.braceexpand(spec))
    else:
        shards = sorted(glob.glob(spec))
    if not shards:
        raise DataError(f"data.train_shards={spec!r} matches no .tar shards: make them with launch/make_shards.py or fix the path")
    return shards


def read_manifest(spec: str) -> dict | None:
    """The manifest.json written beside the shards by launch/make_shards.py, if any."""
    path = Path(spec)
    folder = path if path.is_dir() else path.parent
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def peek_num_negatives(shards: list[str]) -> int:
    """K of the data, from the first sample's json (when there is no manifest)."""
    for sample in wds.DataPipeline(wds.SimpleShardList(shards[:1]), wds.tarfile_to_samples()):
        return len(json.loads(sample["json"]).get("negatives", [])) if "json" in sample else 0
    raise DataError(f"shard {shards[0]} holds no samples: remake it")


def write_wds(path: Path, records) -> int:
    """Write {key, jpg (JPEG bytes), caption, negatives, types} records as one .tar shard; the file appears
    (by rename) only once complete. Returns the count."""
    partial, count = Path(f"{path}.partial"), 0
    with wds.TarWriter(str(partial)) as sink:
        for r in records:
            sink.write({"__key__": r["key"], "jpg": r["jpg"], "txt": r["caption"],
                        "json": {"negatives": r["negatives"], "types": r["types"]}})
            count += 1
    partial.replace(path)
    return count


@dataclass
class Batch:
    images: torch.Tensor  # [b, 3, H, W] uint8 (normalised on the device: degla_scale/data/images.py)
    tokens: torch.Tensor  # [b·(1+K), L]
    keys: list[str]
    worker: int = 0
    consumed: int = 0  # raw samples this worker has read this epoch, up to and including this batch
    rejected: Counter = field(default_factory=Counter)  # bad samples skipped while building this batch

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this in its pinning thread
        return replace(self, images=self.images.pin_memory(), tokens=self.tokens.pin_memory())


class MixedSamples(IterableDataset):
    """This (rank, worker) slot's raw samples, forever: per source, pass after pass, each pass's shards dealt
    to slots from a seeded shard order and its samples shuffled within the pass (so one epoch holds no
    repeats when the shards divide evenly); several sources are interleaved by weight with a seeded RNG.
    A fixed sequence, so skipping its first n samples resumes it exactly."""

    def __init__(self, sources: list[list[str]], weights: list[float], seed: int, epoch: int, rank: int, world: int,
                 shuffle_buffer: int):
        self.sources, self.weights, self.shuffle_buffer = sources, weights, shuffle_buffer
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world

    def _source(self, shards: list[str], source: int) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slots = self.world * workers  # ShardReader checked there are at least this many shards
        slot = self.rank * workers + worker
        tag = f"/{source}" if source else ""  # source 0 keeps the single-source order
        for data_pass in range(1 << 30):
            order = list(shards)
            random.Random(f"{self.seed}/{self.epoch}/{data_pass}{tag}").shuffle(order)
            samples = wds.DataPipeline(wds.SimpleShardList(order[slot::slots]),
                                       wds.tarfile_to_samples(handler=wds.warn_and_continue))
            rng = random.Random(f"shuffle/{self.seed}/{self.epoch}/{self.rank}/{worker}/{data_pass}{tag}")
            yield from _shuffled(samples, self.shuffle_buffer, rng)

    def __iter__(self):
        streams = [self._source(shards, i) for i, shards in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(f"mix/{self.seed}/{self.epoch}/{self.rank}/{_worker_id()}")
        choices = range(len(streams))
        while True:
            yield next(streams[rng.choices(choices, self.weights)[0]])


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info else 0


def _shuffled(samples, bufsize: int, rng: random.Random):
    """webdataset-style buffer shuffle with our own RNG (seeded, so a resumed run replays it)."""
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) > bufsize:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def decode_sample(sample: dict, num_negatives: int, draft_size: int | None = None) -> tuple[Image.Image, str, list[str]]:
    """webdataset sample → (RGB image, positive, all its negatives); raises `Rejected`."""
    if "jpg" not in sample:
        raise Rejected("missing_image", "the sample has no jpg")
    if "txt" not in sample:
        raise Rejected("empty_caption", "the sample has no txt")
    try:
        negatives = json.loads(sample["json"]).get("negatives", []) if "json" in sample else []
    except (ValueError, AttributeError):
        raise Rejected("malformed_record", "its json is not an object") from None
    return decode_image_sample(sample["jpg"], sample["txt"].decode("utf-8"), negatives, num_negatives, draft_size)


def decode_image_sample(image: bytes | Image.Image, caption: str, negatives: list[str], num_negatives: int,
                        draft_size: int | None = None) -> tuple[Image.Image, str, list[str]]:
    """(JPEG bytes or opened image, caption, negatives) → (RGB image, positive, all its negatives), checked as
    the converter checks records; raises `Rejected`. Shared by both shard formats. `draft_size`: see
    `decode_rgb` (the transform's output side, when it downsizes anyway)."""
    rgb = decode_rgb(image, draft_size)
    return rgb, check_texts(caption, negatives, num_negatives), list(negatives)


def _batches(batch_size: int, num_negatives: int, pick: str, seed: int, epoch: int, transform: Callable,
             tokenize: Callable, skip: list[int]):
    """Skip already-consumed raw samples, decode the rest, drop (and count) bad ones, pick K negatives, batch."""
    def stage(samples):
        worker = _worker_id()
        to_skip = skip[worker] if worker < len(skip) else 0
        consumed, rejected = 0, Counter()
        images, positives, negatives, keys = [], [], [], []
        for sample in samples:
            consumed += 1
            if consumed <= to_skip:
                continue
            try:
                image, caption, negs = decode_sample(sample, num_negatives, getattr(transform, "draft_size", None))
            except Rejected as exc:
                rejected[exc.reason] += 1
                continue
            images.append(transform(image))
            positives.append(caption)
            negatives.extend(pick_negatives(negs, num_negatives, pick, seed, epoch, sample["__key__"]))
            keys.append(sample["__key__"])
            if len(keys) == batch_size:
                yield Batch(torch.stack(images), tokenize(positives + negatives), keys, worker, consumed, rejected)
                images, positives, negatives, keys, rejected = [], [], [], [], Counter()
    return stage


@dataclass
class DataPosition:
    """Where a rank is in its data stream; stored in every checkpoint."""

    epoch: int = 0
    batches: int = 0  # batches delivered this epoch
    consumed: list[int] = field(default_factory=list)  # raw samples consumed per worker this epoch
    rejected: dict = field(default_factory=dict)  # bad samples skipped so far, by reason (whole run)
    stream: dict | None = None  # MDS: StreamingDataLoader.state_dict() after the last batch

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "consumed": self.consumed, "rejected": dict(self.rejected),
                "stream": self.stream}

    @classmethod
    def from_json(cls, d: dict) -> "DataPosition":
        return cls(d["epoch"], d["batches"], list(d["consumed"]), dict(d.get("rejected", {})), d.get("stream"))


def reshard_position(saved: list[DataPosition], saved_accum: int, accum: int, num_workers: int, batch_size: int,
                     rank: int) -> DataPosition:
    """This rank's position when a run resumes on another number of ranks (same global batch).

    It keeps the epoch and the optimizer step within it. webdataset: it skips as many raw samples per worker
    as the new layout would have read by then; shards are dealt to (rank, worker) slots, so the new ranks'
    streams are not the old ones and within this epoch the skip is by count, not by sample. MDS: the
    streaming state counts samples over all ranks, so it carries over exactly. The run-wide reject counts
    stay with rank 0 so that their sum over ranks is unchanged."""
    epochs = {p.epoch for p in saved}
    steps = {p.batches // saved_accum for p in saved}
    if len(epochs) != 1 or len(steps) != 1:
        raise DataError(f"the saved ranks disagree on their data position (epochs {sorted(epochs)}, steps {sorted(steps)}): "
                        "the checkpoint is inconsistent")
    batches = steps.pop() * accum
    workers = max(num_workers, 1)
    consumed = [len(range(w, batches, workers)) * batch_size for w in range(workers)]
    rejected = dict(sum((Counter(p.rejected) for p in saved), Counter())) if rank == 0 else {}
    return DataPosition(epochs.pop(), batches, consumed, rejected, saved[0].stream)  # MDS state counts globally


class ShardReader:
    """Iterates one epoch of batches for this rank from a `DataPosition`, updating it as it goes."""

    def __init__(self, shards: list[str] | list[list[str]], *, batch_size: int, num_negatives: int, num_workers: int,
                 shuffle_buffer: int, seed: int, rank: int, world: int, transform: Callable, tokenize: Callable,
                 weights: list[float] | None = None, negatives_pick: str = "first", pin_memory: bool = False):
        """`shards`: one source's shard paths, or one list per source, mixed by `weights`. `pin_memory`: batches
        arrive in page-locked memory (CUDA), so their copy to the device can overlap compute."""
        self.pin_memory = pin_memory
        self.sources = [shards] if shards and isinstance(shards[0], str) else shards
        self.weights = weights or [1.0] * len(self.sources)
        self.batch_size, self.num_negatives, self.negatives_pick = batch_size, num_negatives, negatives_pick
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.rank, self.world, self.transform, self.tokenize = rank, world, transform, tokenize
        slots = world * max(num_workers, 1)
        for shards in self.sources:
            if len(shards) < slots:
                raise DataError(f"{len(shards)} shards for {world} ranks × {max(num_workers, 1)} workers (in {Path(shards[0]).parent}): "
                                "make more, smaller shards or lower data.num_workers")

    def epoch(self, position: DataPosition) -> Iterator[Batch]:
        """Yield this rank's batches of `position.epoch` from `position.batches` on, forever (caller stops)."""
        workers = max(self.num_workers, 1)
        if not position.consumed:
            position.consumed = [0] * workers
        if len(position.consumed) != workers:
            raise DataError(f"checkpoint was written with {len(position.consumed)} data workers but data.num_workers="
                            f"{self.num_workers}: resume with the same number of workers")
        pipeline = wds.DataPipeline(
            MixedSamples(self.sources, self.weights, self.seed, position.epoch, self.rank, self.world,
                         self.shuffle_buffer),
            _batches(self.batch_size, self.num_negatives, self.negatives_pick, self.seed, position.epoch, self.transform,
                     self.tokenize, list(position.consumed)),
        )
        loader = DataLoader(pipeline, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.num_workers else None)
        # DataLoader hands out worker 0, 1, ... in turn from each restart; after a mid-epoch resume the
        # next batch belongs to worker (batches % workers), so hold the others back until their turn.
        pending: dict[int, deque] = {w: deque() for w in range(workers)}
        rejected = Counter(position.rejected)
        stream = iter(loader)
        while True:
            want = position.batches % workers
            while not pending[want]:
                batch = next(stream)
                pending[batch.worker].append(batch)
            batch = pending[want].popleft()
            rejected.update(batch.rejected)
            position.batches += 1
            position.consumed[batch.worker] = batch.consumed
            position.rejected = dict(rejected)
            yield batch
