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


def test_replication_script_on_tiny_data(tmp_path):
    """One variant (the ablation switch), one seed, two steps: a row for it and the pre-trained model, a table, a plot."""
    import subprocess
    import sys
    from pathlib import Path

    import open_clip
    import torch

    import degla_scale.models  # noqa: F401  registers "degla-tiny"
    from degla_scale.data.synthetic import write_shards, write_sugarcrepe, write_zeroshot

    root = Path(__file__).resolve().parents[2]
    data = tmp_path / "data"
    write_shards(data / "finetune", "finetune", seed=0, num_samples=64, num_negatives=4, shard_size=32, workers=1)
    write_sugarcrepe(data / "sugarcrepe", seed=1, per_type=4)
    write_zeroshot(data / "zeroshot", seed=2, per_class=1)
    torch.save(open_clip.create_model("degla-tiny").state_dict(), tmp_path / "pretrained.pt")
    out = tmp_path / "results/replicate"
    result = subprocess.run([sys.executable, "benchmarks/replicate_tiny.py", "--pretrained", str(tmp_path / "pretrained.pt"),
                             "--data", str(data), "--steps", "2", "--batch-size", "8", "--seeds", "0",
                             "--variants", "degla_official_tgc", "--work", str(tmp_path / "runs"),
                             "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [("pretrained", "-"), ("degla_official_tgc", "0")]
    for r in rows:
        assert 0 <= float(r["comp_avg"]) <= 100 and 0 <= float(r["zeroshot_acc1"]) <= 100 and r["command"]
    assert (tmp_path / "runs/degla_official_tgc_s0/final/student.pt").is_file()
    official = [line for line in (tmp_path / "runs/degla_official_tgc_s0/config.json").read_text().splitlines()
                if "tgc_grouping" in line]
    assert official and "official" in official[0]
    report = out.with_suffix(".md").read_text()
    assert "| degla_official_tgc |" in report and "Command:" in report
    assert out.with_suffix(".png").stat().st_size > 5_000
