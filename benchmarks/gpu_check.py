"""One prepared GPU check: kernel tests, kernel and training-step benchmarks, and a kernels-vs-torch training run,
in one device call of at most 8 minutes, ending with a table of the project's targets.

    python benchmarks/gpu_check.py              # GPU; results in --out (default $OUT, else runs/gpu_check)
    python benchmarks/gpu_check.py --tiny       # CPU smoke run of every part (2–3 minutes on 2 cores)
    make gpu-check                              # (ARGS=--tiny for the smoke run)

On the lent GPU machine (../shared/device/README.md), with carry [".whl"], as one call:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; python3 benchmarks/gpu_check.py

It only orchestrates: each part is one of the project's scripts in a subprocess with a time cap, and a part
that fails or runs out of time is reported as such while the rest still run. Then it reads their CSV and
JSONL output and judges each target.

1. Correctness. Nothing is timed, so these parts share the GPU: `pytest -m gpu tests/kernels` (the kernels
   at training size against float64, first call after autotuning included), and 30 steps of DeGLA
   training of ViT-B/32 from random weights on synthetic shards, once with the Triton kernels and once
   with the torch path.
2. Timing, one part at a time: bench_clip_loss.py (B=4096, K ∈ {0, 4}, D=768, and the data-parallel shape
   b=256 × C=81920), bench_grounded_loss.py (b ∈ {4096, 16384}, K=4, D=768), then bench_train_step.py
   (random weights, bf16, ZeRO-1 with the teacher; samples/s, MFU, phases, peak memory against the
   planner's) for ViT-L/14 eager, ViT-B/32 with the kernels on and off, and ViT-L/14 compiled; then
   more variants if time is left.

--out receives 8 files: clip_loss.{csv,png}, grounded_loss.{csv,png}, train_step.{csv,png} (one row per
variant), curves.png (both loss curves and their difference), and summary.json (the table, each part's
status, seconds and output tail, the curves). Exit status: 0 when nothing failed, 1 when a target failed
or a part did not finish, 2 for a bad argument.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.common, for the clip_loss plot
PY = sys.executable

# ---------------------------------------------------------------- budget
# The device call may run 8 minutes (480 s). Installing the wheels and starting Python take about 20 s, so
# the parts get TOTAL_S, and on the GPU their caps add up to it exactly (tests/benchmarks/test_gpu_check.py
# checks this): even if every part hangs until its cap, the call ends in time. Stopping a part past its
# cap takes up to 8 s; every part's limit is also cut to the deadline, so that time comes out of the next
# part's cap instead of adding up. The caps are estimates, each the part's expected time plus a margin.
# Most of a part's time is start-up (Python, torch and DeepSpeed imports, about 10 s a process), Triton's
# first compiles (the cache is shared, so the first process pays for the rest) and torch.compile (about
# 15 s a graph). summary.json records each part's seconds: the first GPU run is the place to tune them.
TOTAL_S = 450
SHARDS_S = 10  # launch/make_shards.py: 1024 synthetic samples, ~2 s
CORRECTNESS_S = 95  # side by side: gpu tests (~40 s) and two ViT-B/32 trainings (~60 s each: start, 30 steps, checkpoint)
# bench_clip_loss runs twice into one CSV: K=4 with the data-parallel shape, then K=0 alone, which also
# times Inf-CL; a third-party package that breaks on this torch/triton then costs only the K=0 rows.
CLIP_BENCH_S = 60  # 2 shapes × (torch.compile of the eager loss ~15 s + 3 implementations × 22 reps)
CLIP_K0_BENCH_S = 35  # 1 shape, 5 implementations (open_clip and Inf-CL too)
GROUNDED_BENCH_S = 40  # 2 shapes × torch.compile ~10 s; the kernel itself takes milliseconds
# bench_train_step variants: (label, config, overrides, cap seconds, warm-up steps, timed steps). The ViT
# configs keep their batch of 32 with K=4; vitb32.yaml is ZeRO-0, so it gets ZeRO-1 like ViT-L. Few steps:
# a step takes about 0.1 s, while building ViT-L with DeepSpeed and its teacher takes ~20 s. Most
# important first: a part the deadline squeezes is the last one.
STEP_VARIANTS = [
    ("ViT-L/14 eager", "configs/vitl14.yaml", ["objective.backend=triton"], 65, 2, 5),
    ("ViT-B/32 triton", "configs/vitb32.yaml", ["zero.stage=1", "objective.backend=triton"], 30, 3, 10),
    ("ViT-B/32 torch", "configs/vitb32.yaml", ["zero.stage=1", "objective.backend=torch"], 30, 3, 10),
    ("ViT-L/14 compiled", "configs/vitl14.yaml", ["objective.backend=triton", "model.compile=true"], 85, 3, 5),
]
# Run after everything else, each only if its cap still fits before the deadline (GPU only).
EXTRA_VARIANTS = [
    ("ViT-L/14 teacher offload", "configs/vitl14.yaml", ["objective.backend=triton", "teacher.offload=cpu"], 65, 2, 5),
    ("ViT-B/32 compiled", "configs/vitb32.yaml", ["zero.stage=1", "objective.backend=triton", "model.compile=true"], 60, 3, 10),
]
MIN_PART_S = 10  # a part is not started with less time than this left

# --tiny on a 2-core CPU: every part runs one after another (concurrency would only oversubscribe the
# cores). The degla-tiny config stands in for every model, at b=8 so the kernels under Triton's
# interpreter take a few seconds a step, plus the kernel benchmarks' own --tiny shapes. The caps only
# guard CI against a hang.
TINY_TOTAL_S = 900
TINY_CAP_S = 240
TINY_STEPS = (1, 2)  # warm-up, timed
TINY_OVERRIDES = ["data.batch_size=8"]

# The training runs: a learning rate at which 30 steps move a randomly initialised model, so a wrong
# gradient would bend one curve away from the other (at the configs' 1e-6 the curves hardly move in 30
# steps and would agree even then).
TRAIN = {"gpu": dict(config="configs/vitb32.yaml", steps=30, batch=32, K=4, workers=4, warmup=5),
         "tiny": dict(config="configs/tiny.yaml", steps=4, batch=8, K=2, workers=0, warmup=1)}
TRAIN_LR = 1e-4
# bf16 tolerance for two loss curves, step by step: torch.testing.assert_close's default for bfloat16.
CURVE_RTOL, CURVE_ATOL = 1.6e-2, 1e-5

# Target shapes (B or b, K or C, D); the tiny run checks the same rows at the benchmarks' --tiny shapes.
SHAPES = {"gpu": dict(clip=(4096, 4, 768), dp=(256, 81920, 768), infcl=(4096, 0, 768), grounded=(16384, 4, 768)),
          "tiny": dict(clip=(32, 2, 32), dp=(16, 160, 32), infcl=(32, 0, 32), grounded=(32, 2, 32))}
CLIP_SWEEP = ["--B", "4096", "--K", "4", "--D", "768", "--dp", "256:81920"]
CLIP_K0_SWEEP = ["--B", "4096", "--K", "0", "--D", "768", "--dp"]  # --dp with no shape: none
GROUNDED_SWEEP = ["--B", "4096", "16384", "--K", "4", "--D", "768"]

KERNEL_FILES = ("clip_loss.csv", "clip_loss.png", "grounded_loss.csv", "grounded_loss.png")  # written by the benchmarks
FILES = (*KERNEL_FILES, "train_step.csv", "train_step.png", "curves.png", "summary.json")
PHASES = ("data", "teacher_fwd", "student_fwd", "backward", "optimizer", "ema")


# ---------------------------------------------------------------- running the parts


@dataclass
class Part:
    name: str
    argv: list[str]
    cap_s: float
    env: dict = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    cap_s: float
    rc: int | None = None
    tail: str = ""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def child_env(tiny: bool, extra: dict) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}  # unbuffered: a killed part's log shows where it was
    if tiny:  # the CPU smoke run stays on the CPU even where there is a GPU
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")  # must be set before Python starts
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def log_tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def stop(proc: subprocess.Popen) -> None:
    """End a part and everything it started (its own session: data workers, compile workers)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_parts(parts: list[Part], deadline: float, logs: Path, tiny: bool) -> list[Outcome]:
    """Start `parts` together and wait for each until its cap or the deadline, whichever comes first."""
    started, outcomes = [], {}
    for part in parts:
        limit = min(part.cap_s, deadline - time.monotonic())
        if limit < MIN_PART_S:
            outcomes[part.name] = Outcome(part.name, "skipped", 0.0, part.cap_s, tail=f"{limit:.0f} s left")
            continue
        log = logs / f"{slug(part.name)}.log"
        with log.open("w") as f:
            proc = subprocess.Popen(part.argv, cwd=ROOT, env=child_env(tiny, part.env), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        started.append((part, proc, time.monotonic(), limit, log))
    try:
        for part, proc, t0, limit, log in started:
            try:
                rc, status = proc.wait(max(0.0, t0 + limit - time.monotonic())), None
            except subprocess.TimeoutExpired:
                stop(proc)
                rc, status = None, "timeout"
            status = status or ("ok" if rc == 0 else "failed")
            outcomes[part.name] = Outcome(part.name, status, round(time.monotonic() - t0, 1), part.cap_s, rc,
                                          log_tail(log))
    except BaseException:  # interrupted (Ctrl-C, or SIGTERM from a caller's timeout): leave nothing running
        for _, proc, *_ in started:
            stop(proc)
        raise
    done = [outcomes[p.name] for p in parts]
    for o in done:
        report_part(o)
    return done


def report_part(o: Outcome) -> None:
    line = f"  {o.name}: {o.status} in {o.seconds:.0f} s (cap {o.cap_s:.0f} s)"
    if o.status in ("failed", "timeout", "skipped"):
        last = [ln for ln in o.tail.splitlines() if ln.strip()]
        line += f": {last[-1][:200]}" if last else ""
    print(line, flush=True)


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together, so two concurrent runs cannot get the same one)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ---------------------------------------------------------------- the plan


