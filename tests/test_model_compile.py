"""model.compile=true: regional torch.compile of the transformer blocks trains the same as eager.

The tiny model trains 4 steps through launch/train.py (one process, ZeRO-1, so the teacher is the sharded
one and both are compiled) with and without compile; the logged losses must agree to fp32 reordering.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import command

ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("loss.")} for r in rows if "loss.total" in r]


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(tmp_path, shards):
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        args = command(shards, run_dir) + ["schedule.max_steps=4", "zero.stage=1", "checkpoint.every=100",
                                           f"model.compile={str(compiled).lower()}"]
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[compiled] = losses(run_dir)
    eager, compiled = runs[False], runs[True]
    assert len(eager) == len(compiled) == 4
    for step, (e, c) in enumerate(zip(eager, compiled), 1):
        for key in e:
            assert abs(e[key] - c[key]) <= 1e-4 * max(1.0, abs(e[key])), (step, key, e[key], c[key])


def test_compile_with_zero3_is_refused_in_one_line():
    from degla_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.compile=true with zero.stage=3"):
        load_config("configs/tiny.yaml", ["model.compile=true", "zero.stage=3"])
