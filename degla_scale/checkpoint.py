"""Checkpoints of a DeGLA run: the DeepSpeed engine, the EMA teacher and every rank's data position.

Layout under `run_dir/checkpoints`:

    latest                     the tag of the newest complete checkpoint, written (atomically) after its manifest
    step00000300/              DeepSpeed's files (module, and the ZeRO optimizer partitions per rank)
        layout.json            step, and the ranks / micro-batch / accumulation that wrote it
        data_rank{r}.json      rank r's data position
        teacher.pt             the whole fp32 EMA (rank 0); teacher_shard_rank{r}.pt, per-rank EMA shards
        manifest.json          written last: every other file of the folder, its size and CRC-32
    universal/step00000300/    DeepSpeed's universal checkpoint, made on demand to resume on another
                               number of ranks (ZeRO optimizer partitions depend on the rank count)

A checkpoint is complete only when its manifest.json says so and every file it lists has that size and
checksum. A save writes every rank's files, waits for all ranks, checksums the files (the work split over
the ranks), then rank 0 writes the manifest, then `latest`, each through a temporary file and os.replace; a
kill at any moment leaves the previous complete checkpoint in place and named by `latest`. Only then are
older checkpoints pruned: `keep_last` counts complete ones, and incomplete folders older than the new one
go too. On resume a damaged `latest` (truncated or missing file, checksum mismatch, no manifest, a pointer
to nothing) is reported in one line and the newest older complete checkpoint is used.

The checksum (zlib.crc32 over 4 MiB reads) ran at about 2.6 GB/s per core from the page cache on the 2-core
Xeon CI machine (2.2 GB/s from memory): a ViT-L/14 checkpoint (~0.43B parameters: ~7 GB of fp32 masters,
Adam moments, module and EMA) costs ~3 s of one core at each save, divided by the rank count, and ~3 s on
every rank at resume, where all ranks verify the whole checkpoint to reach the same verdict without a
process group. Reads from a cold disk run at the disk's speed instead.

Resuming on another number of ranks keeps the global batch (ranks × micro-batch × accumulation), so the
schedule, the step counter and the loss curve carry on.

Every torch.load here, DeepSpeed's own included, is weights-only (degla_scale.export.weights_only_loads):
a downloaded checkpoint cannot run code.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from degla_scale import distributed as D
from degla_scale.cli import notice
from degla_scale.config import Config, ConfigError
from degla_scale.data.reader import DataPosition, reshard_position

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "degla-scale checkpoint manifest 1"
LATEST = "latest"
TAG = re.compile(r"step(\d{8,})")  # a tag folder's name, in full
CHUNK = 4 << 20  # bytes per read while checksumming
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|data_rank|teacher_shard_rank)(\d+)")  # files that name the rank writing them


class CheckpointError(ValueError):
    """No checkpoint to resume from, or one that cannot be read; the message names it and the fix."""


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's run was laid out: what a resume must match or convert."""

    step: int
    world_size: int
    batch_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path
    tag: str
    saved: Layout

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def universal_root(self) -> Path:
        return self.ckpt_dir / "universal"


# ---------------------------------------------------------------- manifest


