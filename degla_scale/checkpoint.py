"""Checkpoints of a DeGLA run: the DeepSpeed engine, the EMA teacher and every rank's data position.

Layout under `run_dir/checkpoints`:

    latest                     DeepSpeed's pointer to the newest complete checkpoint, written last
    step00000300/              DeepSpeed's files (module, and the ZeRO optimizer partitions per rank)
        layout.json            step, and the ranks / micro-batch / accumulation that wrote it
        data_rank{r}.json      rank r's data position
        teacher.pt             the whole fp32 EMA (rank 0); teacher_shard_rank{r}.pt, per-rank EMA shards
    universal/step00000300/    DeepSpeed's universal checkpoint, made on demand to resume on another
                               number of ranks (ZeRO optimizer partitions depend on the rank count)

Resuming on another number of ranks keeps the global batch (ranks × micro-batch × accumulation), so the
schedule, the step counter and the loss curve carry on.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from degla_scale import distributed as D
from degla_scale.config import Config, ConfigError
from degla_scale.data.reader import DataPosition, reshard_position

log = logging.getLogger(__name__)


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


def save(ckpt_dir: Path, layout: Layout, engine, teacher, position: DataPosition, keep_last: int) -> None:
    """Per-rank data position, the layout and the teacher first; DeepSpeed writes `latest` last, so a
    kill mid-save leaves the previous checkpoint as the one to resume."""
    tag = f"step{layout.step:08d}"
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank = D.rank()
    (tag_dir / f"data_rank{rank}.json").write_text(json.dumps(position.to_json()))
    if rank == 0:
        (tag_dir / "layout.json").write_text(json.dumps(asdict(layout)))
    if teacher is not None:
        teacher.save(tag_dir, rank)
    from deepspeed.checkpoint import constants as C

    # The universal-checkpoint marker lets ds_to_universal convert this checkpoint (no tensor slicing to declare).
    universal_info = {C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(str(ckpt_dir), tag=tag,
                           client_state={"step": layout.step, C.UNIVERSAL_CHECKPOINT_INFO: universal_info})
    if rank == 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / "universal" / old.name, ignore_errors=True)


def find(cfg: Config) -> ResumePoint | None:
    """The checkpoint to resume from (`latest`), or None for a fresh start."""
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    latest = ckpt_dir / "latest"
    if cfg.checkpoint.resume != "auto" or not latest.is_file():
        return None
    tag = latest.read_text().strip()
    layout_file = ckpt_dir / tag / "layout.json"
    if not layout_file.is_file():
        raise RuntimeError(f"{layout_file} is missing: {ckpt_dir / tag} is not a degla-scale checkpoint, "
                           "or is incomplete: delete it or set checkpoint.resume=none")
    return ResumePoint(ckpt_dir, tag, Layout(**json.loads(layout_file.read_text())))


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
        log.warning("resuming %d-rank checkpoint %s on %d ranks: converting it to DeepSpeed's universal format in %s",
                    saved.world_size, point.tag_dir, now.world_size, target)
        # one worker each: its forked process pools hang here once torch has started its threads
        done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(point.tag_dir), "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {point.tag_dir}: resume on "
                               f"{saved.world_size} ranks instead. Its error: {done.stderr.strip()[-1500:]}")
    if D.is_dist():
        dist.barrier()
    return True


def load(point: ResumePoint, universal: bool, now: Layout, engine, teacher, num_workers: int) -> DataPosition:
    """Restore engine and teacher; returns this rank's data position."""
    root = point.universal_root if universal else point.ckpt_dir
    load_path, client_state = engine.load_checkpoint(str(root), tag=point.tag)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {root / point.tag}: delete it or set checkpoint.resume=none")
    if client_state.get("step", point.saved.step) != point.saved.step:
        raise RuntimeError(f"{root / point.tag} holds step {client_state['step']} but its layout.json says "
                           f"{point.saved.step}: the checkpoint is inconsistent, delete it")
    if teacher is not None:
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
