"""webdataset reader: (image, positive, K negatives) batches, split by rank and worker, resumable mid-epoch.

Shapes: images [b, 3, H, W]; tokens [b·(1+K), L], positives first, then negatives sample-major.

Determinism is what makes resume exact and keeps ranks in step:
- each (epoch, pass) shuffles the shard list with a seeded RNG and deals shards to (rank, worker)
  slots round-robin; passes repeat forever, so every rank can always fill its `steps_per_epoch`
  batches (uneven shards would otherwise leave ranks with different batch counts and hang collectives);
- the in-worker sample shuffle is seeded by (seed, epoch, rank, worker, pass) and stays within a pass;
- every batch carries how many raw samples its worker had consumed, so a resumed worker skips exactly
  those (before decoding), and the loader re-emits batches in the original worker round-robin order.

Damaged data (`shard_samples`): the tar files are read by our own loop over `tarfile`, grouping members by
key as webdataset does, so that what a damaged shard loses is counted rather than dropped in a warning.
A shard that is empty, cut short or breaks off at a corrupt header (Python's tarfile then simply stops)
counts the samples it did not deliver under `damaged_shard`, from its own sample count (the `__shard__`
member `write_wds` puts first) or manifest.json's `shard_samples`; with neither readable (a zero-byte
shard made elsewhere) it counts 1, the event, since how many samples it held cannot be known. Every
bad sample is counted under one of `samples.REASONS`; `DataPosition` keeps the counts, an example
shard per reason and the samples read, which `rejects.check_reject_budget` holds against
data.max_rejected_fraction.
"""
from __future__ import annotations

import glob
import io
import json
import random
import tarfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from degla_scale.preemption import ignore_in_worker
from degla_scale.data.samples import Rejected, decode_checked, parse_json, pick_negatives, sample_crc

SHARD_INFO = "__shard__"  # first member of a shard written by write_wds: {"samples": n}; webdataset skips such names
EMPTY_PASSES = 4  # passes in a row in which a (rank, worker) slot found no usable sample before it gives up


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


def shard_counts(shards: list[str]) -> dict[str, int]:
    """{shard path: samples written} from the manifest.json beside the shards (its `shard_samples`, which
    degla_scale/data/convert.py writes), for the shards it lists; {} without one."""
    manifests, counts = {}, {}
    for p in shards:
        folder = str(Path(p).parent)
        if folder not in manifests:
            listed = (read_manifest(folder) or {}).get("shard_samples")
            manifests[folder] = listed if isinstance(listed, dict) else {}
        n = manifests[folder].get(Path(p).name)
        if isinstance(n, int) and n >= 0:
            counts[p] = n
    return counts


def peek_num_negatives(shards: list[str]) -> int:
    """K of the data, from the first readable sample's json (when there is no manifest)."""
    for shard in shards:
        for sample in shard_samples(shard):
            if "__lost__" in sample:
                continue
            if "json" not in sample:
                return 0
            try:
                return len(parse_json(sample["json"]).get("negatives", []))
            except (Rejected, AttributeError, TypeError):
                continue
    raise DataError(f"no shard of {len(shards)} (from {shards[0]}) holds a readable sample: remake them")


def write_wds(path: Path, records) -> int:
    """Write {key, jpg (JPEG bytes), caption (str, or bytes as stored), negatives, types} records as one .tar
    shard; the file appears (by rename) only once complete. Returns the count.

    The first member, `__shard__`, holds {"samples": n}, so a reader can count what a damaged copy lost;
    each sample's json holds its `crc32` (`samples.sample_crc`)."""
    records = list(records)
    partial = Path(f"{path}.partial")
    with wds.TarWriter(str(partial)) as sink:
        info = json.dumps({"samples": len(records)}).encode()
        member = tarfile.TarInfo(SHARD_INFO)
        member.size, member.mtime, member.mode = len(info), time.time(), 0o444
        sink.tarstream.addfile(member, io.BytesIO(info))
        for r in records:
            caption = r["caption"].encode("utf-8") if isinstance(r["caption"], str) else bytes(r["caption"])
            sink.write({"__key__": r["key"], "jpg": r["jpg"], "txt": caption,
                        "json": {"negatives": r["negatives"], "types": r["types"],
                                 "crc32": sample_crc(r["key"], r["jpg"], caption, r["negatives"])}})
    partial.replace(path)
    return len(records)