def gpu_tests_part(work: Path, tiny: bool) -> Part:
    return Part("gpu tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider",
                              f"--junitxml={work / 'gpu_tests.xml'}"], TINY_CAP_S if tiny else CORRECTNESS_S)


def train_parts(work: Path, tiny: bool) -> list[Part]:
    """The same DeGLA run twice, with the Triton kernels and with the torch path (launch/train.py, one process)."""
    t = TRAIN["tiny" if tiny else "gpu"]
    parts = []
    for backend, port in zip(("triton", "torch"), free_ports(2)):
        overrides = [f"run_dir={work / f'train_{backend}'}", "model.pretrained=null",
                     f"data.train_shards={work / 'shards' / 'finetune'}", f"data.batch_size={t['batch']}",
                     f"data.num_negatives={t['K']}", f"data.num_workers={t['workers']}",
                     f"schedule.max_steps={t['steps']}", f"schedule.warmup_steps={t['warmup']}", f"optim.lr={TRAIN_LR}",
                     "zero.stage=1", f"objective.backend={backend}", "logging.every=1", "logging.progress=false",
                     "logging.tensorboard=false"]
        parts.append(Part(f"train {backend}", [PY, "launch/train.py", "--config", t["config"], *overrides],
                          TINY_CAP_S if tiny else CORRECTNESS_S, {"MASTER_PORT": str(port)}))
    return parts


