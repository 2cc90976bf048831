"""The benchmarks run end to end on CPU (kernels under Triton's interpreter) and write their CSV and plot to
--out (runs/benchmarks/ by default, never the committed benchmarks/results/ unless asked)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_clip_loss, bench_grounded_loss

ROOT = Path(__file__).resolve().parents[2]


def committed_results_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", "benchmarks/results"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("bench,name", [(bench_clip_loss, "clip_loss"), (bench_grounded_loss, "grounded_loss")])
def test_tiny_run_writes_results_under_runs_by_default(tmp_path, monkeypatch, capsys, bench, name):
    before = committed_results_status()
    monkeypatch.chdir(tmp_path)
    bench.main(["--tiny"])
    out = Path("runs/benchmarks")
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out / f'{name}.csv'}, {out / f'{name}.png'}"
    assert committed_results_status() == before
    rows = list(csv.DictReader((tmp_path / out / f"{name}.csv").open()))
    assert (tmp_path / out / f"{name}.png").stat().st_size > 10_000
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


@pytest.mark.parametrize("script", ["bench_clip_loss.py", "bench_grounded_loss.py"])
def test_kernel_sweep_without_tiny_on_cpu_stops_at_once(tmp_path, script):
    """The default, GPU-sized shapes under the interpreter would run for hours: one line naming --tiny, exit 2."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "--tiny" in line and "no GPU" in line
    assert not (tmp_path / "runs").exists()


def test_train_step_benchmark_on_tiny_config(tmp_path):
    """The trainer's step on synthetic inputs: a CSV row whose phases add up to the step, and a plot;
    --results and --name choose the folder and the file names."""
    result = subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--config", "configs/tiny.yaml",
                             "--steps", "4", "--warmup", "1", "--results", str(tmp_path), "--name", "step"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == f"wrote {tmp_path / 'step.csv'}, {tmp_path / 'step.png'}"
    assert "initialized randomly" not in result.stderr  # the weights are random on purpose
    (row,) = list(csv.DictReader((tmp_path / "step.csv").open()))
    assert row["model"] == "degla-tiny" and row["batch"] == "32" and row["K"] == "4"
    phases = sum(float(row[f"{p}_p50_ms"]) for p in ("data", "teacher_fwd", "student_fwd", "backward", "optimizer", "ema"))
    assert 0.7 * float(row["step_p50_ms"]) <= phases <= 1.3 * float(row["step_p50_ms"])
    assert float(row["samples_per_s"]) > 0 and float(row["fwd_gflops_per_sample"]) > 0
    assert row["mfu_pct"] == ""  # no GPU peak to compare against on a CPU
    assert (tmp_path / "step.png").stat().st_size > 5_000


def test_data_benchmark_on_tiny_config(tmp_path):
    """Both shard formats read by the trainer's readers through both pipelines (the full-decode fp32 one of
    before, the draft-decode uint8 one of now): a row each, workers = feed rate / per-worker rate."""
    import math

    from benchmarks import bench_data

    bench_data.main(["--config", "configs/tiny.yaml", "--samples", "64", "--image-size", "96x64", "--batch-size", "8",
                     "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "data.csv").open()))
    assert [(r["format"], r["pipeline"]) for r in rows] == [("wds", "full fp32"), ("wds", "draft uint8"),
                                                            ("mds", "full fp32"), ("mds", "draft uint8")]
    for r in rows:
        rate, feed = float(r["samples_per_s_per_worker"]), float(r["feed_samples_per_s_per_gpu"])
        assert rate > 0 and feed > 0 and r["feed_source"].startswith("estimate")
        assert int(r["workers_per_gpu"]) == math.ceil(feed / rate)
    assert (tmp_path / "data.png").stat().st_size > 5_000


def test_replication_script_on_tiny_data(tmp_path):
    """One variant (the ablation switch), one seed, two steps: a row for it and the pre-trained model, a table, a plot."""
    import open_clip
    import torch

    import degla_scale.models  # noqa: F401  registers "degla-tiny"
    from degla_scale.data.synthetic import write_shards, write_sugarcrepe, write_zeroshot

    data = tmp_path / "data"
    write_shards(data / "finetune", "finetune", seed=0, num_samples=64, num_negatives=4, shard_size=32, workers=1)
    write_sugarcrepe(data / "sugarcrepe", seed=1, per_type=4)
    write_zeroshot(data / "zeroshot", seed=2, per_class=1)
    torch.save(open_clip.create_model("degla-tiny").state_dict(), tmp_path / "pretrained.pt")
    stem = tmp_path / "results/replicate"
    result = subprocess.run([sys.executable, "benchmarks/replicate_tiny.py", "--pretrained", str(tmp_path / "pretrained.pt"),
                             "--data", str(data), "--steps", "2", "--batch-size", "8", "--seeds", "0",
                             "--variants", "degla_official_tgc", "--work", str(tmp_path / "runs"),
                             "--out", str(stem.parent), "--name", stem.name], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "wrote " + ", ".join(str(stem.with_suffix(s)) for s in (".csv", ".md", ".png"))
    rows = list(csv.DictReader(stem.with_suffix(".csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [("pretrained", "-"), ("degla_official_tgc", "0")]
    for r in rows:
        assert 0 <= float(r["comp_avg"]) <= 100 and 0 <= float(r["zeroshot_acc1"]) <= 100 and r["command"]
    assert (tmp_path / "runs/degla_official_tgc_s0/final/student.pt").is_file()
    official = [line for line in (tmp_path / "runs/degla_official_tgc_s0/config.json").read_text().splitlines()
                if "tgc_grouping" in line]
    assert official and "official" in official[0]
    report = stem.with_suffix(".md").read_text()
    assert "| degla_official_tgc |" in report and "Command:" in report
    assert stem.with_suffix(".png").stat().st_size > 5_000


def test_traffic_model_prints_the_sweep_and_the_data_parallel_shape(capsys):
    """--model needs no GPU; each line's bytes are at least what the passes must touch once."""
    bench_clip_loss.main(["--model", "H100", "--B", "4096", "--K", "4", "--D", "768"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["H100 bf16 global b=4096 C=20480 D=768",
                                                      "H100 bf16 data-parallel b=256 C=81920 D=768"]
    for (b, C), line in zip([(4096, 20480), (256, 81920)], lines):
        fwd_mb, bwd_mb = (float(part.split(" MB")[0].split()[-1].replace(",", "")) for part in line.split(";"))
        inputs_mb = (b + C) * 768 * 2 / 1e6
        assert fwd_mb >= inputs_mb  # read I and T once
        assert bwd_mb >= inputs_mb + 3 * b * C * 2 / 1e6 + 2 * C * 768 * 2 / 1e6  # + s·dS thrice, T again, dT out
        assert "TB/s" in line and "TFLOP/s" in line