def shard_samples(path: str, expected: int | None = None) -> Iterator[dict]:
    """The samples of one .tar shard, then, if the shard is damaged, one marker
    {"__lost__": n, "__reason__": "damaged_shard", "__url__": path} for the n samples it did not deliver.

    A sample is {"__key__", "__url__", ext: bytes, ...}: consecutive members whose names share the part before
    the first '.' of the file name (webdataset's grouping); names like `__x__` are metadata, not samples.
    Damaged: the file does not open or is empty; tarfile raises (data cut off inside a member, a corrupt
    first header); or the members stop without the end-of-archive blocks after them (tarfile ends quietly
    at a corrupt header or at a cut between members). The last sample of a damaged shard is delivered
    only if it holds the same members as the shard's first sample (else it was cut). n = the shard's
    sample count (`expected`, from manifest.json; else its `__shard__` member) minus those delivered;
    1 when neither count is readable, since the lost samples cannot then be counted."""
    delivered, shape, info, problem, current = 0, None, None, None, None
    try:
        f = open(path, "rb")
    except OSError as exc:
        f, problem = None, f"{type(exc).__name__}"
    if f is not None:
        with f:
            try:
                tar = tarfile.open(fileobj=f, mode="r|*")
            except Exception as exc:  # empty file, corrupt first header, not a tar
                tar, problem = None, f"{type(exc).__name__}: {exc}"
            members = iter(tar) if tar is not None else iter(())
            while True:
                try:
                    member = next(members)
                    data = tar.extractfile(member).read() if member.isreg() else None
                    tar.members = []  # stream mode keeps every member's header otherwise
                except StopIteration:
                    break
                except Exception as exc:  # cut inside a member's data, a broken pax header, ...
                    problem = f"{type(exc).__name__}: {exc}"
                    break
                name = member.name
                if data is None:
                    continue
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    if name == SHARD_INFO:
                        info = _shard_info(data)
                    continue
                folder, _, base = name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or not stem:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if current is not None and key != current["__key__"]:
                    shape = shape or frozenset(current)
                    yield current
                    delivered += 1
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": path}
                ext = ext.lower()
                if ext in current:
                    current["__bad__"] = f"two {ext} files"
                current[ext] = data
            if tar is not None and problem is None and getattr(tar.fileobj, "comptype", "tar") == "tar":
                f.seek(tar.offset)
                if f.read(1024) != bytes(1024):
                    problem = f"no end-of-archive blocks at byte {tar.offset}"
    if current is not None and (problem is None or frozenset(current) == shape):
        yield current
        delivered += 1
    if problem is not None:
        count = expected if expected is not None else info
        lost = 1 if count is None else count - delivered
        if lost > 0:
            yield {"__lost__": lost, "__reason__": "damaged_shard", "__url__": path, "__detail__": problem}


def _shard_info(data: bytes) -> int | None:
    try:
        samples = json.loads(data.decode("utf-8")).get("samples")
    except (ValueError, AttributeError):
        return None
    return samples if isinstance(samples, int) and samples >= 0 else None


@dataclass
class Batch:
    images: torch.Tensor  # [b, 3, H, W] uint8 (normalised on the device: degla_scale/data/images.py)
    tokens: torch.Tensor  # [b·(1+K), L]
    keys: list[str]
    worker: int = 0
    consumed: int = 0  # raw samples this worker has read this epoch, up to and including this batch
    rejected: Counter = field(default_factory=Counter)  # bad samples skipped while building this batch
    read: int = 0  # raw samples this batch took from its stream: its own plus the rejected ones
    reject_examples: dict = field(default_factory=dict)  # reason → a shard path where one of `rejected` came from

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this in its pinning thread
        return replace(self, images=self.images.pin_memory(), tokens=self.tokens.pin_memory())