def file_checksum(path: Path) -> tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of a whole file, read in CHUNK-byte pieces."""
    crc, size, buf = 0, 0, bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


def _tag_files(tag_dir: Path) -> list[tuple[str, int]]:
    """(path relative to the tag folder, size) of every file in it but the manifest and temporary files."""
    files = []
    for path in tag_dir.rglob("*"):
        name = path.relative_to(tag_dir).as_posix()
        if path.is_file() and name != MANIFEST and not name.endswith(".tmp"):
            files.append((name, path.stat().st_size))
    return sorted(files)


def _share_out(files: list[tuple[str, int]], world: int) -> list[list[str]]:
    """Which files each rank checksums: a rank's own files (its optimizer partition, data position, EMA shard)
    to that rank, which reads them back from its own page cache; the rest, largest first, to the least loaded."""
    shares, load = [[] for _ in range(world)], [0] * world
    rest = []
    for name, size in files:
        owner = _RANK_FILE.search(name)
        if owner and int(owner.group(1)) < world:
            r = int(owner.group(1))
            shares[r].append(name)
            load[r] += size
        else:
            rest.append((size, name))
    for size, name in sorted(rest, reverse=True):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(name)
        load[r] += size
    return shares


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(tag_dir: Path, layout: Layout) -> None:
    """Checksum every file of `tag_dir` and have rank 0 write its manifest. Collective: every rank calls it
    once all ranks' files are written. The work is split over the ranks (see _share_out), so a save costs
    1/world of the checkpoint's bytes per rank rather than all of them on rank 0 while the others wait."""
    world, rank = D.world_size(), D.rank()
    shares = [_share_out(_tag_files(tag_dir), world)] if rank == 0 else [None]
    if D.is_dist() and world > 1:  # one listing, from rank 0, so every rank agrees on what to read
        dist.broadcast_object_list(shares, src=0)
    mine = {name: file_checksum(tag_dir / name) for name in shares[0][rank]}
    parts = [mine]
    if D.is_dist() and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    if rank == 0:
        files = {name: {"bytes": size, "crc32": crc} for part in parts for name, (size, crc) in part.items()}
        manifest = {"format": MANIFEST_FORMAT, "tag": tag_dir.name, "step": layout.step, "world_size": layout.world_size,
                    "checksum": "crc32", "files": dict(sorted(files.items()))}
        _write_atomically(tag_dir / MANIFEST, json.dumps(manifest, indent=1))


def check_complete(tag_dir: Path, checksums: bool = True) -> str | None:
    """None when `tag_dir` is a complete checkpoint, else what is wrong with it (a short phrase, one line).
    `checksums=False` checks the manifest and the files' sizes only (cheap: no file is read)."""
    if not tag_dir.is_dir():
        return "does not exist"
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return f"has no {MANIFEST} (its save did not finish)"
    except (OSError, ValueError):
        return f"has an unreadable {MANIFEST}"
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("world_size"), int)):
        return f"has a {MANIFEST} that is not a degla-scale manifest"
    files = manifest["files"]
    required = ["layout.json", *(f"data_rank{r}.json" for r in range(manifest["world_size"]))]
    problems = [f"has no {name} in its manifest" for name in required if name not in files]
    for name, want in files.items():
        path = tag_dir / name
        if not isinstance(want, dict) or ".." in Path(name).parts or Path(name).is_absolute():
            problems.append(f"has a {MANIFEST} entry {name[:60]!a} that is not a file of the folder")
            continue
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"lacks {name}")
            continue
        if size != want.get("bytes"):
            problems.append(f"has {name} at {size} bytes, its manifest says {want.get('bytes')}")
        elif checksums and file_checksum(path)[1] != want.get("crc32"):
            problems.append(f"has {name} not matching its checksum")
        if problems and not checksums:
            break
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every stepNNNNNNNN folder, newest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step*") if (m := TAG.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _remove(ckpt_dir: Path, tag: str) -> None:
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    shutil.rmtree(ckpt_dir / "universal" / tag, ignore_errors=True)


def _prune(ckpt_dir: Path, newest: int, keep_last: int) -> None:
    """Keep the new checkpoint (step `newest`) and the keep_last - 1 newest complete ones before it; delete the
    other folders older than it, incomplete ones included. Folders of later steps (a timeline the run left
    behind, e.g. after checkpoint.resume=none) are neither counted nor deleted: the run overwrites them."""
    kept = 1
    for step, path in _step_dirs(ckpt_dir):
        if step >= newest:
            continue
        if kept < keep_last and check_complete(path, checksums=False) is None:
            kept += 1
        else:
            _remove(ckpt_dir, path.name)


def _barrier() -> None:
    if D.is_dist():
        dist.barrier()


# ---------------------------------------------------------------- save and resume