def shards_part(work: Path, tiny: bool) -> Part:
    """Synthetic fine-tuning shards for the training runs (work/shards/finetune): one epoch holds all their steps."""
    t = TRAIN["tiny" if tiny else "gpu"]
    return Part("shards", [PY, "launch/make_shards.py", "--from", "synthetic", "--out", str(work / "shards"),
                           "--finetune-samples", str((t["steps"] + 2) * t["batch"]), "--num-negatives", str(t["K"]),
                           "--pretrain-samples", "0", "--eval-per-type", "0", "--zeroshot-per-class", "0",
                           "--shard-size", "8" if tiny else "128", "--workers", "1" if tiny else "8"],
                TINY_CAP_S if tiny else SHARDS_S)


def kernel_bench_parts(out: Path, tiny: bool) -> list[Part]:
    """--tiny fixes its own K ∈ {0, 2} (and data-parallel shape), so the tiny run needs one clip_loss part."""
    runs = [("clip_loss", "bench clip_loss", ["--tiny"] if tiny else CLIP_SWEEP, CLIP_BENCH_S),
            *([] if tiny else [("clip_loss", "bench clip_loss K=0", CLIP_K0_SWEEP, CLIP_K0_BENCH_S)]),
            ("grounded_loss", "bench grounded_loss", ["--tiny"] if tiny else GROUNDED_SWEEP, GROUNDED_BENCH_S)]
    return [Part(part, [PY, f"benchmarks/bench_{name}.py", *sweep, "--out", str(out), "--name", name],
                 TINY_CAP_S if tiny else cap) for name, part, sweep, cap in runs]


