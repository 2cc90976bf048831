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