def save(ckpt_dir: Path, layout: Layout, engine, teacher, position: DataPosition, keep_last: int) -> None:
    """Every rank's data position, the layout, the teacher and DeepSpeed's files; then the manifest, then
    `latest`, then pruning. Collective. A kill mid-save leaves the previous checkpoint as the one to resume."""
    tag = f"step{layout.step:08d}"
    tag_dir = ckpt_dir / tag
    rank = D.rank()
    if rank == 0:  # a folder of this step from a damaged save or an abandoned timeline: start it clean
        _remove(ckpt_dir, tag)
        tag_dir.mkdir(parents=True)
    _barrier()
    (tag_dir / f"data_rank{rank}.json").write_text(json.dumps(position.to_json()))
    if rank == 0:
        (tag_dir / "layout.json").write_text(json.dumps(asdict(layout)))
    if teacher is not None:
        teacher.save(tag_dir, rank)
    from deepspeed.checkpoint import constants as C

    # The universal-checkpoint marker lets ds_to_universal convert this checkpoint (no tensor slicing to declare).
    universal_info = {C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={"step": layout.step, C.UNIVERSAL_CHECKPOINT_INFO: universal_info})
    _barrier()  # every rank's files are written
    write_manifest(tag_dir, layout)
    if rank == 0:
        _write_atomically(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, layout.step, keep_last)
    _barrier()


def newest_complete(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """`latest`'s checkpoint when it is complete, else the newest complete one before it (before any, when
    `latest` names none): its folder or None, and what was wrong with the ones passed over (one phrase each)."""
    problems, named = [], None
    latest = ckpt_dir / LATEST
    if latest.is_file():
        text = latest.read_bytes()[:200].decode("latin-1").strip()
        if TAG.fullmatch(text):
            named = int(TAG.fullmatch(text).group(1))
            problem = check_complete(ckpt_dir / text)
            if problem is None:
                return ckpt_dir / text, problems
            problems.append(f"{text} (named by latest) {problem}")
        else:
            problems.append(f"latest holds {text[:40]!a}, not a checkpoint tag")
    else:
        problems.append("there is no latest file")
    for step, path in _step_dirs(ckpt_dir):
        if named is not None and step >= named:
            continue
        problem = check_complete(path)
        if problem is None:
            return path, problems
        problems.append(f"{path.name} {problem}")
    return None, problems


def find(cfg: Config) -> ResumePoint | None:
    """The checkpoint to resume from, or None for a fresh start. Runs on every rank before any process group
    exists: every rank reads the same files, whole, and reaches the same verdict.

    `latest`'s checkpoint when it is complete; else one line says what is wrong and the newest complete
    checkpoint before it is used; with none, CheckpointError (one line: how to start fresh)."""
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    if cfg.checkpoint.resume != "auto" or not ((ckpt_dir / LATEST).is_file() or _step_dirs(ckpt_dir)):
        return None
    tag_dir, problems = newest_complete(ckpt_dir)
    if tag_dir is None:
        raise CheckpointError(f"{ckpt_dir} holds no complete checkpoint to resume from ({'; '.join(problems)}): "
                              f"start fresh with checkpoint.resume=none, or delete {ckpt_dir}")
    if problems:
        notice(f"checkpoint: {'; '.join(problems)}: resuming from {tag_dir.name}, the newest complete checkpoint "
               f"in {ckpt_dir}")
    layout = json.loads((tag_dir / "layout.json").read_text())
    return ResumePoint(ckpt_dir, tag_dir.name, Layout(**layout))


@contextmanager
def _weights_only(source: Path):
    """Every torch.load within is weights-only; a file that pickles more is a CheckpointError (one line)."""
    from degla_scale.export import refusal, unsafe_pickle_reason, weights_only_loads

    try:
        with weights_only_loads():
            yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(refusal(f"a file of {source}", unsafe_pickle_reason(exc))) from None


def _refuse_unsafe_pickles(tag_dir: Path) -> None:
    """CheckpointError naming the first file of `tag_dir` whose pickle holds more than weights (a static scan)."""
    from degla_scale.export import refuse_unsafe_pickles

    refuse_unsafe_pickles(tag_dir, CheckpointError)


# ds_to_universal in a child process, its torch.loads (weights_only=False in DeepSpeed) forced weights-only
# (TORCH_FORCE_WEIGHTS_ONLY_LOAD in its environment) with the DeepSpeed record types allowed.
_TO_UNIVERSAL = """
import torch
from degla_scale.export import deepspeed_safe_globals
torch.serialization.add_safe_globals(deepspeed_safe_globals())
from deepspeed.checkpoint.ds_to_universal import main, parse_arguments
main(parse_arguments())
"""


def prepare(point: ResumePoint, now: Layout, zero_stage: int, bf16: bool) -> bool:
    """Check that `now` can continue the saved run; when the rank count changed and the optimizer state is
    partitioned by rank, have rank 0 convert the checkpoint to DeepSpeed's universal format.

    Returns whether the engine must load the universal checkpoint (`checkpoint.load_universal`)."""
    saved = point.saved
    if now.global_batch != saved.global_batch:
        raise ConfigError(
            f"{point.tag_dir} was trained with a global batch of {saved.global_batch} ({saved.world_size} ranks × "
            f"data.batch_size={saved.batch_size} × schedule.grad_accum={saved.grad_accum}), this run has "
            f"{now.global_batch} ({now.world_size} × {now.batch_size} × {now.grad_accum}): set data.batch_size or "
            "schedule.grad_accum so the product matches")
    if now.world_size == saved.world_size or (zero_stage == 0 and not bf16):  # ZeRO-0 fp32 state is whole on every rank
        return False
    target = point.universal_root / point.tag
    if D.rank() == 0 and not (target / "zero").is_dir():
        _refuse_unsafe_pickles(point.tag_dir)
        log.warning("resuming %d-rank checkpoint %s on %d ranks: converting it to DeepSpeed's universal format in %s",
                    saved.world_size, point.tag_dir, now.world_size, target)
        # one worker each: its forked process pools hang here once torch has started its threads
        done = subprocess.run([sys.executable, "-c", _TO_UNIVERSAL, "--input_folder", str(point.tag_dir),
                               "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True, env={**os.environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"})
        if done.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            if "Weights only load failed" in done.stderr:
                from degla_scale.export import refusal

                raise CheckpointError(refusal(f"a file of {point.tag_dir}", "pickles more than tensors and plain data"))
            raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {point.tag_dir}: resume on "
                               f"{saved.world_size} ranks instead. Its error: {done.stderr.strip()[-1500:]}")
    if D.is_dist():
        dist.barrier()
    return True