class MixedSamples(IterableDataset):
    """This (rank, worker) slot's raw samples, forever: per source, pass after pass, each pass's shards dealt
    to slots from a seeded shard order and its samples shuffled within the pass (so one epoch holds no
    repeats when the shards divide evenly); several sources are interleaved by weight with a seeded RNG.
    A fixed sequence, so skipping its first n samples resumes it exactly. Besides samples it carries
    markers (not samples: `consumed` does not count them): a damaged shard's {"__lost__": n, ...} and
    {"__pass__": source} after each pass. `counts`: shard path → samples written (manifest.json);
    `passes`: stop after that many passes (None: never)."""

    def __init__(self, sources: list[list[str]], weights: list[float], seed: int, epoch: int, rank: int, world: int,
                 shuffle_buffer: int, counts: dict[str, int] | None = None, passes: int | None = None):
        self.sources, self.weights, self.shuffle_buffer = sources, weights, shuffle_buffer
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.counts, self.passes = counts or {}, passes

    def _source(self, shards: list[str], source: int) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slots = self.world * workers  # ShardReader checked there are at least this many shards
        slot = self.rank * workers + worker
        tag = f"/{source}" if source else ""  # source 0 keeps the single-source order
        for data_pass in range(self.passes if self.passes is not None else 1 << 30):
            order = list(shards)
            random.Random(f"{self.seed}/{self.epoch}/{data_pass}{tag}").shuffle(order)
            samples = (dict(sample, __source__=source) for shard in order[slot::slots]
                       for sample in shard_samples(shard, self.counts.get(shard)))
            rng = random.Random(f"shuffle/{self.seed}/{self.epoch}/{self.rank}/{worker}/{data_pass}{tag}")
            yield from _shuffled(samples, self.shuffle_buffer, rng)
            yield {"__pass__": source}

    def __iter__(self):
        streams = [self._source(shards, i) for i, shards in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(f"mix/{self.seed}/{self.epoch}/{self.rank}/{_worker_id()}")
        choices = range(len(streams))
        while True:
            try:
                item = next(streams[rng.choices(choices, self.weights)[0]])
            except StopIteration:  # `passes` read
                return
            yield item


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
    if "__bad__" in sample:
        raise Rejected("malformed_record", sample["__bad__"])
    if "jpg" not in sample:
        raise Rejected("missing_image", "the sample has no jpg")
    if "txt" not in sample:
        raise Rejected("empty_caption", "the sample has no txt")
    meta = parse_json(sample["json"]) if "json" in sample else {}
    if not isinstance(meta, dict):
        raise Rejected("malformed_record", "its json is not an object")
    crc = meta.get("crc32")
    if crc is not None and not isinstance(crc, int):
        raise Rejected("checksum_mismatch", f"its json's crc32 is {crc!r}")
    return decode_checked(sample.get("__key__", ""), sample["jpg"], sample["txt"], meta.get("negatives", []), crc,
                          num_negatives, draft_size)


def _batches(batch_size: int, num_negatives: int, pick: str, seed: int, epoch: int, transform: Callable,
             tokenize: Callable, skip: list[int]):
    """Skip already-consumed raw samples, decode the rest, drop (and count) bad ones, pick K negatives, batch.

    Markers: a damaged shard's lost samples are counted like rejects (unless the resumed worker is still
    skipping what it had read before); after `EMPTY_PASSES` passes in a row without one usable sample from
    a source the slot raises `DataError` instead of reading those shards forever. A finite stream
    (`passes`) ends with what is left, even an empty batch, so that its last rejects are counted."""
    def stage(samples):
        worker = _worker_id()
        to_skip = skip[worker] if worker < len(skip) else 0
        consumed, rejected, examples = 0, Counter(), {}
        usable, empty_passes, seen = Counter(), Counter(), Counter()
        images, positives, negatives, keys = [], [], [], []

        def batch():
            tokens = tokenize(positives + negatives) if keys else torch.zeros(0, 1, dtype=torch.long)
            return Batch(torch.stack(images) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8), tokens, keys,
                         worker, consumed, rejected, len(keys) + sum(rejected.values()), examples)

        for sample in samples:
            if "__pass__" in sample:
                source = sample["__pass__"]
                empty_passes[source] = 0 if usable[source] else empty_passes[source] + 1
                if empty_passes[source] >= EMPTY_PASSES:
                    raise DataError(f"data worker {worker} of this rank read {EMPTY_PASSES} passes over its shards of source {source} "
                                    f"without one usable sample ({dict(seen)} rejected, e.g. "
                                    f"{next(iter(examples.values()), '?')}): fix or remake those shards")
                usable[source] = 0
                continue
            if "__lost__" in sample:
                if consumed >= to_skip:  # else it was counted before the checkpoint this worker resumes from
                    reason = sample["__reason__"]
                    rejected[reason] += sample["__lost__"]
                    seen[reason] += sample["__lost__"]
                    examples.setdefault(reason, sample["__url__"])
                continue
            consumed += 1
            if consumed <= to_skip:
                usable[sample["__source__"]] += 1  # read before the checkpoint: not known to be bad
                continue
            try:
                image, caption, negs = decode_sample(sample, num_negatives, getattr(transform, "draft_size", None))
            except Rejected as exc:
                rejected[exc.reason] += 1
                seen[exc.reason] += 1
                examples.setdefault(exc.reason, sample["__url__"])
                continue
            usable[sample["__source__"]] += 1
            images.append(transform(image))
            positives.append(caption)
            negatives.extend(pick_negatives(negs, num_negatives, pick, seed, epoch, sample["__key__"]))
            keys.append(sample["__key__"])
            if len(keys) == batch_size:
                yield batch()
                images, positives, negatives, keys, rejected, examples = [], [], [], [], Counter(), {}
        if keys or rejected:
            yield batch()
    return stage


