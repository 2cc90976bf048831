"""DeGLA training on a DeepSpeed engine: `train()` → `train_step()` → `forward_backward()`.

Shapes: images [b, 3, H, W]; tokens [b·(1+K), L]; embeddings img_BD [b, D], txt_ND [b·(1+K), D].
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from degla_scale import accelerator

accelerator.configure()  # before deepspeed is imported

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from degla_scale import checkpoint, run_config  # noqa: E402
from degla_scale.cli import notice  # noqa: E402
from degla_scale import distributed as D  # noqa: E402
from degla_scale.config import Config, ConfigError  # noqa: E402
from degla_scale.engine import Teacher, build_engine, init_runtime  # noqa: E402
from degla_scale.data.reader import (  # noqa: E402
    Batch, DataPosition, ShardReader, list_shards, peek_num_negatives, read_manifest,
)
from degla_scale.data.images import DeviceNormalize, TrainImageTransform  # noqa: E402
from degla_scale.data.mds import MDSReader, mds_stats  # noqa: E402
from degla_scale.data.rejects import check_reject_budget, reject_totals  # noqa: E402
from degla_scale.logs import RunLog, check_wandb, plot_loss_curves  # noqa: E402
from degla_scale.export import engine_state_dict  # noqa: E402
from degla_scale.models import (  # noqa: E402
    check_model, open_clip_layout, tokenizer, train_image_transform,
)
from degla_scale.objective import DeGLALoss, degla_loss  # noqa: E402
from degla_scale.preemption import Preemption  # noqa: E402
from degla_scale.reliability import GradientGate, NonFiniteError, NonFiniteWatch, install_gradient_gate  # noqa: E402
from degla_scale.telemetry import Telemetry  # noqa: E402
from degla_scale.train_eval import ForgettingStop, TrainEvaluator, plot_eval_curve  # noqa: E402

LOSS_TERMS = ("total", "clip", "igc", "tgc", "distill")


def check_data(cfg: Config) -> int:
    """Validate every shard source against the config before any process group starts; return samples per epoch."""
    k, total = cfg.data.num_negatives, 0
    for source in cfg.data.source_list():
        if source.remote is not None:  # shards arrive when the reader starts: trust the config's counts
            if not cfg.data.num_samples:
                raise ConfigError(f"data.sources remote {source.remote}: set data.num_samples (the samples per epoch)")
            continue
        manifest = read_manifest(source.path) or {}
        # The fewest negatives a sample holds (the reader picks K of a sample's negatives); without a
        # manifest (shards made elsewhere), the first sample's count.
        if cfg.data.format == "mds":
            first_k, count = mds_stats(source.path)
            manifest.setdefault("num_samples", count)
        else:
            first_k = None if "num_negatives" in manifest else peek_num_negatives(list_shards(source.path))
        data_k = manifest.get("min_negatives", manifest.get("num_negatives", first_k))
        if k > data_k:
            raise ConfigError(f"data.num_negatives={k} but the shards in {source.path} hold as few as {data_k} "
                              f"negatives per sample: set data.num_negatives to at most {data_k} (or 0 for plain CLIP)")
        if not cfg.data.num_samples and "num_samples" not in manifest:
            raise ConfigError(f"no manifest.json beside {source.path}: set data.num_samples to the number of samples")
        if manifest.get("num_samples") == 0 and not cfg.data.num_samples:
            raise ConfigError(f"the shards in {source.path} hold no samples (manifest.json: num_samples 0): see its "
                              "rejects.jsonl for why every record was rejected, fix them and convert again")
        total += manifest.get("num_samples", 0)
    return int(cfg.data.num_samples or total)


def build_reader(cfg: Config, rank: int, world: int, transform: TrainImageTransform,
                 pin_memory: bool) -> ShardReader | MDSReader:
    """This rank's batches of the configured shard format and sources (same samples, same Batch either way)."""
    d = cfg.data
    paths, weights = [s.path for s in d.source_list()], [s.weight for s in d.source_list()]
    common = dict(batch_size=d.batch_size, num_negatives=d.num_negatives, num_workers=d.num_workers, seed=cfg.seed,
                  transform=transform, tokenize=tokenizer(cfg.model), weights=weights,
                  negatives_pick=d.negatives_pick, pin_memory=pin_memory)
    if d.format == "mds":
        return MDSReader(paths, remotes=[s.remote for s in d.source_list()], **common)
    return ShardReader([list_shards(p) for p in paths], shuffle_buffer=d.shuffle_buffer, rank=rank, world=world, **common)