def load(point: ResumePoint, universal: bool, now: Layout, engine, teacher, num_workers: int) -> DataPosition:
    """Restore engine and teacher (every file unpickled weights-only); returns this rank's data position."""
    root = point.universal_root if universal else point.ckpt_dir
    _refuse_unsafe_pickles(point.tag_dir)
    with _weights_only(root / point.tag):  # DeepSpeed's loaders pass weights_only=False to torch.load
        load_path, client_state = engine.load_checkpoint(str(root), tag=point.tag)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {root / point.tag}: delete it or set checkpoint.resume=none")
    if client_state.get("step", point.saved.step) != point.saved.step:
        raise RuntimeError(f"{root / point.tag} holds step {client_state['step']} but its layout.json says "
                           f"{point.saved.step}: the checkpoint is inconsistent, delete it")
    if teacher is not None:
        with _weights_only(point.tag_dir):
            teacher.load(point.tag_dir, D.rank())
    positions = []
    for r in range(point.saved.world_size):
        path = point.tag_dir / f"data_rank{r}.json"
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: the checkpoint is incomplete, delete {point.tag_dir}")
        positions.append(DataPosition.from_json(json.loads(path.read_text())))
    if now.world_size == point.saved.world_size:
        return positions[D.rank()]
    if positions[0].stream is None:  # MDS state counts samples over all ranks and carries over exactly
        log.warning("data: webdataset streams are dealt per rank, so the rest of epoch %d is read in the %d-rank order "
                    "from the same sample count (samples of this epoch may repeat or be missed); later epochs follow "
                    "the new order exactly", positions[0].epoch, now.world_size)
    return reshard_position(positions, point.saved.grad_accum, now.grad_accum, num_workers, now.batch_size, D.rank())