@dataclass
class DataPosition:
    """Where a rank is in its data stream; stored in every checkpoint."""

    epoch: int = 0
    batches: int = 0  # batches delivered this epoch
    consumed: list[int] = field(default_factory=list)  # raw samples consumed per worker this epoch
    rejected: dict = field(default_factory=dict)  # bad samples skipped so far, by reason (whole run)
    stream: dict | None = None  # MDS: StreamingDataLoader.state_dict() after the last batch
    # Raw samples read so far, the batches' own plus the rejected ones (whole run): the denominator of the
    # reject budget (`rejects.check_reject_budget`). A position saved before it existed resumes from 0, so
    # its earlier rejects then weigh against the samples read since the resume.
    samples_read: int = 0
    reject_examples: dict = field(default_factory=dict)  # reason → the first shard path it was seen in (whole run)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "consumed": self.consumed, "rejected": dict(self.rejected),
                "stream": self.stream, "samples_read": self.samples_read, "reject_examples": dict(self.reject_examples)}

    @classmethod
    def from_json(cls, d: dict) -> "DataPosition":
        return cls(d["epoch"], d["batches"], list(d["consumed"]), dict(d.get("rejected", {})), d.get("stream"),
                   int(d.get("samples_read", 0)), dict(d.get("reject_examples", {})))

    def add(self, batch: "Batch") -> None:
        """Count a delivered batch's rejects, example shards and samples read into the run-wide totals."""
        if batch.rejected:
            self.rejected = dict(Counter(self.rejected) + Counter(batch.rejected))
        self.samples_read += batch.read
        self.reject_examples = {**batch.reject_examples, **self.reject_examples}