@dataclass
class Run:
    """Everything the loop needs, built once by `setup()`."""

    cfg: Config
    engine: deepspeed.DeepSpeedEngine
    teacher: Teacher | None
    reader: ShardReader | MDSReader
    log: RunLog
    device: torch.device
    input_dtype: torch.dtype
    steps_per_epoch: int
    total_steps: int
    telemetry: Telemetry
    layout: checkpoint.Layout  # step 0: how this run is laid out over ranks
    normalize: DeviceNormalize  # uint8 batches → the model's normalised input, on the device
    watch: NonFiniteWatch
    gate: GradientGate | None  # ZeRO-0 fp32's non-finite check (DeepSpeed's optimizers make their own)
    step: int = 0
    position: DataPosition | None = None
    skipped_in_row: int = 0  # reliability.nonfinite=skip: consecutive steps whose update was dropped
    skipped_total: int = 0
    last_saved: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
    scale: torch.Tensor | None = None  # the clamped logit scale of the last forward (ZeRO-3 holds no whole parameter)
    evaluator: TrainEvaluator | None = None  # evaluation.every > 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def preflight(cfg: Config) -> int:
    """The checks that need no process group (model name and weights, data against config, loss backend
    against device) → samples per epoch."""
    check_model(cfg.model.name, cfg.model.pretrained)
    if cfg.logging.wandb:
        check_wandb()
    if cfg.objective.backend == "triton" and accelerator.configure() == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("objective.backend=triton needs CUDA (or TRITON_INTERPRET=1, Triton's slow CPU interpreter): "
                          "use objective.backend=auto")
    return check_data(cfg)


def resolve_auto_batch(cfg: Config, world: int) -> Config:
    """`data.batch_size: auto` → the planner's largest micro-batch for this GPU's memory (said in one line)."""
    if cfg.data.batch_size != "auto":
        return cfg
    if not torch.cuda.is_available():
        raise ConfigError("data.batch_size=auto fits the micro-batch to the GPU's memory and there is no GPU: "
                          "set data.batch_size to a number")
    from degla_scale.memory_plan import resolve_batch_size

    memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    batch, line = resolve_batch_size(cfg, world, memory)
    if batch < 1:
        raise ConfigError(f"{line}: not one sample fits; raise zero.stage, offload (zero.offload_optimizer=cpu) "
                          "or set model.grad_checkpointing=true")
    notice(line)
    return replace(cfg, data=replace(cfg.data, batch_size=batch))


