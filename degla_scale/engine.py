"""The DeepSpeed side of a run: process group and device, the engine's config, optimizer and schedule,
and the EMA teacher in the layout of the student's ZeRO stage."""
from __future__ import annotations

import math
import os
from dataclasses import replace

from degla_scale import accelerator

accelerator.configure()  # before deepspeed is imported

import deepspeed  # noqa: E402
import torch  # noqa: E402

from degla_scale import distributed as D  # noqa: E402
from degla_scale.config import Config  # noqa: E402
from degla_scale.models import build_model, compile_blocks  # noqa: E402
from degla_scale.teacher import EMATeacher  # noqa: E402
from degla_scale.teacher_sharded import ShardedEMATeacher, ZeRO3EMATeacher  # noqa: E402

Teacher = EMATeacher | ShardedEMATeacher | ZeRO3EMATeacher


def init_runtime(cfg: Config) -> tuple[torch.device, bool]:
    """Process group, this rank's device (and CPU thread share), and whether to train in bf16."""
    D.ensure_launcher_env()
    deepspeed.init_distributed(dist_backend=accelerator.dist_backend())
    from deepspeed.accelerator import get_accelerator

    if accelerator.configure() == "cuda":
        device = torch.device(get_accelerator().device_name(), get_accelerator().current_device())
    else:  # share the cores between the ranks on this machine, leaving one per data worker:
        # oversubscribed cores make OpenMP threads spin-wait, which costs more than a thread gains
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // D.local_world_size() - cfg.data.num_workers))
    bf16 = cfg.zero.precision == "bf16" or (cfg.zero.precision == "auto" and device.type == "cuda")
    return device, bf16


def build_engine(cfg: Config, device: torch.device, bf16: bool, total_steps: int, load_weights: bool = True,
                 load_universal: bool = False) -> tuple[deepspeed.DeepSpeedEngine, Teacher | None]:
    """The student inside its DeepSpeed engine (AdamW, warm-up + cosine) and the EMA teacher, if the loss needs one."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, load_weights=load_weights)
    if cfg.model.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(cfg, bf16, device.type == "cuda",
                                                                  sum(p.numel() for p in model.parameters()), load_universal))
    teacher = build_teacher(cfg, engine, device, bf16)
    if teacher is not None and cfg.model.compile:
        compile_blocks(teacher.forward_module)  # its own copy of the blocks (no_grad: a graph of its own)
    return engine, teacher


def build_teacher(cfg: Config, engine: deepspeed.DeepSpeedEngine, device: torch.device, bf16: bool) -> Teacher | None:
    """The EMA teacher in the layout of the student's ZeRO stage (None when the loss needs no teacher)."""
    if not cfg.objective.needs_teacher:
        return None
    offload = cfg.teacher.offload == "cpu"
    if cfg.zero.stage in (1, 2):
        return ShardedEMATeacher(engine, cfg.teacher.ema_alpha, cfg.teacher.refresh_every, offload)
    if cfg.zero.stage == 3:  # a second stage-3 engine, no optimizer, partitioned like the student
        model = build_model(replace(cfg.model, grad_checkpointing=False), load_weights=False)  # weights come from the EMA
        zero = zero_section(cfg, device.type == "cuda", sum(p.numel() for p in model.parameters()))
        zero.pop("offload_optimizer", None)
        ds = {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": cfg.schedule.grad_accum,
              "zero_optimization": zero, "bf16": {"enabled": bf16}, "steps_per_print": 1 << 30}
        teacher_engine, *_ = deepspeed.initialize(model=model.requires_grad_(False), config=ds)
        return ZeRO3EMATeacher(engine, teacher_engine, cfg.teacher.ema_alpha, cfg.teacher.refresh_every, offload)
    return EMATeacher(engine.module, cfg.teacher.ema_alpha, torch.bfloat16 if bf16 else torch.float32,
                      cfg.teacher.refresh_every).to(device)


def build_ds_config(cfg: Config, bf16: bool, on_cuda: bool, num_params: int, load_universal: bool = False) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.schedule.grad_accum,
        "zero_optimization": zero_section(cfg, on_cuda, num_params),
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.zero.grad_accum_dtype == "fp32":  # under bf16 at ZeRO-1 this makes DeepSpeed pick its BF16_Optimizer
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if load_universal:  # resuming on another number of ranks (checkpoint.prepare made the universal copy)
        ds["checkpoint"] = {"load_universal": True}
    return ds


REDUCE_BUCKET_ELEMENTS = 50_000_000  # DeepSpeed's default is 5e8: a 1-2 GB buffer whatever the model's size


def reduce_bucket_elements(num_params: int) -> int:
    """Gradient reduce/all-gather bucket: DeepSpeed allocates it whole, so never larger than the model
    (rounded up to a multiple of 1024, as its alignment checks want an even size)."""
    return -(-min(REDUCE_BUCKET_ELEMENTS, num_params) // 1024) * 1024


def zero_section(cfg: Config, on_cuda: bool, num_params: int) -> dict:
    """DeepSpeed's zero_optimization block for the config's stage and offload choices."""
    z = cfg.zero
    section: dict = {"stage": z.stage}
    if z.stage >= 1:
        bucket = reduce_bucket_elements(num_params)
        section.update(contiguous_gradients=True, overlap_comm=on_cuda,  # overlap needs CUDA streams
                       reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if z.offload_optimizer == "cpu":
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if z.offload_params == "cpu":
        section["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    return section


def build_optimizer(model: torch.nn.Module, cfg: Config, fused: bool) -> torch.optim.Optimizer:
    """AdamW; like open_clip, no weight decay on gains, biases and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.zero.offload_optimizer == "cpu":  # the step runs on CPU tensors: DeepSpeed's vectorised Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             **({"fused": True} if fused else {}))


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak, then cosine to zero at `total` optimizer steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor
