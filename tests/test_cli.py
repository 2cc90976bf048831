"""A new user's first hour, at the command line: every mistake is one line and exit code 2 (also late in a
run and on 2 ranks), the config keys can be discovered, and a run directory says what it is doing."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import overrides

from degla_scale import config_reference
from degla_scale.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
PROGRESS_BAR = re.compile(r"\[\d\d:\d\d")  # tqdm's elapsed-time field


def run(script, *args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line(result, prefix: str, *named: str) -> str:
    """The run ended with exit code 2 and exactly one non-empty stderr line (beside progress bars), starting
    with `prefix`."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr[-3000:]
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("mistake,named", [
    ("model.pretrained=runs/nope.pt", ["model.pretrained='runs/nope.pt'", "no such file"]),
    ("model.name=ViT-B-23", ["model.name='ViT-B-23'", "did you mean ViT-B-32"]),
    ("model.name=ViT-B-32 model.pretrained=opneai", ["'opneai'", "did you mean openai"]),
    ("data.batch_size=200", ["96 samples fill no optimizer step of 200", "data.batch_size"]),
    ("optim.lrr=1", ["unknown config key 'optim.lrr'", "did you mean optim.lr?"]),
])
def test_train_mistakes_are_one_line_exit_2(tmp_path, shards, mistake, named):
    result = run("train.py", "--config", TINY, *overrides(shards, tmp_path / "run"), *mistake.split())
    one_line(result, "config error:", *named)
    assert not (tmp_path / "run").exists()  # nothing started


def test_unknown_key_gets_the_same_line_from_yaml_and_command_line(tmp_path):
    (tmp_path / "mine.yaml").write_text("run_dir: runs/mine\ndata:\n  batchsize: 8\n")  # no defaults header
    from_file = run("train.py", "--config", tmp_path / "mine.yaml")
    from_cli = run("train.py", "--config", TINY, "data.batchsize=8")
    assert one_line(from_file, "config error:", "did you mean data.batch_size?") == one_line(from_cli, "config error:")


def test_headerless_yaml_composes_over_the_schema(tmp_path):
    (tmp_path / "mine.yaml").write_text("run_dir: runs/mine\noptim:\n  lr: 2.0e-5\n")
    cfg = load_config(tmp_path / "mine.yaml", ["data.batch_size=4"])
    assert cfg.run_dir == "runs/mine" and cfg.optim.lr == 2e-5 and cfg.data.batch_size == 4
    assert cfg.objective.igc_weight == 0.1  # the schema's defaults fill the rest
    with pytest.raises(ConfigError, match=r"'\+optim.lr=1'.*without \+"):
        load_config(tmp_path / "mine.yaml", ["+optim.lr=1"])


def test_help_lists_every_key_with_type_default_and_doc():
    result = run("train.py", "--help")
    assert result.returncode == 0 and "key=value" in result.stdout.splitlines()[0]
    for key in config_reference.keys():
        entry = f"  {key.name} ({key.type}, default "
        assert entry in result.stdout, key.name
        assert key.doc.split()[0] in result.stdout.split(entry, 1)[1].split("\n  ", 2)[1], key.name
    assert len(config_reference.keys()) > 40 and all(k.doc for k in config_reference.keys())


def test_print_config_round_trips(tmp_path):
    result = run("train.py", "--config", TINY, "optim.lr=5e-5", "data.negatives_pick=random", "--print-config")
    assert result.returncode == 0, result.stderr
    (tmp_path / "printed.yaml").write_text(result.stdout)
    assert load_config(tmp_path / "printed.yaml") == load_config(TINY, ["optim.lr=5e-5", "data.negatives_pick=random"])


def test_check_validates_without_starting(tmp_path, shards):
    ok = run("train.py", "--config", TINY, *overrides(shards, tmp_path / "run"), "--check")
    assert ok.returncode == 0 and "config OK" in ok.stdout and "96 samples per epoch" in ok.stdout, ok.stderr
    bad = run("train.py", "--config", TINY, *overrides(shards, tmp_path / "run"), "data.num_negatives=3", "--check")
    one_line(bad, "config error:", "data.num_negatives=3", "at most 2")
    assert not (tmp_path / "run").exists()


