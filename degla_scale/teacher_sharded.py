"""EMA teachers sharded like the student's ZeRO fp32 master weights (docs/objective.md, "EMA teacher").

Each rank keeps the fp32 EMA of exactly the parameter slice whose fp32 master weights its optimizer owns
(its "shard"), and folds the masters into it in place after every optimizer step with one fused foreach
lerp: no communication for the update. Only the teacher's forward weights differ by stage:

- `ShardedEMATeacher` (ZeRO-1/2): the student's parameters live in flat buffers, each rank owning one
  contiguous chunk. The teacher is a replicated module in the student's dtype whose parameters sit on
  flat buffers laid out like the student's, refreshed by one all-gather of the shards every
  `refresh_every` steps.
- `ZeRO3EMATeacher` (ZeRO-3): every parameter is split into equal per-rank pieces. The teacher is a
  second DeepSpeed engine at stage 3 without optimizer, partitioned the same way; a refresh writes the
  shards into its partitions (a local copy), and its forward all-gathers parameters like the student's.

Both can keep the shards in pinned host memory (`offload=True`), updated by a background thread while
the device computes. Checkpoints: every rank writes `teacher_shard_rank{r}.pt`; rank 0 also writes
`teacher.pt`, the whole fp32 EMA by parameter name, from which any layout on any number of ranks loads.

Shapes: a shard is [S] (this rank's fp32 EMA of one param group); gathered shards are [W, S].
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from degla_scale.teacher import EMATeacher


@dataclass(frozen=True)
class Slot:
    """Where one parameter's fp32 EMA lives: param group `group`, from `offset` on. ZeRO-1/2: `offset` is
    into the whole flat buffer (all ranks' shards end to end). ZeRO-3: into every rank's shard, each
    holding `part` elements of the flattened, zero-padded parameter."""

    name: str
    group: int
    offset: int
    shape: torch.Size
    part: int = 0

    @property
    def numel(self) -> int:
        return self.shape.numel()


class _ShardedEMA:
    """The EMA arithmetic, offload, gathering and checkpoints both layouts share; subclasses say where a
    parameter lies in the shards (`_assemble` / `_partition`) and how the forward weights are refreshed."""

    module: nn.Module  # runs the teacher's forward
    slots: list[Slot]

    def __init__(self, masters: list[torch.Tensor], group, alpha: float, refresh_every: int, offload: bool):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMA alpha={alpha} must lie in [0, 1]")
        self.alpha, self.refresh_every, self.group, self.updates = alpha, refresh_every, group, 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.masters = masters
        self.offload = _CPUOffload(masters) if offload else None
        self.shards = self.offload.shards if offload else [m.detach().float().clone() for m in masters]  # starts as the student

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

    def refresh(self) -> None:
        raise NotImplementedError

    def _assemble(self, gathered_WS: list[torch.Tensor], slot: Slot) -> torch.Tensor:
        raise NotImplementedError

    def _partition(self, full: torch.Tensor, slot: Slot, shard_S: torch.Tensor) -> None:
        raise NotImplementedError

    def _check_shards(self, shard_numel: list[int]) -> None:
        for g, (want, shard) in enumerate(zip(shard_numel, self.shards)):
            if want != shard.numel():
                raise RuntimeError(f"param group {g}: the teacher's partition holds {want} elements but the student's fp32 "
                                   f"master partition {shard.numel()}: teacher and student partitions do not line up")

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA by name, buffers included (a collective: every rank must call it)."""
        self.wait()
        params = {n for n, _ in self.module.named_parameters()}
        state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().clone()
                 for k, v in self.module.state_dict().items() if k not in params}
        gathered = [_gather_to_host(shard, self.world, self.group) for shard in self.shards]
        for slot in self.slots:
            state[slot.name] = self._assemble(gathered, slot).view(slot.shape).clone()
        return state

    def save(self, tag_dir: Path, rank: int) -> None:
        self.refresh()  # a checkpoint is a refresh point: the resumed run refreshes on load
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
        saved = torch.load(shard_file, map_location="cpu", weights_only=True) if shard_file.is_file() else None
        if saved is not None and saved["world"] == self.world:
            for shard, value in zip(self.shards, saved["shards"]):
                shard.copy_(value)
            self.updates = saved["updates"]
        else:
            state = torch.load(tag_dir / "teacher.pt", map_location="cpu", weights_only=True)
            staged = [torch.zeros(s.numel(), dtype=torch.float32) for s in self.shards]
            for slot in self.slots:
                if slot.name not in state["module"]:
                    raise RuntimeError(f"{tag_dir / 'teacher.pt'} has no parameter {slot.name}: was it saved from another model?")
                self._partition(state["module"][slot.name].reshape(-1).float(), slot, staged[slot.group])
            for shard, value in zip(self.shards, staged):
                shard.copy_(value)
            self.updates = state["updates"]
        self.refresh()



