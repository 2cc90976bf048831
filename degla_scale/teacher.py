"""The EMA teacher (docs/objective.md, "EMA teacher"): θ_t ← α·θ_t + (1−α)·θ_s after every optimizer step.

The EMA is kept in fp32 because at α = 0.9996 a bf16 EMA stops moving (the update is below bf16's
resolution). The teacher's forward runs in the training dtype without autocast, from a copy of the EMA
in that dtype rewritten every `refresh_every` updates and at every checkpoint (the forward weights are at
most `refresh_every − 1` updates behind the EMA: with α = 0.9996 that is a 0.04% step each, against the
EMA's time constant of 1/(1 − α) = 2500 steps). Every layout refreshes at the same steps, and a
checkpoint is a refresh point, so a resumed run's forward teacher (refreshed on load) is the
uninterrupted run's. `EMATeacher` is a replicated fp32 copy of the student (ZeRO-0). Under ZeRO-1/2/3 the EMA is
sharded like the student's master weights instead: `degla_scale.teacher_sharded`. All share one
interface: update / encode / save / load / full_state_dict.

Checkpoints: rank 0 writes `teacher.pt`, the whole fp32 EMA as a state dict, which every layout loads on
any number of ranks.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


class EMATeacher:
    """Holds the teacher module; `update` blends the student in, `encode` runs it without gradient."""

    def __init__(self, student: nn.Module, alpha: float, forward_dtype: torch.dtype = torch.float32,
                 refresh_every: int = 1):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMA alpha={alpha} must lie in [0, 1]")
        self.alpha, self.refresh_every = alpha, refresh_every
        self.module = copy.deepcopy(student).float().eval().requires_grad_(False)  # the fp32 EMA
        same = forward_dtype == torch.float32 and refresh_every == 1  # the EMA itself can run the forward
        self.forward_module = self.module if same else copy.deepcopy(self.module).to(forward_dtype)
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
        if self.updates % self.refresh_every == 0:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Write the fp32 EMA into the forward copy (a casting copy; nothing to do when the forward is fp32)."""
        if self.forward_module is not self.module:
            torch._foreach_copy_(list(self.forward_module.parameters()), list(self.module.parameters()))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings in the forward weights' dtype (no autocast: the weights already are that dtype)."""
        dtype = next(self.forward_module.parameters()).dtype
        img_BD, txt_ND, _ = self.forward_module(images.to(dtype), texts)
        return img_BD, txt_ND

    def to(self, device: torch.device) -> "EMATeacher":
        self.module.to(device)
        self.forward_module.to(device)
        return self

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA (parameters and buffers) by name."""
        return self.module.state_dict()

    def save(self, tag_dir: Path, rank: int) -> None:
        self.refresh()  # a checkpoint is a refresh point: the resumed run refreshes on load
        if rank == 0:
            torch.save({"alpha": self.alpha, "updates": self.updates, "module": self.full_state_dict()}, tag_dir / "teacher.pt")

    def load(self, tag_dir: Path, rank: int) -> None:
        state = torch.load(tag_dir / "teacher.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
        self.refresh()
