"""Typed run configuration: dataclasses (the schema), validation, and the YAML + override loader.

Hydra composes the schema, a YAML file and any `key=value` overrides strictly (an unknown key or a wrong
type is an error), then `OmegaConf.to_object` builds the dataclasses, whose `__post_init__` checks
values. A YAML file may start with `defaults: [degla_schema, _self_]` or leave it out (it is then
composed over the schema all the same). Every failure becomes one `ConfigError` line naming the key or
value and the fix; an unknown key, in the file or on the command line, names the closest valid one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the value and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    name: str = "degla-tiny"
    """open_clip architecture name (`open_clip.list_models()`), e.g. ViT-B-32, ViT-L-14, or degla-tiny."""
    pretrained: Optional[str] = None
    """open_clip pretrained tag (e.g. `openai`, `laion2b_s32b_b82k`) or a local checkpoint file; null = random init."""
    grad_checkpointing: bool = False
    """Recompute transformer activations in backward (open_clip's set_grad_checkpointing) to save memory."""
    compile: bool = False
    """Regional torch.compile: every transformer block of both towers, in the student and the teacher, is
    compiled in place (same parameter names; blocks of one shape share a graph). ZeRO-0/1/2 only."""

    def __post_init__(self):
        _check(bool(self.name), "model.name is empty: set an open_clip model name, e.g. model.name=ViT-B-32")


@dataclass
class SourceConfig:
    path: str = ""
    """Shards of this source, as in data.train_shards (in the configured data.format)."""
    weight: float = 1.0
    """Relative share of this source in every epoch's samples."""
    remote: Optional[str] = None
    """MDS only: where the shards live (s3://, gs://, hf://, … or a mounted folder); streaming downloads
    them into `path`, a local cache. webdataset reads URLs in `path` directly."""

    def __post_init__(self):
        _check(bool(self.path), "data.sources: every source needs a path: {path: DIR, weight: W}")
        _check(self.weight > 0 and math.isfinite(self.weight), f"data.sources weight={self.weight} of {self.path} must be > 0")


@dataclass
class DataConfig:
    train_shards: str = "data/synthetic/finetune"
    """wds: a directory of .tar files, a brace pattern (`shard-{000000..000099}.tar`) or a glob;
    mds: a directory holding MDS shards and their index.json."""
    format: str = "wds"
    """Shard format: wds (webdataset tar shards) or mds (mosaicml-streaming); both hold the same samples."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several shard sources mixed by weight ([{path: DIR, weight: W}, ...]); empty: train_shards alone."""
    num_negatives: int = 4
    """K hard negatives per sample used by the loss; 0 = plain CLIP. At most the fewest negatives a sample
    in the shards holds (their manifest's min_negatives)."""
    negatives_pick: str = "first"
    """Which K of a sample's stored negatives a batch uses: first (the first K, as the official DeGLA loader
    does) or random (K drawn per sample and epoch from the seed; a resumed run draws the same)."""
    batch_size: Any = 32
    """Micro-batch of images per rank (each brings 1+K captions), or auto: the largest that
    degla_scale/memory_plan.py fits in the GPU's memory with 15% kept free, printed at start."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer (on top of the per-epoch shard shuffle)."""
    num_samples: Optional[int] = None
    """Samples in one epoch over all ranks; null = read from the shards' manifest.json."""
    max_rejected_fraction: float = 0.01
    """Stop the run (one line: the fraction, the reasons, an example shard) once more than this fraction of
    the samples read so far were rejected as damaged or invalid; 1 = never stop."""

    def source_list(self) -> list[SourceConfig]:
        return self.sources or [SourceConfig(self.train_shards, 1.0)]

    def __post_init__(self):
        _check(self.num_negatives >= 0, f"data.num_negatives={self.num_negatives} is negative: use 0 (plain CLIP) or K > 0")
        _check(self.format in ("wds", "mds"), f"data.format={self.format!r} must be wds or mds")
        _check(self.negatives_pick in ("first", "random"), f"data.negatives_pick={self.negatives_pick!r} must be first or random")
        self.sources = [SourceConfig(**s) if isinstance(s, dict) else s for s in self.sources]
        paths = [s.path for s in self.sources]
        _check(len(set(paths)) == len(paths), f"data.sources lists {paths}: give each path once (raise its weight instead)")
        _check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
               f"data.batch_size={self.batch_size!r} must be an integer >= 1 or auto")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0")
        _check(0 <= self.max_rejected_fraction <= 1,
               f"data.max_rejected_fraction={self.max_rejected_fraction} must be in [0, 1] (1 = never stop)")


