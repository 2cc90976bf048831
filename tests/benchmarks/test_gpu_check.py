"""benchmarks/gpu_check.py: its GPU plan fits one device call, targets are judged from the benchmarks' rows,
a hung part is stopped at its cap, a bad invocation ends with one line, and `--tiny` runs every part end
to end on the CPU (the 8 files, the summary table printed last)."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check as G

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_plan_fits_one_device_call(tmp_path):
    """Even if every part ran to its cap, the parts end within TOTAL_S, which leaves the wheels' install
    room in the 8-minute call; every required part is planned, most important first."""
    groups = G.plan_groups(tmp_path / "out", tmp_path / "work", tiny=False)
    assert G.worst_case_s(groups) <= G.TOTAL_S <= 8 * 60 - 20
    names = [p.name for group in groups for p in group]
    assert names == ["shards", "gpu tests", "train triton", "train torch", "bench clip_loss", "bench clip_loss K=0",
                     "bench grounded_loss", "step ViT-L/14 eager", "step ViT-B/32 triton", "step ViT-B/32 torch",
                     "step ViT-L/14 compiled"]
    steps = {p.name: p.argv for group in groups for p in group if p.name.startswith("step ")}
    assert "model.compile=true" in steps["step ViT-L/14 compiled"]
    assert "objective.backend=torch" in steps["step ViT-B/32 torch"]
    assert all("model.pretrained=null" in argv for argv in steps.values())  # random init: nothing downloaded
    assert len(G.FILES) <= 8


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def test_targets_are_judged_from_the_benchmark_rows(tmp_path):
    """The GPU branch, on rows written here: pass and fail against each threshold, n/a with the reason when
    a value cannot exist (no inf_cl), and the part's own status when it timed out."""
    ok = {name: G.Outcome(name, "ok", 1.0, 10.0, 0) for name in
          ("bench clip_loss", "bench clip_loss K=0", "bench grounded_loss", "train triton", "train torch",
           "step ViT-L/14 eager", "step ViT-B/32 torch")}
    ok["step ViT-L/14 compiled"] = G.Outcome("step ViT-L/14 compiled", "timeout", 85.0, 85.0)
    judge = G.Judge(tiny=False, outcomes=ok)
    clip = [{"impl": "fused", "shape": "global", "B": 4096, "K": 4, "D": 768, "C": 20480, "pct_bf16_peak": 55.0,
             "working_mem_mib": 10.0, "both_p50_ms": 1.0},
            {"impl": "eager", "shape": "global", "B": 4096, "K": 4, "D": 768, "C": 20480, "pct_bf16_peak": 20.0,
             "working_mem_mib": 1000.0, "both_p50_ms": 3.0},
            {"impl": "fused", "shape": "data-parallel", "B": 256, "K": 4, "D": 768, "C": 81920, "pct_bf16_peak": 30.0,
             "working_mem_mib": 1.0, "both_p50_ms": 1.0},
            {"impl": "fused", "shape": "global", "B": 4096, "K": 0, "D": 768, "C": 4096, "pct_bf16_peak": 40.0,
             "working_mem_mib": 1.0, "both_p50_ms": 0.5}]
    write_csv(tmp_path / "clip_loss.csv", clip)
    write_csv(tmp_path / "grounded_loss.csv", [{"impl": "fused", "B": 16384, "K": 4, "D": 768, "pct_copy_bw": 71.0}])
    status = {c.name: c.status for c in G.kernel_checks(judge, tmp_path, G.SHAPES["gpu"])}
    assert list(status.values()) == ["pass", "fail", "pass", "n/a", "pass"]  # 55 ≥ 50, 30 < 40, 1%, no inf_cl, 71%

    rows = [{"variant": "ViT-L/14 eager", "mfu_pct": "41.5", "step_p50_ms": "100", "ema_mean_ms": "6",
             "max_allocated_mib": "20000", "planned_peak_mib": "24000"},
            {"variant": "ViT-B/32 torch", "mfu_pct": "", "step_p50_ms": "30", "ema_mean_ms": "1",
             "max_allocated_mib": "8000", "planned_peak_mib": "11000"}]
    variants = [v for v in G.STEP_VARIANTS if v[0] in ("ViT-L/14 eager", "ViT-B/32 torch", "ViT-L/14 compiled")]
    checks = G.step_checks(judge, rows, variants)
    assert [(c.name, c.status) for c in checks] == [
        ("ViT-L/14 eager step: MFU", "pass"), ("ViT-L/14 eager: EMA + refresh (+ offload) / step", "fail"),  # 6%
        ("ViT-L/14 eager: planned vs measured peak memory", "pass"),  # +20%
        ("ViT-B/32 torch: planned vs measured peak memory", "fail"),  # +38%
        ("ViT-L/14 compiled step: MFU", "timeout"), ("ViT-L/14 compiled: EMA + refresh (+ offload) / step", "timeout"),
        ("ViT-L/14 compiled: planned vs measured peak memory", "timeout")]

    for backend, offset in (("triton", 0.01), ("torch", 0.0)):  # 0.01 on losses 4.9 → 2.0: within 1e-5 + 1.6e-2·|L|
        (tmp_path / f"train_{backend}").mkdir()
        (tmp_path / f"train_{backend}" / "train.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss.total": 5.0 - 0.1 * s + offset}) + "\n" for s in range(1, 31)))
    check, curves = G.curve_check(judge, tmp_path, 30)
    assert check.status == "pass" and curves["worst_over_tolerance"] == pytest.approx(0.01 / (1e-5 + 1.6e-2 * 2.0))
    (tmp_path / "train_torch" / "train.jsonl").write_text(json.dumps({"step": 1, "loss.total": 5.0}) + "\n")
    check, _ = G.curve_check(judge, tmp_path, 30)
    assert check.status == "fail" and "torch run logged 1 steps" in check.measured