def step_part(variant, work: Path, tiny: bool) -> Part:
    label, config, overrides, cap, warmup, steps = variant
    if tiny:
        config, overrides, (warmup, steps), cap = "configs/tiny.yaml", overrides + TINY_OVERRIDES, TINY_STEPS, TINY_CAP_S
    return Part(f"step {label}", [PY, "benchmarks/bench_train_step.py", "--config", config, "--warmup", str(warmup),
                                  "--steps", str(steps), "--out", str(work / "steps"), "--name", slug(label),
                                  "model.pretrained=null", *overrides], cap)


def plan_groups(out: Path, work: Path, tiny: bool) -> list[list[Part]]:
    """The parts in the order they run; the parts of one group run side by side. On the GPU the correctness
    parts share the device (nothing in them is timed); the 2-core CPU and every timing run one at a time."""
    correctness = [gpu_tests_part(work, tiny), *train_parts(work, tiny)]
    timed = [*kernel_bench_parts(out, tiny), *(step_part(v, work, tiny) for v in STEP_VARIANTS)]
    return [[shards_part(work, tiny)], *([[p] for p in correctness] if tiny else [correctness]), *([p] for p in timed)]


def worst_case_s(groups: list[list[Part]]) -> float:
    """Seconds if every part ran to its cap."""
    return sum(max(p.cap_s for p in group) for group in groups)


# ---------------------------------------------------------------- reading the results


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def pick(rows: list[dict], **match) -> dict | None:
    """The last row whose columns equal `match` (compared as text, as the CSV holds them)."""
    hits = [r for r in rows if all(str(r.get(k)) == str(v) for k, v in match.items())]
    return hits[-1] if hits else None


def step_rows(work: Path, variants: list, outcomes: dict[str, Outcome]) -> list[dict]:
    """One bench_train_step row per variant that ran, with its label first."""
    rows = []
    for variant in variants:
        name = f"step {variant[0]}"
        if name in outcomes:
            for row in read_csv(work / "steps" / f"{slug(variant[0])}.csv"):
                rows.append({"variant": variant[0], **row})
    return rows


def loss_curve(run_dir: Path) -> list[float]:
    path = run_dir / "train.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss.total"] for r in records if "loss.total" in r]


# ---------------------------------------------------------------- judging the targets


@dataclass
class Check:
    name: str
    measured: str
    target: str
    status: str  # pass | fail | n/a | timeout | error


