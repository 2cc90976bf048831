"""The EMA teacher (DESIGN.md §2, "EMA"): θ_t ← α·θ_t + (1−α)·θ_s after every optimizer step.

The EMA is kept in fp32 because at α = 0.9996 a bf16 EMA stops moving (the update is below bf16's
resolution). Two layouts, one interface (update / encode / save / load / full_state_dict):

- `EMATeacher`: a replicated fp32 copy of the student (ZeRO-0).
- `ShardedEMATeacher` (ZeRO-1/2): each rank keeps the fp32 EMA of exactly the slice of the flat
  parameter buffer whose fp32 master weights its optimizer owns, and updates it in place from them (no
  communication). The teacher's forward runs a replicated copy in the student's dtype, refreshed from
  the shards by one all-gather every `refresh_every` steps.

Checkpoints: rank 0 writes `teacher.pt` (the whole fp32 EMA as a state dict, loadable by either layout
and any number of ranks); the sharded teacher also writes `teacher_shard_rank{r}.pt` per rank.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


class EMATeacher:
    """Holds the teacher module; `update` blends the student in, `encode` runs it without gradient."""

    def __init__(self, student: nn.Module, alpha: float, autocast_dtype: torch.dtype | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMA alpha={alpha} must lie in [0, 1]")
        self.alpha = alpha
        self.autocast_dtype = autocast_dtype
        self.module = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        teacher_params = list(self.module.parameters())
        student_params = [p.detach().to(torch.float32) for p in student.parameters()]
        if len(teacher_params) != len(student_params):
            raise RuntimeError(
                f"teacher has {len(teacher_params)} parameters but the student {len(student_params)}: "
                "build the teacher from the same model"
            )
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - self.alpha)
        self.updates += 1

    @torch.no_grad()
    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = (
            torch.autocast(images.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None else nullcontext()
        )
        with ctx:
            img_BD, txt_ND, _ = self.module(images, texts)
        return img_BD, txt_ND

    def to(self, device: torch.device) -> "EMATeacher":
        self.module.to(device)
        return self

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA (parameters and buffers) by name."""
        return self.module.state_dict()

    def save(self, tag_dir: Path, rank: int) -> None:
        if rank == 0:
            torch.save({"alpha": self.alpha, "updates": self.updates, "module": self.full_state_dict()}, tag_dir / "teacher.pt")

    def load(self, tag_dir: Path, rank: int) -> None:
        state = torch.load(tag_dir / "teacher.pt", map_location="cpu")
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def _zero_partitions(optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(flat low-precision parameter buffers, this rank's fp32 master partitions), one per param group."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer (stages 1 and 2)
        return optimizer.bit16_groups_flat, optimizer.single_partition_of_fp32_groups
    if hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 + stage 1)
        return optimizer.bf16_groups_flat, optimizer.fp32_groups_flat_partition
    raise RuntimeError(f"the sharded EMA teacher needs a ZeRO-1/2 optimizer, got {type(optimizer).__name__}")


class ShardedEMATeacher:
    """fp32 EMA sharded like the ZeRO-1/2 master weights; a replicated teacher module for the forward."""

    def __init__(self, engine, alpha: float, refresh_every: int = 1, autocast_dtype: torch.dtype | None = None,
                 offload: bool = False):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMA alpha={alpha} must lie in [0, 1]")
        self.alpha, self.refresh_every, self.autocast_dtype = alpha, refresh_every, autocast_dtype
        self.updates = 0
        self.group = getattr(engine.optimizer, "dp_process_group", None)
        self.world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        flats, self.masters = _zero_partitions(engine.optimizer)
        self.shards = [m.detach().float().clone() for m in self.masters]  # the teacher starts as the student
        self.offload = _CPUOffload(self.shards) if offload else None
        if self.offload is not None:
            self.shards = self.offload.shards
        self.module = copy.deepcopy(engine.module).eval().requires_grad_(False)
        # Re-seat the teacher's parameters on flat buffers laid out exactly like the student's, so a
        # partition of a teacher buffer is the same parameters' slice as the student's partition.
        self.flats = [torch.empty_like(flat) for flat in flats]
        self.slots: list[tuple[str, int, int, int]] = []  # (name, group, offset, numel)
        teacher_params = dict(self.module.named_parameters())
        for name, p in engine.module.named_parameters():
            for g, flat in enumerate(flats):
                offset = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                if p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and 0 <= offset < flat.numel():
                    teacher_params[name].data = self.flats[g].narrow(0, offset, p.numel()).view(p.shape)
                    self.slots.append((name, g, offset, p.numel()))
                    break
            else:
                raise RuntimeError(f"student parameter {name} lies in none of the optimizer's flat buffers: "
                                   "the teacher cannot be sharded like it")
        for g, (flat, shard) in enumerate(zip(self.flats, self.shards)):
            if flat.numel() != shard.numel() * self.world:
                raise RuntimeError(f"param group {g}: {flat.numel()} flat elements but an fp32 partition of {shard.numel()} "
                                   f"on each of {self.world} ranks: teacher and student partitions do not line up")
        self.refresh()

    @torch.no_grad()
    def update(self, student: nn.Module | None = None) -> None:
        """Fold this rank's fp32 master partitions into its EMA shards (in the background when offloaded)."""
        masters = [m.detach() for m in self.masters]
        if self.offload is not None:
            self.offload.lerp_async(masters, 1.0 - self.alpha)
        else:
            torch._foreach_lerp_(self.shards, masters, 1.0 - self.alpha)
        self.updates += 1
        if self.updates % self.refresh_every == 0:
            self.refresh()

    def wait(self) -> None:
        if self.offload is not None:
            self.offload.wait()

    @torch.no_grad()
    def refresh(self) -> None:
        """All-gather the EMA shards into the teacher's flat buffers (in the teacher's dtype)."""
        self.wait()
        for flat, shard in zip(self.flats, self.shards):
            part = shard.to(flat.dtype).to(flat.device, non_blocking=True)  # cast first: bf16 travels, not fp32
            if self.world == 1:
                flat.copy_(part)
            else:
                dist.all_gather(list(flat.chunk(self.world)), part, group=self.group)

    encode = EMATeacher.encode

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA by name (a collective: every rank must call it)."""
        self.wait()
        full = []
        for flat, shard in zip(self.flats, self.shards):
            buf = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)  # where the comm backend works
            if self.world == 1:
                buf.copy_(shard)
            else:
                dist.all_gather(list(buf.chunk(self.world)), shard.to(flat.device), group=self.group)
            full.append(buf)
        state = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}  # buffers
        params = dict(self.module.named_parameters())
        for name, g, offset, numel in self.slots:
            state[name] = full[g][offset:offset + numel].view(params[name].shape).cpu().clone()
        return state

    def save(self, tag_dir: Path, rank: int) -> None:
        full = self.full_state_dict()
        torch.save({"world": self.world, "updates": self.updates, "shards": [s.cpu() for s in self.shards]},
                   tag_dir / f"teacher_shard_rank{rank}.pt")
        if rank == 0:
            torch.save({"alpha": self.alpha, "updates": self.updates, "module": full}, tag_dir / "teacher.pt")

    @torch.no_grad()
    def load(self, tag_dir: Path, rank: int) -> None:
        """This rank's shards if saved by as many ranks; otherwise re-partition the whole fp32 EMA."""
        self.wait()
        shard_file = tag_dir / f"teacher_shard_rank{rank}.pt"
        saved = torch.load(shard_file, map_location="cpu") if shard_file.is_file() else None
        if saved is not None and saved["world"] == self.world:
            for shard, value in zip(self.shards, saved["shards"]):
                shard.copy_(value)
            self.updates = saved["updates"]
        else:
            state = torch.load(tag_dir / "teacher.pt", map_location="cpu")
            full = [torch.zeros(flat.numel(), dtype=torch.float32) for flat in self.flats]
            for name, g, offset, numel in self.slots:
                full[g][offset:offset + numel] = state["module"][name].reshape(-1).float()
            for shard, buf in zip(self.shards, full):
                shard.copy_(buf.chunk(self.world)[rank])
            self.updates = state["updates"]
        self.refresh()


class _CPUOffload:
    """EMA shards in (pinned) host memory, updated by a background thread while the device computes.

    After each optimizer step the fp32 master partitions are copied into host staging buffers (on a side
    CUDA stream when they live on the GPU), and one worker thread folds them into the shards once the copy
    has landed. The next update, a refresh or a checkpoint waits for it first."""

    def __init__(self, shards: list[torch.Tensor]):
        from concurrent.futures import ThreadPoolExecutor

        pin = torch.cuda.is_available()
        self.shards = [s.cpu().pin_memory() if pin else s.cpu().clone() for s in shards]
        self.staging = [torch.empty_like(s, pin_memory=pin) for s in self.shards]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema-offload")
        self.pending = None

    def lerp_async(self, masters: list[torch.Tensor], weight: float) -> None:
        self.wait()
        event = None
        if masters[0].is_cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())  # the optimizer step has written the masters
            with torch.cuda.stream(stream):
                for buf, m in zip(self.staging, masters):
                    buf.copy_(m, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        else:  # a snapshot: the next optimizer step may rewrite host masters while the thread works
            for buf, m in zip(self.staging, masters):
                buf.copy_(m)
        self.pending = self.pool.submit(self._lerp, event, weight)

    def _lerp(self, event, weight: float) -> None:
        if event is not None:
            event.synchronize()
        with torch.no_grad():
            torch._foreach_lerp_(self.shards, self.staging, weight)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()  # re-raises anything the thread hit
            self.pending = None