def test_two_ranks_print_a_late_error_once(tmp_path, shards):
    """On 2 ranks an error found after the launcher started both processes: one line from rank 0, exit 2."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", "29571", str(ROOT / "launch/train.py"),
                             "--config", TINY, *overrides(shards, tmp_path / "run"), "data.batch_size=50"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "config error:" in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(ours) == 1 and "96 samples fill no optimizer step of 100" in ours[0], ours


def test_offline_download_is_one_line_naming_the_fixes(monkeypatch):
    from degla_scale import models

    monkeypatch.setattr(models, "_reachable", lambda *a, **k: False)
    monkeypatch.setattr(models, "_cached", lambda *a: False)
    with pytest.raises(ConfigError) as info:
        models.create_clip("ViT-B-32", "openai")
    assert "model.pretrained=/path/to/file" in str(info.value) and "HF_HOME" in str(info.value)


def test_openai_tags_build_quick_gelu():
    from degla_scale.models import uses_quick_gelu

    assert uses_quick_gelu("ViT-B-32", "openai") and not uses_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not uses_quick_gelu("degla-tiny", None)


def test_eval_mistakes_are_one_line(tmp_path):
    bad_tag = run("eval.py", "--config", TINY, "--out", tmp_path / "e", "--model", "openclip:ViT-B-32/opneai")
    one_line(bad_tag, "config error:", "did you mean openai")
    import open_clip
    import torch

    import degla_scale.models  # noqa: F401  registers degla-tiny

    torch.save(open_clip.create_model("degla-tiny").state_dict(), tmp_path / "student.pt")
    no_data = run("eval.py", "--config", TINY, "--out", tmp_path / "e", "--model", tmp_path / "student.pt",
                  f"evaluation.data_root={tmp_path / 'none'}")
    line = one_line(no_data, "evaluation data error:", "evaluation.data_root")
    assert "--data-root" not in line and "No pretrained weights" not in no_data.stderr


def test_make_shards_with_every_record_rejected_exits_2(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "missing.jpg", "caption": "a cat", "negatives": ["a dog"]}))
    result = run("make_shards.py", "--from", "jsonl", tmp_path / "bad.jsonl", "--out", tmp_path / "out",
                 "--num-negatives", 1, "--workers", 1)
    one_line(result, "data error:", "all 1 records were rejected", "missing_image", "rejects.jsonl")


def test_a_run_directory_says_what_it_does(tmp_path, shards):
    """Fresh → complete → relaunch says complete and rewrites nothing → a changed setting is named, a
    schedule change refused; every launch keeps its config."""
    run_dir = tmp_path / "run"
    args = ["--config", TINY, *overrides(shards, run_dir, steps=2), "checkpoint.every=1"]
    first = run("train.py", *args)
    assert first.returncode == 0 and "done: step 2/2" in first.stderr and str(run_dir / "final") in first.stderr
    final = run_dir / "final/student.pt"
    stamp = final.stat().st_mtime_ns

    again = run("train.py", *args)
    assert again.returncode == 0 and f"{run_dir} is already complete (step 2/2)" in again.stderr, again.stderr
    assert final.stat().st_mtime_ns == stamp

    refused = run("train.py", *args, "schedule.warmup_steps=1")
    one_line(refused, "config error:", "schedule.warmup_steps 2 → 1", "new run_dir")

    final.unlink()  # as if killed after its last checkpoint: the relaunch resumes (and finishes)
    resumed = run("train.py", *args, "optim.weight_decay=0.2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} from step 2/2" in resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: resuming with changed settings: optim.weight_decay 0.1 → 0.2"]
    assert len(list(run_dir.glob("config.*.json"))) == 2 and final.is_file()
    assert json.loads((run_dir / "config.json").read_text())["optim"]["weight_decay"] == 0.2