GATHER_CHUNK = 1 << 24  # elements per rank and all-gather: bounds the device memory a full gather takes


def _gather_to_host(shard_S: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's shard → [W, S] fp32 on the host, in chunks through the device the comm backend uses."""
    out_WS = torch.empty(world, shard_S.numel(), dtype=torch.float32)
    if world == 1:
        return out_WS.copy_(shard_S.view(1, -1))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for start in range(0, shard_S.numel(), GATHER_CHUNK):
        piece = shard_S[start:start + GATHER_CHUNK].to(device, torch.float32)
        buf_WC = torch.empty(world, piece.numel(), dtype=torch.float32, device=device)
        dist.all_gather(list(buf_WC.unbind(0)), piece, group=group)
        out_WS[:, start:start + piece.numel()] = buf_WC.cpu()
    return out_WS


def _zero12_partitions(optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(flat low-precision parameter buffers, this rank's fp32 master partitions), one per param group."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer (stages 1 and 2)
        return optimizer.bit16_groups_flat, optimizer.single_partition_of_fp32_groups
    if hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16, stage 1, grad_accum_dtype fp32)
        return optimizer.bf16_groups_flat, optimizer.fp32_groups_flat_partition
    raise RuntimeError(f"the sharded EMA teacher needs a ZeRO-1/2 optimizer, got {type(optimizer).__name__}")


class ShardedEMATeacher(_ShardedEMA):
    """ZeRO-1/2: fp32 EMA shards of the flat master partitions; a replicated teacher module for the forward."""

    def __init__(self, engine, alpha: float, refresh_every: int = 1, offload: bool = False):
        flats, masters = _zero12_partitions(engine.optimizer)
        super().__init__(masters, getattr(engine.optimizer, "dp_process_group", None), alpha, refresh_every, offload)
        self.module = copy.deepcopy(engine.module).eval().requires_grad_(False)  # in the student's dtype
        self.forward_module = self.module  # what EMATeacher.encode runs
        self._refreshing = None  # the side stream a refresh's all-gather runs on, until the next forward waits
        # Re-seat the teacher's parameters on flat buffers laid out exactly like the student's, so a
        # partition of a teacher buffer is the same parameters' slice as the student's partition.
        self.flats = [torch.empty_like(flat) for flat in flats]
        self.slots = []
        teacher_params = dict(self.module.named_parameters())
        for name, p in engine.module.named_parameters():
            for g, flat in enumerate(flats):
                offset = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                if p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and 0 <= offset < flat.numel():
                    teacher_params[name].data = self.flats[g].narrow(0, offset, p.numel()).view(p.shape)
                    self.slots.append(Slot(name, g, offset, p.shape))
                    break
            else:
                raise RuntimeError(f"student parameter {name} lies in none of the optimizer's flat buffers: "
                                   "the teacher cannot be sharded like it")
        self._check_shards([flat.numel() // self.world for flat in self.flats])
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """All-gather the EMA shards into the teacher's flat buffers (in the teacher's dtype). On CUDA the
        gather is issued from a side stream, so it overlaps the next step's data wait and student forward;
        `encode` makes the compute stream wait for it before the teacher's forward reads the buffers."""
        self.wait()
        side = None
        if self.flats[0].is_cuda:
            side = self._side_stream = getattr(self, "_side_stream", None) or torch.cuda.Stream(self.flats[0].device)
            side.wait_stream(torch.cuda.current_stream(self.flats[0].device))  # the EMA update has been queued
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for flat, shard in zip(self.flats, self.shards):
                part = shard.to(flat.dtype).to(flat.device, non_blocking=True)  # cast first: bf16 travels, not fp32
                if self.world == 1:
                    flat.copy_(part)
                else:
                    dist.all_gather(list(flat.chunk(self.world)), part, group=self.group)
        self._refreshing = side

    @torch.no_grad()
    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._refreshing is not None:
            torch.cuda.current_stream(self.flats[0].device).wait_stream(self._refreshing)
            self._refreshing = None
        return EMATeacher.encode(self, images, texts)

    def _assemble(self, gathered_WS, slot):
        return gathered_WS[slot.group].view(-1)[slot.offset:slot.offset + slot.numel]

    def _partition(self, full, slot, shard_S):
        S = shard_S.numel()
        lo, hi = slot.offset, slot.offset + slot.numel  # this param's range in the whole flat buffer
        mine_lo, mine_hi = max(lo, self.rank * S), min(hi, (self.rank + 1) * S)
        if mine_lo < mine_hi:
            shard_S[mine_lo - self.rank * S:mine_hi - self.rank * S] = full[mine_lo - lo:mine_hi - lo]


class ZeRO3EMATeacher(_ShardedEMA):
    """ZeRO-3: fp32 EMA shards of the student's partitioned master weights; a second stage-3 engine (no
    optimizer) with the same partitioning runs the forward from partitions written from the shards."""

    def __init__(self, engine, teacher_engine, alpha: float, refresh_every: int = 1, offload: bool = False):
        optimizer = engine.optimizer
        if not hasattr(optimizer, "fp32_partitioned_groups_flat"):
            raise RuntimeError(f"the ZeRO-3 EMA teacher needs DeepSpeed's stage-3 optimizer, got {type(optimizer).__name__}")
        masters = optimizer.fp32_partitioned_groups_flat
        if any(m.numel() == 0 for m in masters):
            raise RuntimeError("the ZeRO-3 EMA teacher cannot read fp32 master partitions swapped to NVMe: "
                               "use zero.offload_optimizer none or cpu")
        super().__init__(masters, optimizer.dp_process_group, alpha, refresh_every, offload)
        self.engine, self.module = teacher_engine, teacher_engine.module
        self.teacher_engine_params = dict(teacher_engine.module.named_parameters())
        self.slots = []
        for name, p in engine.module.named_parameters():
            g, offset, part = optimizer.grad_position[optimizer.get_param_id(p)]
            t = self.teacher_engine_params.get(name)
            if t is None or t.ds_shape != p.ds_shape or t.ds_tensor.numel() != part:
                raise RuntimeError(f"parameter {name}: the student's rank-{self.rank} partition holds {part} elements "
                                   f"of {tuple(p.ds_shape)} but the teacher's "
                                   f"{'none' if t is None else f'{t.ds_tensor.numel()} of {tuple(t.ds_shape)}'}: "
                                   "teacher and student partitions do not line up")
            self.slots.append(Slot(name, g, offset, p.ds_shape, part))
        self._check_shards([sum(s.part for s in self.slots if s.group == g) for g in range(len(self.shards))])
        teacher_engine.eval()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Write the EMA shards into the teacher engine's partitions (local copies, cast to their dtype)."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.wait()
        params = list(self.teacher_engine_params.values())
        # Parameters DeepSpeed keeps gathered (persistent small ones) would hide the new partitions: free them
        # so the next forward gathers afresh.
        gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)
        first = params[0].ds_tensor
        staged = [shard.to(first.dtype).to(first.device, non_blocking=True) for shard in self.shards]  # cast, then move
        for slot in self.slots:
            self.teacher_engine_params[slot.name].ds_tensor.copy_(staged[slot.group].narrow(0, slot.offset, slot.part))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_BD, txt_ND, _ = self.engine(images, texts)
        return img_BD, txt_ND

    def _assemble(self, gathered_WS, slot):
        return gathered_WS[slot.group][:, slot.offset:slot.offset + slot.part].reshape(-1)[:slot.numel]

    def _partition(self, full, slot, shard_S):
        padded = torch.zeros(self.world * slot.part)
        padded[:slot.numel] = full
        shard_S[slot.offset:slot.offset + slot.part] = padded.view(self.world, slot.part)[self.rank]


class _CPUOffload:
    """EMA shards in (pinned) host memory, updated by a background thread while the device computes.

    After each optimizer step the fp32 master partitions are copied into host staging buffers (on a side
    CUDA stream when they live on the GPU), and one worker thread folds them into the shards once the copy
    has landed. The next update, a refresh or a checkpoint waits for it first."""

    def __init__(self, masters: list[torch.Tensor]):
        from concurrent.futures import ThreadPoolExecutor

        pin = torch.cuda.is_available()
        self.shards = [torch.empty(m.shape, dtype=torch.float32, pin_memory=pin).copy_(m.detach()) for m in masters]
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