def test_a_hung_part_is_stopped_at_its_cap_with_what_it_started(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "MIN_PART_S", 0)
    marker = tmp_path / "child.pid"
    hang = G.Part("hang", ["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], cap_s=1.0)
    fail = G.Part("fail", [sys.executable, "-c", "import sys; print('the reason'); sys.exit(3)"], cap_s=30.0)
    t0 = time.monotonic()
    hung, failed = G.run_parts([hang, fail], time.monotonic() + 60, tmp_path, tiny=True)
    assert time.monotonic() - t0 < 20
    assert hung.status == "timeout" and hung.rc is None
    assert (failed.status, failed.rc, failed.tail.strip()) == ("failed", 3, "the reason")
    status = Path(f"/proc/{int(marker.read_text())}/status")  # the sleep the shell started went with it
    time.sleep(0.5)
    assert not status.exists() or "\tZ" in status.read_text().split("State:")[1].splitlines()[0]  # gone, or a zombie


@pytest.mark.parametrize("args,says", [([], "--tiny"), (["--tiny", "--budget", "0"], "--budget")])
def test_bad_invocation_ends_with_one_line(tmp_path, args, says):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "out"), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert says in result.stderr.splitlines()[-1] and len(result.stderr.splitlines()) <= 2  # argparse: usage + error
    assert not (tmp_path / "out").exists()


@pytest.mark.long  # ~100 s: run it (pytest --run-long) before spending GPU time on the check
def test_tiny_run_end_to_end(tmp_path):
    """Every part runs and finishes; the 8 files and nothing else; the table is the last thing printed."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(G.FILES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "tiny" and summary["ok"]
    assert [(p["name"], p["status"]) for p in summary["parts"]] == [
        (name, "ok") for name in ("shards", "gpu tests", "train triton", "train torch", "bench clip_loss",
                                  "bench grounded_loss", "step ViT-L/14 eager", "step ViT-B/32 triton",
                                  "step ViT-B/32 torch", "step ViT-L/14 compiled")]
    checks = summary["checks"]
    assert {c["status"] for c in checks} <= {"pass", "n/a"}
    by_name = {c["name"]: c for c in checks}
    assert by_name["loss curves, kernels vs torch path (4 steps)"]["status"] == "pass"  # judged even when tiny
    assert len(summary["loss_curves"]["triton"]) == len(summary["loss_curves"]["torch"]) == 4
    assert "no CUDA" in by_name["gpu-marked kernel tests (training size vs float64)"]["measured"]

    lines = result.stdout.rstrip().splitlines()
    table = lines[-len(checks):]
    assert lines[-len(checks) - 2].startswith("check") and set(lines[-len(checks) - 1]) <= {"-", " "}
    for line, check in zip(table, checks):
        assert line.startswith(check["name"]) and line.rstrip().endswith(check["status"])

    rows = list(csv.DictReader((out / "train_step.csv").open()))
    assert [r["variant"] for r in rows] == [v[0] for v in G.STEP_VARIANTS]
    assert [r["compile"] for r in rows] == ["False", "False", "False", "True"]
    assert [r["backend"] for r in rows] == ["triton", "triton", "torch", "triton"]
    assert all(float(r["planned_peak_mib"]) > 0 and r["model"] == "degla-tiny" for r in rows)
    for name in ("clip_loss.png", "grounded_loss.png", "train_step.png", "curves.png"):
        assert (out / name).stat().st_size > 10_000