class Judge:
    """Turns a measured value into a row of the table: a missing value says why (its part timed out or
    failed, or the device cannot measure it); in --tiny mode the performance targets are n/a, since toy
    shapes on a CPU say nothing about them, while the correctness targets are judged."""

    def __init__(self, tiny: bool, outcomes: dict[str, Outcome]):
        self.tiny, self.outcomes = tiny, outcomes

    def __call__(self, name: str, target: str, part: str, value: float | None, ok, unit: str = "", shown: str = "",
                 missing: str = "not measured", perf: bool = True) -> Check:
        outcome = self.outcomes.get(part)
        if value is None:
            if outcome is None or outcome.status == "skipped":
                return Check(name, f"{part}: not run", target, "n/a")
            if outcome.status in ("timeout", "failed"):
                return Check(name, f"{part} {outcome.status} ({outcome.seconds:.0f} s)", target,
                             "timeout" if outcome.status == "timeout" else "error")
            return Check(name, missing, target, "n/a")
        shown = shown or f"{value:.4g}{unit}"
        if perf and self.tiny:
            return Check(name, f"{shown} (tiny)", target, "n/a")
        return Check(name, shown, target, "pass" if ok(value) else "fail")


def gpu_tests_check(judge: Judge, work: Path) -> Check:
    xml = work / "gpu_tests.xml"
    if not xml.exists():
        return judge("gpu-marked kernel tests (training size vs float64)", "all pass", "gpu tests", None, None)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, failed, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "skipped"))
    failed += int(suite.get("errors", 0))
    passed = n - failed - skipped
    shown = f"{passed} passed, {failed} failed, {skipped} skipped"
    if passed == 0 and failed == 0:
        return Check("gpu-marked kernel tests (training size vs float64)", shown + " (no CUDA)", "all pass", "n/a")
    return Check("gpu-marked kernel tests (training size vs float64)", shown, "all pass", "pass" if failed == 0 else "fail")


def kernel_checks(judge: Judge, out: Path, shapes: dict) -> list[Check]:
    clip, grounded = read_csv(out / "clip_loss.csv"), read_csv(out / "grounded_loss.csv")
    B, K, Dm = shapes["clip"]
    fused = pick(clip, impl="fused", shape="global", B=B, K=K, D=Dm) or {}
    eager = pick(clip, impl="eager", shape="global", B=B, K=K, D=Dm) or {}
    b, C, Dd = shapes["dp"]
    dp = pick(clip, impl="fused", shape="data-parallel", B=b, C=C, D=Dd) or {}
    Bi, Ki, Di = shapes["infcl"]
    fused0 = pick(clip, impl="fused", shape="global", B=Bi, K=Ki, D=Di) or {}
    infcl = pick(clip, impl="inf_cl", shape="global", B=Bi, K=Ki, D=Di) or {}
    bg, Kg, Dg = shapes["grounded"]
    gr = pick(grounded, impl="fused", B=bg, K=Kg, D=Dg) or {}

    def ratio(a, b):
        a, b = number(a), number(b)
        return a / b if a is not None and b else None
    work_pct = ratio(fused.get("working_mem_mib"), eager.get("working_mem_mib"))
    speedup = ratio(infcl.get("both_p50_ms"), fused0.get("both_p50_ms"))
    part, part_k0 = "bench clip_loss", "bench clip_loss" if judge.tiny else "bench clip_loss K=0"
    return [
        judge(f"fused loss B={B} K={K} D={Dm}: % of bf16 peak", "≥ 50%", part, number(fused.get("pct_bf16_peak")),
              lambda v: v >= 50, "%", missing="no bf16 peak known for this device"),
        judge(f"fused loss data-parallel b={b} C={C} D={Dd}: % of bf16 peak", "≥ 40%", part,
              number(dp.get("pct_bf16_peak")), lambda v: v >= 40, "%", missing="no bf16 peak known for this device"),
        judge(f"fused loss working memory / eager's (B={B} K={K} D={Dm})", "≤ 2%", part,
              None if work_pct is None else 100 * work_pct, lambda v: v <= 2, "%", missing="no CUDA memory stats"),
        judge(f"fused vs Inf-CL speed, K=0 (B={Bi} D={Di})", "≥ 2×", part_k0, speedup, lambda v: v >= 2, "×",
              missing="inf_cl not importable" if fused0 else "no rows"),
        judge(f"grounded kernel b={bg} K={Kg} D={Dg}: % of copy bandwidth", "≥ 70%", "bench grounded_loss",
              number(gr.get("pct_copy_bw")), lambda v: v >= 70, "%"),
    ]