def setup(cfg: Config) -> Run | None:
    """Everything a run needs, resumed from its latest checkpoint; None when the run is already complete."""
    num_samples = preflight(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; the process group starts below
    cfg = resolve_auto_batch(cfg, world)
    per_step = world * cfg.data.batch_size * cfg.schedule.grad_accum
    steps_per_epoch = num_samples // per_step
    if steps_per_epoch < 1:
        raise ConfigError(f"{num_samples} samples fill no optimizer step of {per_step} (ranks × batch × accum): "
                          "lower data.batch_size or schedule.grad_accum")
    total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch
    point = checkpoint.find(cfg)
    if point is not None:
        changed = run_config.check_resume(Path(cfg.run_dir), cfg)
        if point.saved.step >= total_steps and (Path(cfg.run_dir) / "final" / "student.pt").is_file():
            notice(f"{cfg.run_dir} is already complete (step {point.saved.step}/{total_steps}): nothing to do; use "
                   "a new run_dir to train again, or checkpoint.resume=none to start over in this one")
            return None
    device, bf16 = init_runtime(cfg)
    rank = D.rank()
    evaluator = TrainEvaluator(cfg, device, point is not None) if cfg.evaluation.every else None  # benchmarks read before the model
    layout = checkpoint.Layout(0, world, cfg.data.batch_size, cfg.schedule.grad_accum)
    universal = point is not None and checkpoint.prepare(point, layout, cfg.zero.stage, bf16)  # refuses another global batch
    if point is not None:
        notice(f"resuming {cfg.run_dir} from step {point.saved.step}/{total_steps}")
        if changed:
            notice(f"warning: {changed}")
    engine, teacher = build_engine(cfg, device, bf16, total_steps, load_universal=universal)
    transform = train_image_transform(cfg.model)
    reader = build_reader(cfg, rank, world, transform, pin_memory=device.type == "cuda")
    log = RunLog(Path(cfg.run_dir), enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                 wandb=cfg if cfg.logging.wandb else None)
    run = Run(cfg, engine, teacher, reader, log, device, torch.bfloat16 if bf16 else torch.float32,
              steps_per_epoch, total_steps, Telemetry(device), layout,
              DeviceNormalize(transform.mean, transform.std, device), NonFiniteWatch(device),
              install_gradient_gate(engine, skip=cfg.reliability.nonfinite == "skip"), position=DataPosition(),
              evaluator=evaluator)
    if point is not None:
        run.position = checkpoint.load(point, universal, layout, engine, teacher, cfg.data.num_workers)
        run.step = run.last_saved = point.saved.step
    return run


# ---------------------------------------------------------------- the step


def forward_backward(run: Run, batch: Batch) -> DeGLALoss:
    """Student and teacher forward on one micro-batch, the DeGLA loss, and its backward."""
    images = run.normalize(batch.images.to(run.device, non_blocking=True), run.input_dtype)  # uint8 crosses
    tokens = batch.tokens.to(run.device, non_blocking=True)
    img_BD, txt_ND, scale = run.engine(images, tokens)
    run.scale = scale.detach()
    t_img_BD = t_txt_ND = None
    if run.teacher is not None:
        t_img_BD, t_txt_ND = run.teacher.encode(images, tokens)
    out = objective_loss(run.cfg, img_BD, txt_ND, scale, t_img_BD, t_txt_ND)
    run.engine.backward(out.total)
    return out


def objective_loss(cfg: Config, img_BD, txt_ND, scale, t_img_BD, t_txt_ND) -> DeGLALoss:
    """The DeGLA loss with the config's K, weights, τ and backend."""
    obj = cfg.objective
    return degla_loss(img_BD, txt_ND, scale, t_img_BD, t_txt_ND, num_negatives=cfg.data.num_negatives,
                      igc_weight=obj.igc_weight, tgc_weight=obj.tgc_weight, distill_weight=obj.distill_weight,
                      tgc_scale=obj.tgc_scale, backend=obj.backend, tgc_grouping=obj.tgc_grouping,
                      deterministic=obj.deterministic)


def train_step(run: Run, batches: Iterator[Batch]) -> tuple[torch.Tensor, list[str], bool]:
    """One optimizer step over `grad_accum` micro-batches, then the EMA update.

    Returns the micro-batch-averaged loss terms [5] (this rank), the sample keys consumed, and whether the
    optimizer dropped the update for non-finite gradients (then the EMA is not updated either)."""
    terms = torch.zeros(len(LOSS_TERMS), device=run.device)
    keys: list[str] = []
    skipped_before = run.engine.skipped_steps
    for _ in range(run.cfg.schedule.grad_accum):
        batch = next(batches)
        out = forward_backward(run, batch)
        run.engine.step()  # DeepSpeed steps the optimizer and scheduler at the accumulation boundary
        terms += torch.stack([getattr(out, t).detach().float() for t in LOSS_TERMS])
        keys.extend(batch.keys)
    skipped = run.engine.skipped_steps > skipped_before  # a host count: the optimizer read its verdict already
    run.step += 1
    run.watch.record(run.step, terms[1:], run.gate.bad if run.gate is not None else skipped)
    if run.teacher is not None and not skipped:
        run.teacher.update(run.engine.module)
    return terms / run.cfg.schedule.grad_accum, keys, skipped


# ---------------------------------------------------------------- the loop


def _after_bad_steps(run: Run, skipped: bool) -> None:
    """reliability.nonfinite=skip: count a dropped update, and stop after `max_skipped` in a row."""
    if not skipped:
        run.skipped_in_row = 0
        return
    run.skipped_in_row += 1
    run.skipped_total += 1
    limit = run.cfg.reliability.max_skipped
    if run.cfg.reliability.nonfinite == "skip":
        notice(f"step {run.step}: non-finite gradients, the update was skipped on every rank "
               f"({run.skipped_in_row} in a row of at most reliability.max_skipped={limit})")
    if run.skipped_in_row >= limit:
        raise NonFiniteError(f"{run.skipped_in_row} steps in a row up to step {run.step} had non-finite gradients "
                             f"(reliability.max_skipped={limit}): stopped without writing a checkpoint; "
                             + _resume_hint(run))


def _resume_hint(run: Run) -> str:
    if run.last_saved is None:
        return "no checkpoint was written, so a relaunch starts over: lower optim.lr or check the data"
    return (f"relaunching with checkpoint.resume=auto continues from step {run.last_saved}; lower optim.lr or "
            "check the data if it happens again")


def _teacher_refreshed(run: Run) -> bool:
    """Whether the EMA teacher's forward copy was just refreshed. A checkpoint is a refresh point (the resumed
    run refreshes on load), so an unscheduled save elsewhere would steer the run off the uninterrupted one's
    course: a preemption save waits for the next refresh, at most teacher.refresh_every − 1 steps."""
    return run.teacher is None or run.teacher.updates % run.cfg.teacher.refresh_every == 0


def _check_finite(run: Run) -> str | None:
    """Collective, at log steps and before every checkpoint: under stop, end the run at the first non-finite
    step; under skip, describe it for the log."""
    found = run.watch.read()
    if found is not None and run.cfg.reliability.nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss or gradients at {found} (reliability.nonfinite=stop): stopped "
                             "without writing a checkpoint; " + _resume_hint(run))
    return found


