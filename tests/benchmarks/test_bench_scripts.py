"""The kernel benchmarks run end to end on CPU (kernels under Triton's interpreter) and write their CSV and plot."""
import csv

import pytest

from benchmarks import bench_clip_loss, bench_grounded_loss


@pytest.mark.parametrize("bench,name", [(bench_clip_loss, "clip_loss"), (bench_grounded_loss, "grounded_loss")])
def test_tiny_run_writes_results(tmp_path, bench, name):
    bench.main(["--tiny", "--results", str(tmp_path), "--out", name])
    rows = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert {"fused", "eager"} <= {r["impl"] for r in rows}
    for row in rows:
        assert row["device"] and row["torch"] and row["triton"] and row["date"] and row["command"]
        for phase in ("fwd", "bwd", "both"):
            p20, p50, p80 = (float(row[f"{phase}_{q}_ms"]) for q in ("p20", "p50", "p80"))
            assert 0 < p20 <= p50 <= p80
        assert float(row["saved_mib"]) > 0
    if name == "clip_loss":  # K=0 rows also time open_clip's ClipLoss
        assert any(r["impl"] == "open_clip" for r in rows if r["K"] == "0")
        assert not any(r["impl"] == "open_clip" for r in rows if r["K"] != "0")


def test_train_step_benchmark_on_tiny_config(tmp_path):
    """The trainer's step on synthetic inputs: a CSV row whose phases add up to the step, and a plot."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--config", "configs/tiny.yaml",
                             "--steps", "4", "--warmup", "1", "--results", str(tmp_path)],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = list(csv.DictReader((tmp_path / "train_step.csv").open()))
    assert row["model"] == "degla-tiny" and row["batch"] == "32" and row["K"] == "4"
    phases = sum(float(row[f"{p}_p50_ms"]) for p in ("data", "teacher_fwd", "student_fwd", "backward", "optimizer", "ema"))
    assert 0.7 * float(row["step_p50_ms"]) <= phases <= 1.3 * float(row["step_p50_ms"])
    assert float(row["samples_per_s"]) > 0 and float(row["fwd_gflops_per_sample"]) > 0
    assert row["mfu_pct"] == ""  # no GPU peak to compare against on a CPU
    assert (tmp_path / "train_step.png").stat().st_size > 5_000


def test_data_benchmark_on_tiny_config(tmp_path):
    """Both shard formats read by the trainer's readers: a row each, workers = feed rate / per-worker rate."""
    import math

    from benchmarks import bench_data

    bench_data.main(["--config", "configs/tiny.yaml", "--samples", "64", "--image-size", "96x64", "--batch-size", "8",
                     "--results", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "data.csv").open()))
    assert [r["format"] for r in rows] == ["wds", "mds"]
    for r in rows:
        rate, feed = float(r["samples_per_s_per_worker"]), float(r["feed_samples_per_s_per_gpu"])
        assert rate > 0 and feed > 0 and r["feed_source"].startswith("estimate")
        assert int(r["workers_per_gpu"]) == math.ceil(feed / rate)
    assert (tmp_path / "data.png").stat().st_size > 5_000