def step_checks(judge: Judge, rows: list[dict], variants: list) -> list[Check]:
    checks = []
    by_label = {r["variant"]: r for r in rows}
    for label, *_ in variants:
        row, part = by_label.get(label, {}), f"step {label}"
        if label.startswith("ViT-L"):  # the targets are stated for ViT-L/14
            step, ema = number(row.get("step_p50_ms")), number(row.get("ema_mean_ms"))  # mean: refreshes are periodic
            checks.append(judge(f"{label} step: MFU", "≥ 40%", part, number(row.get("mfu_pct")), lambda v: v >= 40,
                                "%", missing="no bf16 peak known for this device"))
            checks.append(judge(f"{label}: EMA + refresh (+ offload) / step", "≤ 5%", part,
                                100 * ema / step if step and ema is not None else None, lambda v: v <= 5, "%"))
        measured, planned = number(row.get("max_allocated_mib")), number(row.get("planned_peak_mib"))
        error = 100 * (planned / measured - 1) if measured and planned else None
        checks.append(judge(f"{label}: planned vs measured peak memory", "within 25%", part, error,
                            lambda v: abs(v) <= 25, shown=f"{planned:.0f} vs {measured:.0f} MiB ({error:+.0f}%)"
                            if error is not None else "", missing="no CUDA peak on this device"))
    return checks


def curve_check(judge: Judge, work: Path, steps: int) -> tuple[Check, dict]:
    triton, torch_ = loss_curve(work / "train_triton"), loss_curve(work / "train_torch")
    name = f"loss curves, kernels vs torch path ({steps} steps)"
    target = f"|Δ| ≤ {CURVE_ATOL:g} + {CURVE_RTOL:g}·|L| every step"
    curves = {"triton": triton, "torch": torch_, "rtol": CURVE_RTOL, "atol": CURVE_ATOL}
    for backend, curve in (("triton", triton), ("torch", torch_)):
        if len(curve) != steps:
            check = judge(name, target, f"train {backend}", None, None, missing=f"{backend} run logged {len(curve)} steps")
            return (check if check.status != "n/a" else Check(name, check.measured, target, "fail")), curves
    diffs = [abs(a - b) for a, b in zip(triton, torch_)]
    worst = max(d / (CURVE_ATOL + CURVE_RTOL * abs(b)) for d, b in zip(diffs, torch_))
    curves.update(max_abs_diff=max(diffs), worst_over_tolerance=worst)
    shown = f"max |Δ| {max(diffs):.2g} = {worst:.2f}× tol (loss {torch_[0]:.3f} → {torch_[-1]:.3f})"
    return judge(name, target, "train triton", worst, lambda v: v <= 1, shown=shown, perf=False), curves


# ---------------------------------------------------------------- output


