"""Per-GPU memory plan for a DeGLA config: what each ZeRO stage and offload choice puts on a device.

The command line is benchmarks/memory_plan.py; the trainer uses `resolve_batch_size` for
`data.batch_size: auto`.

Static bytes follow from the parameter count P (counted on the meta device), the training precision
(p = 2 bytes bf16, 4 fp32) and the world size W:
    weights      p·P, or p·P/W at ZeRO-3 (0 with parameter offload)
    gradients    p·P at ZeRO-0/1, p·P/W at ZeRO-2/3, plus DeepSpeed's reduce bucket at ZeRO ≥ 1
    optimizer    Adam moments 8·P, plus the fp32 master 4·P unless ZeRO-0 trains in fp32; /W at ZeRO ≥ 1
                 (0 with optimizer offload)
    teacher      ZeRO-0: a replicated fp32 EMA 4·P, plus its forward copy p·P under bf16 or refresh_every > 1; ZeRO-1/2/3: the fp32 EMA shard 4·P/W (0 when it or the optimizer is offloaded)
                 plus the forward weights: a replicated copy p·P (ZeRO-1/2) or partitions p·P/W (ZeRO-3,
                 0 with parameter offload)
Activations are not guessed: the model runs one sample (an image and its 1 + K captions) forward on the
meta device, in the training dtype and with the configured gradient checkpointing, and the bytes autograd
saves for backward are counted (with checkpointing, plus one block's full activations for its recompute,
taken as the average block's share of a forward without checkpointing); the loss adds its own (explicit logits for the torch backend, O((B+N)·D)
for the kernels). The largest micro-batch is what fits in the GPU memory left after the static part.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from degla_scale.config import Config
from degla_scale.engine import reduce_bucket_elements
from degla_scale.models import build_model

GIB = 2**30


@dataclass
class Plan:
    params: int
    weights: float
    gradients: float
    optimizer: float
    teacher: float
    activations_per_sample: float
    loss_per_sample: float
    batch: int

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.teacher

    @property
    def total(self) -> float:
        return self.static + self.batch * (self.activations_per_sample + self.loss_per_sample)

    def max_batch(self, memory_bytes: float, reserve: float = 0.1) -> int:
        """Largest micro-batch fitting `memory_bytes`, keeping a `reserve` share for the allocator and workspace."""
        free = memory_bytes * (1 - reserve) - self.static
        return max(0, int(free // (self.activations_per_sample + self.loss_per_sample)))


def activation_bytes(cfg: Config, dtype: torch.dtype) -> float:
    """Activation bytes per sample at the backward's peak. With gradient checkpointing that is the saved
    block inputs plus one block recomputed in full (estimated as the average block's share)."""
    saved, blocks = saved_activation_bytes(cfg.model, cfg.data.num_negatives, dtype)
    if not cfg.model.grad_checkpointing:
        return saved
    full, _ = saved_activation_bytes(replace(cfg.model, grad_checkpointing=False), cfg.data.num_negatives, dtype)
    return saved + full / blocks


def saved_activation_bytes(model_cfg, num_negatives: int, dtype: torch.dtype) -> tuple[float, int]:
    """(bytes autograd keeps for backward for one image and its 1 + K captions, transformer blocks):
    a meta-device forward, so no memory is used."""
    with torch.device("meta"):
        model = build_model(model_cfg, load_weights=False, device="meta").to(dtype).train()
        clip = model.clip
        size = clip.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        images = torch.empty(1, 3, *size, dtype=dtype)
        tokens = torch.zeros(1 + num_negatives, clip.context_length, dtype=torch.long)
    blocks = len(clip.visual.transformer.resblocks) + len(clip.transformer.resblocks)
    seen: dict[int, torch.Tensor] = {}  # keeps the tensors alive, so ids stay unique

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t  # a view saves its base's storage, once
        if not isinstance(base, torch.nn.Parameter):  # weights are counted as weights
            seen[id(base)] = base
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, tokens)
    return float(sum(t.numel() * t.element_size() for t in seen.values())), blocks


def plan(cfg: Config, world: int, on_gpu: bool = True) -> Plan:
    z, W = cfg.zero, world
    with torch.device("meta"):
        P = sum(p.numel() for p in build_model(cfg.model, load_weights=False, device="meta").parameters())
    bf16 = z.precision == "bf16" or (z.precision == "auto" and on_gpu)
    p = 2 if bf16 else 4
    weights = 0.0 if z.offload_params == "cpu" else p * P / (W if z.stage == 3 else 1)
    gradients = p * P / (W if z.stage >= 2 else 1)
    if z.stage >= 1:
        gradients += p * reduce_bucket_elements(P)  # DeepSpeed's contiguous gradient bucket
    master = 4 if (bf16 or z.stage >= 1) else 0  # DeepSpeed keeps an fp32 partition at ZeRO >= 1 even in fp32
    optimizer = 0.0 if z.offload_optimizer == "cpu" else (master + 8) * P / (W if z.stage >= 1 else 1)
    teacher = 0.0
    if cfg.objective.needs_teacher:
        if z.stage == 0:  # the fp32 EMA, and its forward copy unless the EMA itself can run every forward
            teacher = 4.0 * P + (p * P if bf16 or cfg.teacher.refresh_every > 1 else 0.0)
        else:  # the EMA shard sits beside the fp32 masters, on the host when either is offloaded
            on_host = "cpu" in (cfg.teacher.offload, z.offload_optimizer)
            forward = p * P if z.stage < 3 else (0.0 if z.offload_params == "cpu" else p * P / W)
            teacher = (0.0 if on_host else 4 * P / W) + forward
    b, K = cfg.data.batch_size, cfg.data.num_negatives
    B, N = W * b, W * b * (1 + K)
    if cfg.objective.backend == "torch" or not on_gpu:  # explicit fp32 logits: i2t [b, N] and t2i [b, B], + softmax grads
        loss = 2 * 4 * (N + B)
    else:
        loss = 0.0  # the kernels keep O((B + N)·D): part of the saved activations already
    return Plan(P, weights, gradients, optimizer, teacher, activation_bytes(cfg, torch.bfloat16 if bf16 else torch.float32),
                float(loss), b)


AUTO_RESERVE = 0.15  # share of device memory kept free for the allocator, workspaces and fragmentation


def resolve_batch_size(cfg: Config, world: int, memory_bytes: float, on_gpu: bool = True) -> tuple[int, str]:
    """`data.batch_size: auto` → the largest micro-batch the plan fits in `memory_bytes` with
    AUTO_RESERVE kept free, and the line that says why."""
    probe = plan(replace(cfg, data=replace(cfg.data, batch_size=1)), world, on_gpu)
    fits = probe.max_batch(memory_bytes, reserve=AUTO_RESERVE)
    per_sample = probe.activations_per_sample + probe.loss_per_sample
    line = (f"data.batch_size=auto → {fits}: static {probe.static / GIB:.1f} GiB + {fits} × {per_sample / 2**20:.0f} MiB "
            f"per sample of {memory_bytes / GIB:.0f} GiB, {AUTO_RESERVE:.0%} kept free (degla_scale/memory_plan.py)")
    return fits, line