def _log_record(run: Run, terms_sum: torch.Tensor, n: int, samples: int, seconds: float, keys: list[str]) -> dict:
    """Average the loss terms over steps and ranks; rank 0 gets the record."""
    if D.is_dist():
        dist.all_reduce(terms_sum)
    terms = (terms_sum / (n * D.world_size())).tolist()
    record = {"step": run.step, "epoch": run.position.epoch, "lr": run.engine.get_lr()[0]}
    record.update({f"loss.{t}": v for t, v in zip(LOSS_TERMS, terms)})
    record["scale"] = float(run.scale.float().reshape(-1)[0].item())
    record["samples_per_s"] = samples * D.world_size() / max(seconds, 1e-9)
    record["rejected"], record["samples_read"], record["reject_examples"] = reject_totals(_gather_objects(run.position))
    record["skipped_steps"] = run.skipped_total
    if run.cfg.logging.telemetry:
        record.update(run.telemetry.read())  # rank 0's GPU
    if run.cfg.logging.sample_ids:
        record["sample_ids"] = _gather_objects(keys)
    return record


def _gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (small, log-time data only)."""
    if not D.is_dist():
        return [obj]
    out = [None] * D.world_size()
    dist.all_gather_object(out, obj)
    return out


def train(cfg: Config) -> dict:
    """Run (or resume) training to the end, or to a preemption signal; returns the last log record (empty
    for a run already complete)."""
    preemption = Preemption()
    try:
        run = setup(cfg)
        if run is None:
            return {}
        return _train(run, preemption)
    finally:
        preemption.restore()


def _train(run: Run, preemption: Preemption) -> dict:
    cfg = run.cfg  # data.batch_size=auto resolved
    rank0 = D.rank() == 0
    ranks = _gather_objects({"host": socket.gethostname(), "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
                             "local_world_size": D.local_world_size(), "cpu_threads": torch.get_num_threads()})
    if rank0:
        run_config.save(Path(cfg.run_dir), cfg)
        run.log.write({"event": "start", "step": run.step, "total_steps": run.total_steps,
                       "steps_per_epoch": run.steps_per_epoch, "world_size": D.world_size(), "ranks": ranks,
                       "resumed": run.step > 0, "data_position": run.position.to_json()})
    if run.evaluator is not None and run.step == 0:  # the pre-trained model: the alarm's baseline
        _evaluate(run)
    progress = None
    if rank0 and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)

    try:
        record = _loop(run, progress, preemption)
    finally:
        if progress is not None:
            progress.close()
    if run.step == run.total_steps:
        finish(run)
    else:  # preempted: the checkpoint is written
        run.log.close()
    return record


def _loop(run: Run, progress, preemption: Preemption) -> dict:
    """Steps to the end, or to the step after a preemption signal (then saved); returns the last log record."""
    cfg = run.cfg
    micro_per_epoch = run.steps_per_epoch * cfg.schedule.grad_accum
    terms_sum, n, keys, t0 = torch.zeros(len(LOSS_TERMS), device=run.device), 0, [], time.perf_counter()
    record: dict = {}
    while run.step < run.total_steps:
        if run.position.batches >= micro_per_epoch:
            run.position = replace(run.position, epoch=run.position.epoch + 1, batches=0, consumed=[])
        batches = run.reader.epoch(run.position)
        try:
            while run.step < run.total_steps and run.position.batches < micro_per_epoch:
                terms, step_keys, skipped = train_step(run, batches)
                _after_bad_steps(run, skipped)
                terms_sum += terms
                n += 1
                keys.extend(step_keys)
                last = run.step == run.total_steps
                due = run.step % cfg.checkpoint.every == 0 or last
                signal_name = preemption.requested()
                if signal_name is not None and not (due or _teacher_refreshed(run)):
                    signal_name = None  # not yet: see _teacher_refreshed
                log_now = run.step % cfg.logging.every == 0 or last
                save_now = due or signal_name is not None
                nonfinite = _check_finite(run) if log_now or save_now else None
                if log_now:
                    record = _log_record(run, terms_sum, n, n * cfg.data.batch_size * cfg.schedule.grad_accum,
                                         time.perf_counter() - t0, keys)
                    if nonfinite is not None:
                        record["nonfinite"] = nonfinite
                    run.log.write(record)
                    check_reject_budget(record["rejected"], record["samples_read"], record["reject_examples"],
                                        cfg.data.max_rejected_fraction)  # every rank holds the same totals
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss.total']:.4f}", refresh=False)
                    terms_sum, n, keys, t0 = torch.zeros_like(terms_sum), 0, [], time.perf_counter()
                stop = None
                if run.evaluator is not None and run.evaluator.due(run.step, run.total_steps):
                    eval_start = time.perf_counter()
                    stop = _evaluate(run)
                    t0 += time.perf_counter() - eval_start  # samples_per_s counts training time only
                if save_now or stop is not None:
                    checkpoint.save(run.ckpt_dir, replace(run.layout, step=run.step), run.engine, run.teacher,
                                    run.position, cfg.checkpoint.keep_last)
                    run.last_saved = run.step
                if stop is not None:
                    run.log.write({"event": "stopped", "step": run.step, "reason": stop})
                    run.log.close()
                    raise ForgettingStop(f"{stop} (evaluation.stop_on_drop=true): saved the checkpoint of step "
                                         f"{run.step} in {run.ckpt_dir}; best weights so far in {run.run_dir / 'best'}")
                if progress is not None:
                    progress.update(1)
                if signal_name is not None and not last:
                    run.log.write({"event": "preempted", "step": run.step, "signal": signal_name})
                    notice(f"{signal_name}: saved the checkpoint of step {run.step}/{run.total_steps} in {run.ckpt_dir} "
                           "and stopped; relaunch the same command to continue")
                    return record
        finally:  # shuts the epoch's data workers down, also when a step raised (they ignore SIGTERM)
            batches.close()
    return record


def _evaluate(run: Run) -> str | None:
    """Score the configured suites now (collective) and log them; the alarm's line when the run must stop."""
    record, stop = run.evaluator.evaluate(run.engine, run.teacher, run.step)
    run.log.write(record)
    if D.rank() == 0:
        ev = run.cfg.evaluation
        plot_eval_curve(run.log.path, run.run_dir / "eval_curve.png", run.evaluator.state.baseline, ev.max_zeroshot_drop)
    return record["alarm"] if stop else None


def finish(run: Run) -> None:
    """Final open_clip-format weights (student and teacher) and the loss-curve plot, from rank 0."""
    teacher = run.teacher.full_state_dict() if run.teacher is not None else None  # every rank takes part
    student = engine_state_dict(run.engine)  # ZeRO-3 holds no full weights anywhere: assembled by all ranks
    if D.rank() != 0:
        return
    final = run.run_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    torch.save(student, final / "student.pt")
    if teacher is not None:
        torch.save(open_clip_layout(teacher), final / "teacher.pt")
    plot_loss_curves({run.run_dir.name: run.log.path}, run.run_dir / "loss_curve.png")
    run.log.write({"event": "end", "step": run.step})
    run.log.close()
    notice(f"done: step {run.step}/{run.total_steps}; weights {final}/student.pt" + (" and teacher.pt" if teacher else "")
           + f", log {run.log.path}, loss curve {run.run_dir / 'loss_curve.png'}"
           + (f", eval curve {run.run_dir / 'eval_curve.png'}" if run.evaluator is not None else "")
           + (f", best weights {run.run_dir / 'best'}" if run.cfg.checkpoint.best_metric else ""))