def reshard_position(saved: list[DataPosition], saved_accum: int, accum: int, num_workers: int, batch_size: int,
                     rank: int) -> DataPosition:
    """This rank's position when a run resumes on another number of ranks (same global batch).

    It keeps the epoch and the optimizer step within it. webdataset: it skips as many raw samples per worker
    as the new layout would have read by then; shards are dealt to (rank, worker) slots, so the new ranks'
    streams are not the old ones and within this epoch the skip is by count, not by sample. MDS: the
    streaming state counts samples over all ranks, so it carries over exactly. The run-wide reject counts,
    samples read and example shards stay with rank 0 so that their sums over ranks are unchanged."""
    epochs = {p.epoch for p in saved}
    steps = {p.batches // saved_accum for p in saved}
    if len(epochs) != 1 or len(steps) != 1:
        raise DataError(f"the saved ranks disagree on their data position (epochs {sorted(epochs)}, steps {sorted(steps)}): "
                        "the checkpoint is inconsistent")
    batches = steps.pop() * accum
    workers = max(num_workers, 1)
    consumed = [len(range(w, batches, workers)) * batch_size for w in range(workers)]
    rejected = dict(sum((Counter(p.rejected) for p in saved), Counter())) if rank == 0 else {}
    read = sum(p.samples_read for p in saved) if rank == 0 else 0
    examples = {r: path for p in reversed(saved) for r, path in p.reject_examples.items()} if rank == 0 else {}
    return DataPosition(epochs.pop(), batches, consumed, rejected, saved[0].stream,  # MDS state counts globally
                        read, examples)


class ShardReader:
    """Iterates one epoch of batches for this rank from a `DataPosition`, updating it as it goes."""

    def __init__(self, shards: list[str] | list[list[str]], *, batch_size: int, num_negatives: int, num_workers: int,
                 shuffle_buffer: int, seed: int, rank: int, world: int, transform: Callable, tokenize: Callable,
                 weights: list[float] | None = None, negatives_pick: str = "first", pin_memory: bool = False,
                 passes: int | None = None):
        """`shards`: one source's shard paths, or one list per source, mixed by `weights`. `pin_memory`: batches
        arrive in page-locked memory (CUDA), so their copy to the device can overlap compute. `passes`: read
        the shards that many times and stop, the last batch of each worker short (None: forever, as training
        does; a check of the shards reads one)."""
        self.pin_memory, self.passes = pin_memory, passes
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
        self.counts = shard_counts([p for shards in self.sources for p in shards])

    def epoch(self, position: DataPosition) -> Iterator[Batch]:
        """Yield this rank's batches of `position.epoch` from `position.batches` on, forever (caller stops), or
        until `passes` are read."""
        workers = max(self.num_workers, 1)
        if not position.consumed:
            position.consumed = [0] * workers
        if len(position.consumed) != workers:
            raise DataError(f"checkpoint was written with {len(position.consumed)} data workers but data.num_workers="
                            f"{self.num_workers}: resume with the same number of workers")
        pipeline = wds.DataPipeline(
            MixedSamples(self.sources, self.weights, self.seed, position.epoch, self.rank, self.world,
                         self.shuffle_buffer, self.counts, self.passes),
            _batches(self.batch_size, self.num_negatives, self.negatives_pick, self.seed, position.epoch, self.transform,
                     self.tokenize, list(position.consumed)),
        )
        loader = DataLoader(pipeline, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.num_workers else None, worker_init_fn=ignore_in_worker)
        # DataLoader hands out worker 0, 1, ... in turn from each restart; after a mid-epoch resume the
        # next batch belongs to worker (batches % workers), so hold the others back until their turn.
        pending: dict[int, deque] = {w: deque() for w in range(workers)}
        stream, ended = iter(loader), False
        while True:
            want = position.batches % workers
            while not pending[want] and not ended:
                try:
                    batch = next(stream)
                except StopIteration:  # `passes` read: hand out what the workers left, in turn
                    ended = True
                    break
                pending[batch.worker].append(batch)
            if not pending[want]:
                if not any(pending.values()):
                    return
                want = next((want + i) % workers for i in range(workers) if pending[(want + i) % workers])
            batch = pending[want].popleft()
            position.batches += 1
            position.consumed[batch.worker] = batch.consumed
            position.add(batch)
            yield batch