def write_step_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_steps(rows: list[dict], path: Path) -> None:
    """Phases of the step per variant (stacked p50), and peak memory measured vs planned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["variant"].replace(" ", "\n", 1) for r in rows]
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(5 + 2.4 * len(rows), 4))
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        heights = [number(r.get(f"{phase}_p50_ms")) or 0.0 for r in rows]
        ax.bar(labels, heights, bottom=bottom, label=phase)
        bottom = [a + h for a, h in zip(bottom, heights)]
    ax.set_ylabel("ms per step (p50 of each phase)")
    ax.legend(fontsize=7, ncols=3)
    x = range(len(rows))
    mem.bar([i - 0.2 for i in x], [number(r.get("max_allocated_mib")) or 0 for r in rows], 0.4, label="measured")
    mem.bar([i + 0.2 for i in x], [number(r.get("planned_peak_mib")) or 0 for r in rows], 0.4, label="planned")
    mem.set_xticks(list(x), labels)
    mem.set_ylabel("peak memory, MiB")
    mem.legend(fontsize=7)
    device = rows[0].get("device", "")
    fig.suptitle(f"bench_train_step variants — {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, diff) = plt.subplots(1, 2, figsize=(10, 3.6))
    for backend in ("triton", "torch"):
        ax.plot(range(1, len(curves[backend]) + 1), curves[backend], marker=".", label=backend)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss.total")
    ax.set_title("DeGLA loss: Triton kernels vs torch path", fontsize=9)
    ax.legend()
    pairs = list(zip(curves["triton"], curves["torch"]))
    if pairs:
        steps = range(1, len(pairs) + 1)
        diff.semilogy(steps, [max(abs(a - b), 1e-12) for a, b in pairs], marker=".", label="|triton − torch|")
        diff.semilogy(steps, [curves["atol"] + curves["rtol"] * abs(b) for _, b in pairs], "--", label="tolerance")
        diff.legend()
    diff.set_title(f"|Δ| against the bf16 tolerance {curves['atol']:g} + {curves['rtol']:g}·|L|", fontsize=9)
    diff.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot_clip(out: Path) -> None:
    """clip_loss.png from every row of the CSV: each bench_clip_loss run plots only its own rows."""
    from benchmarks.common import plot_p50

    rows = [{**r, "B": int(r["B"]), "K": int(r["K"]), "D": int(r["D"]),
             **{k: float(r[k]) for k in ("both_p20_ms", "both_p50_ms", "both_p80_ms")}}
            for r in read_csv(out / "clip_loss.csv") if r["shape"] == "global"]
    if rows:
        plot_p50(rows, out / "clip_loss.png", f"global contrastive loss, {rows[0]['dtype']} — {rows[0]['device']}", ("K", "D"))


def table(checks: list[Check]) -> str:
    head = Check("check", "measured", "target", "status")
    cols = [max(len(getattr(c, k)) for c in [head, *checks]) for k in ("name", "measured", "target", "status")]
    lines = []
    for c in [head, *checks]:
        lines.append("  ".join(getattr(c, k).ljust(w) for k, w in zip(("name", "measured", "target", "status"), cols)))
        if c is head:
            lines.append("  ".join("-" * w for w in cols))
    return "\n".join(line.rstrip() for line in lines)


def step_table(rows: list[dict]) -> str:
    head = ["variant", "samples/s", "MFU %", "step ms", *PHASES, "peak MiB", "planned MiB"]
    body = [[r["variant"], r.get("samples_per_s", ""), r.get("mfu_pct", "") or "n/a", r.get("step_p50_ms", ""),
             *(r.get(f"{p}_p50_ms", "") for p in PHASES), r.get("max_allocated_mib", "") or "n/a",
             r.get("planned_peak_mib", "")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths)))
                     for line in [head, *body])


# ---------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("runs/gpu_check")
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"folder for the {len(FILES)} result files (default $OUT, else runs/gpu_check; now {default_out})")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: degla-tiny for every model, the kernel "
                        "benchmarks' --tiny shapes under TRITON_INTERPRET=1, a few training steps")
    parser.add_argument("--budget", type=float, help=f"seconds for all parts (default {TOTAL_S} on a GPU, {TINY_TOTAL_S} "
                        "with --tiny); a part never runs past it")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (shards, runs, logs) and print it")
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget < MIN_PART_S:
        parser.error(f"--budget {args.budget:g}: must be at least {MIN_PART_S} seconds")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: give a folder")
    if not args.tiny:
        import torch  # only to ask whether there is a GPU (no CUDA context): the parts run in their own processes

        if not torch.cuda.is_available():
            parser.exit(2, f"{parser.prog}: no GPU: add --tiny for the CPU smoke run\n")
    return args


def run_all(out: Path, work: Path, tiny: bool, deadline: float) -> tuple[dict[str, Outcome], list]:
    """Every planned part, then the extra step variants that still fit → (outcomes by part, step variants run)."""
    outcomes: dict[str, Outcome] = {}
    for group in plan_groups(out, work, tiny):
        for o in run_parts(group, deadline, work / "logs", tiny):
            outcomes[o.name] = o
    variants = list(STEP_VARIANTS)
    for variant in [] if tiny else EXTRA_VARIANTS:
        part = step_part(variant, work, tiny)
        if deadline - time.monotonic() >= part.cap_s:
            outcomes[part.name] = run_parts([part], deadline, work / "logs", tiny)[0]
            variants.append(variant)
        else:
            print(f"  {part.name}: skipped, {deadline - time.monotonic():.0f} s left < cap {part.cap_s:.0f} s")
    return outcomes, variants


def write_results(out: Path, rows: list[dict], curves: dict) -> list[Path]:
    """The merged step CSV and the plots (the kernel CSVs are already there) → the files in --out, but summary.json."""
    if (out / "clip_loss.csv").exists():
        replot_clip(out)
    written = [out / n for n in KERNEL_FILES if (out / n).exists()]
    if rows:
        write_step_csv(rows, out / "train_step.csv")
        plot_steps(rows, out / "train_step.png")
        written += [out / "train_step.csv", out / "train_step.png"]
    plot_curves(curves, out / "curves.png")
    return written + [out / "curves.png"]


def print_report(mode: str, env: dict, elapsed: float, rows: list[dict], written: list[Path], checks: list[Check]) -> None:
    if rows:
        print("\n" + step_table(rows))
    print("wrote " + ", ".join(str(p) for p in written))
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "n/a", "timeout", "error")}
    stand_in = ": degla-tiny stands in for every model, the benchmarks' --tiny shapes" if mode == "tiny" else ""
    print(f"\ngpu_check ({mode}{stand_in}) on {env.get('device', '?')}, torch {env.get('torch', '?')}, "
          f"triton {env.get('triton', '?')}: {elapsed:.0f} s; " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    print(table(checks))  # last: the device call returns only the tail of the output


def main(argv=None) -> int:
    args = parse_args(argv)
    # A caller's timeout sends SIGTERM: exit through run_parts' clean-up, which ends the running parts
    # (they run in sessions of their own, so the signal does not reach them).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    tiny, out, mode = args.tiny, args.out, "tiny" if args.tiny else "gpu"
    budget = args.budget or (TINY_TOTAL_S if tiny else TOTAL_S)
    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # the benchmarks append: a previous check's rows would mix into this one's
        (out / name).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # shards, training runs, step CSVs, logs
    (work / "logs").mkdir()
    print(f"gpu_check ({mode}): budget {budget:.0f} s, results in {out}, scratch {work}", flush=True)
    try:
        outcomes, variants = run_all(out, work, tiny, t_start + budget)
        judge = Judge(tiny, outcomes)
        rows = step_rows(work, variants, outcomes)
        curve, curves = curve_check(judge, work, TRAIN[mode]["steps"])
        checks = [gpu_tests_check(judge, work), *kernel_checks(judge, out, SHAPES[mode]),
                  *step_checks(judge, rows, variants), curve]
    finally:
        if args.keep_work:
            print(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    written = write_results(out, rows, curves)
    env = next((r for r in [*read_csv(out / "clip_loss.csv"), *rows] if r.get("device")), {})
    failed = [c.name for c in checks if c.status in ("fail", "timeout", "error")] + \
             [o.name for o in outcomes.values() if o.status != "ok"]
    elapsed = round(time.monotonic() - t_start, 1)
    summary = {"mode": mode, "device": env.get("device"), "torch": env.get("torch"), "triton": env.get("triton"),
               "command": " ".join(["python", *sys.argv]), "budget_s": budget, "elapsed_s": elapsed,
               "ok": not failed, "not_ok": failed, "checks": [asdict(c) for c in checks],
               "parts": [asdict(o) for o in outcomes.values()], "step_variants": rows, "loss_curves": curves}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_report(mode, env, elapsed, rows, [*written, out / "summary.json"], checks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