@dataclass
class ObjectiveConfig:
    igc_weight: float = 0.1
    """Weight of image-grounded contrast (each image vs its own 1+K captions); 0 skips it."""
    tgc_weight: float = 0.1
    """Weight of text-grounded contrast (each positive vs its teacher embedding and own negatives); 0 skips it."""
    distill_weight: float = 0.005
    """Weight of the summed squared distance to the EMA teacher's embeddings; 0 skips it."""
    tgc_scale: float = 10.0
    """Fixed temperature τ of the text-grounded contrast."""
    backend: str = "auto"
    """Loss implementation: triton (fused kernels, no B×N logits), torch (eager), auto (triton on CUDA)."""
    deterministic: bool = False
    """Triton backend: launch each kernel with one fixed config instead of autotuning, so two runs (and every
    rank) sum in the same order and give bit-identical losses; may be slower. The eager path needs no switch."""
    tgc_grouping: str = "own"
    """TGC negatives: own (each sample's own K, docs/objective.md) or official (an ablation: row i with negatives
    k·b + i, as the official code's repeat(1, K) pairs them); official runs in eager PyTorch."""

    def __post_init__(self):
        for name in ("igc_weight", "tgc_weight", "distill_weight"):
            value = getattr(self, name)
            _check(value >= 0 and math.isfinite(value), f"objective.{name}={value} must be a finite number >= 0")
        _check(self.tgc_scale > 0, f"objective.tgc_scale={self.tgc_scale} must be > 0 (the paper uses 10)")
        _check(self.backend in ("auto", "torch", "triton"), f"objective.backend={self.backend!r} must be auto, torch or triton")
        _check(self.tgc_grouping in ("own", "official"), f"objective.tgc_grouping={self.tgc_grouping!r} must be own or official")
        _check(not (self.tgc_grouping == "official" and self.backend == "triton"),
               "objective.tgc_grouping=official has no Triton kernel: set objective.backend=torch (or auto)")

    @property
    def needs_teacher(self) -> bool:
        return self.tgc_weight != 0 or self.distill_weight != 0


@dataclass
class TeacherConfig:
    ema_alpha: float = 0.9996
    """EMA decay: θ_t ← α·θ_t + (1−α)·θ_s after every optimizer step."""
    refresh_every: int = 4
    """Write the fp32 EMA into the teacher's forward weights every this many steps (ZeRO-1/2: one all-gather
    of the bf16 weights, on a side stream; ZeRO-3: a local copy into its partitions; ZeRO-0 under bf16: a
    casting copy); the EMA itself is updated every step. The forward teacher then lags the EMA by at most
    refresh_every − 1 updates of (1 − α) = 0.04% each, against the EMA's 2500-step time constant; the default
    4 keeps an unhidden ViT-L all-gather (0.86 GB, ≈ 2 ms on 8 × H100 NVLink, against a ≈ 36 ms step at
    b=32 and 40% MFU) under 1.5% of the step. An estimate: benchmarks/gpu_check.py measures it."""

    offload: str = "none"
    """none, or cpu (ZeRO-1/2/3): the fp32 EMA shard lives in pinned host memory and is updated by a
    background thread while the GPU computes; only bf16 weights travel to the GPU at each refresh."""

    def __post_init__(self):
        _check(0.0 <= self.ema_alpha <= 1.0, f"teacher.ema_alpha={self.ema_alpha} must lie in [0, 1] (paper: 0.9996)")
        _check(self.refresh_every >= 1, f"teacher.refresh_every={self.refresh_every} must be >= 1")
        _check(self.offload in ("none", "cpu"), f"teacher.offload={self.offload!r} must be none or cpu")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not gains, biases, embeddings' scale)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW (β1, β2)."""
    eps: float = 1e-6
    """AdamW ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9,0.98]")
        _check(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables)")


@dataclass
class ScheduleConfig:
    epochs: int = 5
    """Passes over the data."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when set)."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    def __post_init__(self):
        _check(self.epochs >= 1, f"schedule.epochs={self.epochs} must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, f"schedule.max_steps={self.max_steps} must be >= 1 or null")
        _check(self.warmup_steps >= 0, f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.grad_accum >= 1, f"schedule.grad_accum={self.grad_accum} must be >= 1")


@dataclass
class ZeroConfig:
    stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16 (on CUDA or CPU) or fp32."""
    offload_optimizer: str = "none"
    """none, or cpu: fp32 master weights and Adam moments in (pinned) CPU memory, stepped by DeepSpeedCPUAdam (stage >= 1)."""
    offload_params: str = "none"
    """none, or cpu: stage-3 parameter partitions in CPU memory, fetched for each layer's use."""
    grad_accum_dtype: str = "auto"
    """auto (DeepSpeed's default: gradients accumulate in the training precision), or fp32 (stage >= 1): accumulate
    them in fp32; under bf16 at ZeRO-1 without optimizer offload this selects DeepSpeed's BF16_Optimizer."""

    def __post_init__(self):
        _check(self.stage in (0, 1, 2, 3), f"zero.stage={self.stage} must be 0, 1, 2 or 3")
        _check(self.precision in ("auto", "bf16", "fp32"), f"zero.precision={self.precision!r} must be auto, bf16 or fp32")
        _check(self.grad_accum_dtype in ("auto", "fp32"), f"zero.grad_accum_dtype={self.grad_accum_dtype!r} must be auto or fp32")
        # DeepSpeed has no ZeRO-0 optimizer for bf16 weights with fp32 gradients (and fp32 needs no setting)
        _check(self.grad_accum_dtype == "auto" or self.stage >= 1,
               f"zero.grad_accum_dtype={self.grad_accum_dtype} needs zero.stage >= 1, got stage {self.stage}")
        for name in ("offload_optimizer", "offload_params"):
            _check(getattr(self, name) in ("none", "cpu"), f"zero.{name}={getattr(self, name)!r} must be none or cpu")
        _check(self.offload_optimizer == "none" or self.stage >= 1,
               "zero.offload_optimizer=cpu needs zero.stage >= 1 (ZeRO-0 keeps the optimizer on the device)")
        _check(self.offload_params == "none" or self.stage == 3,
               f"zero.offload_params=cpu needs zero.stage=3, got stage {self.stage}")


@dataclass
class LoggingConfig:
    every: int = 10
    """Write a JSONL/TensorBoard record every this many optimizer steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    sample_ids: bool = False
    """Record the ids of the samples of every step in the JSONL (for resume checks)."""
    telemetry: bool = True
    """Add rank 0's GPU readings (NVML memory, utilisation, power, clocks; torch peak memory) to each record."""
    wandb: bool = False
    """Also send every record to Weights & Biases (`pip install '.[wandb]'`; WANDB_MODE=offline works offline)."""
    wandb_project: str = "degla-scale"
    """The W&B project."""
    wandb_name: Optional[str] = None
    """The W&B run name; null = the run directory's name."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags of the run."""

    def __post_init__(self):
        _check(self.every >= 1, f"logging.every={self.every} must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save a DeepSpeed checkpoint every this many optimizer steps (and at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept on disk; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """auto = continue from the latest checkpoint in the run directory if there is one; none = start fresh."""
    best_metric: Optional[str] = None
    """An evaluation metric as logged (e.g. eval/sugarcrepe/average, eval_teacher/zeroshot/acc1): the weights of
    the evaluation that scored best on it are kept in <run_dir>/best/ (needs evaluation.every > 0)."""
    best_mode: str = "max"
    """max = a higher best_metric is better; min = lower is better."""

    def __post_init__(self):
        _check(self.every >= 1, f"checkpoint.every={self.every} must be >= 1")
        _check(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1")
        _check(self.resume in ("auto", "none"), f"checkpoint.resume={self.resume!r} must be auto or none")
        _check(self.best_mode in ("max", "min"), f"checkpoint.best_mode={self.best_mode!r} must be max or min")
        _check(self.best_metric is None or self.best_metric.startswith(("eval/", "eval_teacher/")),
               f"checkpoint.best_metric={self.best_metric!r} must be an evaluation metric as logged, "
               "eval/<suite>/<metric> or eval_teacher/<suite>/<metric> (e.g. eval/sugarcrepe/average)")


@dataclass
class ReliabilityConfig:
    nonfinite: str = "stop"
    """A non-finite loss term or gradient: stop = end the run without writing that checkpoint (resume: auto
    continues from the last good one); skip = drop that step's update on every rank and go on."""
    max_skipped: int = 10
    """nonfinite=skip: stop after this many skipped steps in a row."""

    def __post_init__(self):
        _check(self.nonfinite in ("stop", "skip"), f"reliability.nonfinite={self.nonfinite!r} must be stop or skip")
        _check(self.max_skipped >= 1, f"reliability.max_skipped={self.max_skipped} must be >= 1")


EVAL_SUITES = ("sugarcrepe", "aro", "valse", "zeroshot", "retrieval")  # degla_scale.eval runs them


@dataclass
class SugarCrepeEvalConfig:
    root: Optional[str] = None
    """Folder of the subset JSONs (the release's data/); null = <data_root>/sugarcrepe."""
    image_root: Optional[str] = None
    """COCO val2017 image folder (main_eval.py's --coco_image_root); null = <root>/images."""
    subsets: list[str] = field(default_factory=lambda: [
        "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att"])
    """SugarCrepe-format files to evaluate (file stems); the default is the 7 released subsets."""


@dataclass
class AroEvalConfig:
    root: Optional[str] = None
    """Folder of visual_genome_relation.json, visual_genome_attribution.json and images/ (ARO_ROOT);
    null = <data_root>/aro."""
    coco_root: Optional[str] = None
    """COCO-Order: the folder holding coco_karpathy_test.json and val2014/ (ARO's COCO_ROOT); null = <root>/coco."""
    flickr30k_root: Optional[str] = None
    """Flickr30k-Order: the folder holding flickr30k_test.json and flickr30k-images/ (FLICKR_ROOT);
    null = <root>/flickr30k."""
    subsets: list[str] = field(default_factory=lambda: ["vg_relation", "vg_attribution", "coco_order", "flickr30k_order"])
    """ARO subsets to evaluate; the order ones need `pip install .[aro]` (spaCy and NLTK)."""
    seed: int = 1
    """Seed of the order perturbations, as main_aro.py's --seed (default 1) seeds numpy's and Python's generators."""


@dataclass
class ValseEvalConfig:
    root: Optional[str] = None
    """Folder holding data/<piece>.json as released; null = <data_root>/valse."""
    image_dirs: dict[str, str] = field(default_factory=dict)
    """Image folder per source dataset, for any of visual7w, coco_val2017, swig, coco_train2014, coco_val2014,
    visdial_val2018; unset ones default to <root>/images/... (degla_scale/eval/valse.py)."""
    pieces: list[str] = field(default_factory=lambda: [
        "existence", "plurals", "counting-hard", "counting-small-quant", "counting-adversarial", "relations",
        "action-replacement", "actant-swap", "coreference-standard", "coreference-hard", "foil-it"])
    """VALSE pieces (file stems under <root>/data/)."""


@dataclass
class ZeroShotEvalConfig:
    root: Optional[str] = None
    """ImageFolder dataset folder, or a folder of them; null = <data_root>/zeroshot."""
    datasets: Optional[list[str]] = None
    """Dataset folders under root; null = root itself if it is one dataset, else every sub-folder."""
    templates_file: Optional[str] = None
    """JSON {dataset: [template with {c}], ...} replacing the packaged templates (CLIP_benchmark's
    --custom_template_file format; a dataset it lacks takes its "imagenet1k" entry)."""
    classnames_file: Optional[str] = None
    """JSON {dataset: [class name, ...]} replacing the packaged class names (CLIP_benchmark's
    --custom_classname_file format)."""


@dataclass
class RetrievalEvalConfig:
    root: Optional[str] = None
    """Folder of the annotation files (BLIP's ann_root: coco_karpathy_test.json, flickr30k_test.json), each
    also looked for in <root>/<dataset>/; null = <data_root>/retrieval."""
    coco_image_root: Optional[str] = None
    """Folder the COCO file's "image" paths (val2014/...) start from (BLIP's image_root); null = the json's folder."""
    flickr30k_image_root: Optional[str] = None
    """Folder the Flickr30k file's "image" paths (flickr30k-images/...) start from; null = the json's folder."""
    datasets: list[str] = field(default_factory=lambda: ["coco", "flickr30k"])
    """Retrieval test splits to evaluate: coco, flickr30k."""
    max_words: int = 30
    """Captions are cut to this many words by BLIP's pre_caption (its retrieval configs use 30)."""


@dataclass
class EvalConfig:
    data_root: str = "data/synthetic"
    """Folder holding one sub-folder per suite (sugarcrepe/, aro/, valse/, zeroshot/, retrieval/) in the
    benchmark's released layout, for every suite whose own root is null (README: Evaluation)."""
    suites: list[str] = field(default_factory=lambda: ["sugarcrepe", "zeroshot"])
    """Suites to run: any of sugarcrepe, aro, valse, zeroshot, retrieval."""
    batch_size: int = 256
    """Images or texts per evaluation batch (per rank, during training)."""
    every: int = 0
    """During training: run the suites every this many optimizer steps, before training and at the end
    (0 = never; launch/eval.py ignores it)."""
    teacher: bool = False
    """During training: evaluate the EMA teacher as well (logged as eval_teacher/...)."""
    max_zeroshot_drop: Optional[float] = None
    """During training: warn (one line) when the student's zero-shot acc1 falls more than this many points
    below the first evaluation's; null = no alarm."""
    stop_on_drop: bool = False
    """With max_zeroshot_drop: end the run at that evaluation, with a checkpoint (exit code 3)."""
    sugarcrepe: SugarCrepeEvalConfig = field(default_factory=SugarCrepeEvalConfig)
    aro: AroEvalConfig = field(default_factory=AroEvalConfig)
    valse: ValseEvalConfig = field(default_factory=ValseEvalConfig)
    zeroshot: ZeroShotEvalConfig = field(default_factory=ZeroShotEvalConfig)
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)

    def __post_init__(self):
        _check(self.batch_size >= 1, f"evaluation.batch_size={self.batch_size} must be >= 1")
        _check(self.every >= 0, f"evaluation.every={self.every} must be >= 0 (0 = no evaluation during training)")
        _check(self.max_zeroshot_drop is None or "zeroshot" in self.suites,
               f"evaluation.max_zeroshot_drop={self.max_zeroshot_drop} watches zero-shot accuracy, but "
               f"evaluation.suites={self.suites} lacks zeroshot: add it, or set max_zeroshot_drop=null")
        _check(not self.stop_on_drop or self.max_zeroshot_drop is not None,
               "evaluation.stop_on_drop=true needs evaluation.max_zeroshot_drop (points below the first evaluation)")
        unknown = [s for s in self.suites if s not in EVAL_SUITES]
        _check(bool(self.suites) and not unknown,
               f"evaluation.suites={self.suites} names unknown suites {unknown}: choose from {list(EVAL_SUITES)}")

    def root(self, suite: str) -> str:
        """The folder a suite reads: its own `root`, else <data_root>/<suite>."""
        return getattr(self, suite).root or f"{self.data_root}/{suite}"


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Directory for logs, checkpoints and the final model."""
    seed: int = 0
    """Seed for model init and data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        grouped = self.objective.igc_weight or self.objective.tgc_weight
        _check(self.data.num_negatives > 0 or not grouped,
               "objective.igc_weight/tgc_weight > 0 need hard negatives but data.num_negatives=0: "
               "set data.num_negatives=K or both weights to 0 for plain CLIP")
        _check(self.teacher.offload == "none" or self.zero.stage >= 1,
               "teacher.offload=cpu shards the EMA like the ZeRO master weights and needs zero.stage >= 1, got 0")
        _check(self.checkpoint.best_metric is None or self.evaluation.every > 0,
               f"checkpoint.best_metric={self.checkpoint.best_metric!r} needs evaluation during training: set "
               "evaluation.every to a number of steps")
        _check(not (self.checkpoint.best_metric or "").startswith("eval_teacher/") or self.evaluation.teacher,
               f"checkpoint.best_metric={self.checkpoint.best_metric!r} is the teacher's: set evaluation.teacher=true")
        _check(not (self.model.compile and self.zero.stage == 3),
               "model.compile=true with zero.stage=3: DeepSpeed's ZeRO-3 gathers each parameter in module hooks, "
               "which compiled blocks do not run; use zero.stage <= 2 or model.compile=false")


SCHEMA_NAME = "degla_schema"


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def _one_line(exc: Exception) -> str:
    """Reduce a Hydra/OmegaConf exception to `key: problem`."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from degla_scale.config_reference import unknown_key_message

    inner = exc
    while not isinstance(inner, (OmegaConfBaseException, ConfigError)) and (inner.__cause__ or inner.__context__):
        inner = inner.__cause__ or inner.__context__
    if isinstance(inner, ConfigError):
        return str(inner)
    if isinstance(inner, OmegaConfBaseException):
        key = getattr(inner, "full_key", None) or "?"
        msg = str(getattr(inner, "msg", inner)).splitlines()[0]
        if isinstance(inner, (ConfigKeyError, ConfigAttributeError)):
            return unknown_key_message(key)
        return f"bad value for config key '{key}': {msg}"
    return str(exc).splitlines()[0]


def _check_override_keys(overrides: list[str]) -> None:
    """Unknown keys on the command line get the same line as in a file (Hydra would call them bad values)."""
    from degla_scale.config_reference import is_key, names, unknown_key_message

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value: write e.g. optim.lr=1e-5")
        key = item.split("=", 1)[0].lstrip("+~")
        inside_a_list = any(key.startswith(k + ".") for k in names())  # e.g. data.sources.0.path
        if not (is_key(key) or inside_a_list):
            raise ConfigError(unknown_key_message(key))
        if item.startswith(("+", "~")):
            raise ConfigError(f"override {item!r}: keys are fixed by the schema, so write {item.lstrip('+~')} "
                              "without +/~ (a key cannot be added or deleted)")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Compose schema + YAML file + `key=value` overrides into a validated `Config`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"config file {str(path)!r} is not a .yaml file: pass e.g. --config configs/tiny.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found: pass an existing file, e.g. --config configs/tiny.yaml")
    overrides = list(overrides or [])
    _check_override_keys(overrides)
    try:
        content = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({str(exc).splitlines()[0]}): fix its syntax") from None
    if not isinstance(content, dict) and not OmegaConf.is_dict(content):
        raise ConfigError(f"config file {str(path)!r} holds a list, not a mapping of keys: write e.g. `optim: {{lr: 1e-5}}`")
    _register_schema()
    name = path.stem
    if "defaults" not in content:  # compose the file over the schema as if it had the header
        name = f"_headerless_{path.stem}"
        ConfigStore.instance().store(name=name, node={"defaults": [SCHEMA_NAME, "_self_"],
                                                      **OmegaConf.to_container(content)})
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.resolve().parent), version_base=None):
            composed = compose(config_name=name, overrides=overrides)
        cfg = OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra and OmegaConf raise many types; all become one line
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    if not isinstance(cfg, Config):
        raise ConfigError(f"config file {str(path)!r} has a defaults list without {SCHEMA_NAME}: start it with "
                          f"`defaults: [{SCHEMA_NAME}, _self_]` or leave the defaults list out")
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what --print-config shows)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Config) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
