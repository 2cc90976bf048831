"""Config loading: every shipped config composes; each bad input gets one line and exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from degla_scale.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_setup_in_vitb32():
    cfg = load_config(ROOT / "configs/vitb32.yaml")
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-B-32", "openai")
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.1 and cfg.optim.eps == 1e-6
    assert list(cfg.optim.betas) == [0.9, 0.98]
    assert (cfg.data.batch_size, cfg.data.num_negatives) == (32, 4)
    assert (cfg.schedule.warmup_steps, cfg.schedule.epochs, cfg.teacher.ema_alpha) == (50, 5, 0.9996)


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["optim.lr=1e-5", "zero.stage=2", "model.pretrained=null"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.zero.stage == 2 and cfg.model.pretrained is None


def write_yaml(tmp_path, body):
    path = tmp_path / "bad.yaml"
    path.write_text("defaults:\n  - degla_schema\n  - _self_\n" + body)
    return path


BAD_CASES = {
    "unknown key in file": ("optim:\n  lrr: 0.1\n", [], "optim.lrr"),
    "unknown key override": ("", ["optim.lrr=0.1"], "optim.lrr"),
    "wrong type": ("", ["optim.lr=fast"], "optim.lr"),
    "wrong type in file": ("data:\n  batch_size: many\n", [], "data.batch_size"),
    "bad value": ("", ["zero.stage=5"], "zero.stage=5"),
    "unknown loss backend": ("", ["objective.backend=cuda"], "objective.backend='cuda'"),
    "param offload below stage 3": ("zero:\n  stage: 2\n", ["zero.offload_params=cpu"], "zero.offload_params=cpu"),
    "optimizer offload at stage 0": ("", ["zero.offload_optimizer=cpu"], "zero.offload_optimizer=cpu"),
    "teacher offload at stage 0": ("", ["teacher.offload=cpu"], "teacher.offload=cpu"),
    "not key=value": ("", ["--lr"], "'--lr'"),
    "unknown negatives pick": ("", ["data.negatives_pick=last"], "data.negatives_pick='last'"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_config_one_line(tmp_path, case):
    body, overrides, named = BAD_CASES[case]
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, body), overrides)
    message = str(info.value)
    assert "\n" not in message and named in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "launch/train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def k4_shards(tmp_path_factory):
    from degla_scale.data.synthetic import write_shards

    out = tmp_path_factory.mktemp("shards") / "ft"
    write_shards(out, "finetune", seed=0, num_samples=8, num_negatives=4, shard_size=4, workers=1)
    return out


@pytest.mark.parametrize("case,args,named", [
    ("unknown key", ["optim.lrr=1"], "optim.lrr"),
    ("wrong type", ["schedule.epochs=two"], "schedule.epochs"),
    ("missing file", None, "not found"),
    ("K above the data's", ["data.num_negatives=5"], "data.num_negatives=5"),
])
def test_launcher_exit_code_2(tmp_path, k4_shards, case, args, named):
    config = str(ROOT / "configs/tiny.yaml") if args is not None else str(tmp_path / "missing.yaml")
    extra = [f"data.train_shards={k4_shards}", f"run_dir={tmp_path / 'run'}", "model.pretrained=null"]
    result = run_train("--config", config, "--local_rank=0", *(args or []), *extra)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("config error:") and named in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_check_data_takes_k_up_to_the_fewest_negatives_a_sample_holds(tmp_path):
    """Converted shards hold 4, 5 or 7 negatives per sample (manifest: min_negatives 4): any K ≤ 4 trains,
    K = 5 is refused in one line naming the limit."""
    import json

    from degla_scale.data.convert import convert, read_jsonl
    from degla_scale.trainer import check_data
    from PIL import Image

    lines = []
    for i, n in enumerate([4, 5, 7, 5]):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
        lines.append({"id": f"s{i}", "image": f"{i}.jpg", "caption": f"caption {i}", "negatives": [f"n{i} {k}" for k in range(n)]})
    (tmp_path / "data.jsonl").write_text("\n".join(map(json.dumps, lines)))
    convert(read_jsonl(tmp_path / "data.jsonl", None), tmp_path / "shards", "wds", 4, 2, 1, progress=False)
    for k in (1, 2, 4):
        assert check_data(load_config(ROOT / "configs/tiny.yaml", [f"data.train_shards={tmp_path / 'shards'}",
                                                                    f"data.num_negatives={k}"])) == 4
    with pytest.raises(ConfigError) as info:
        check_data(load_config(ROOT / "configs/tiny.yaml", [f"data.train_shards={tmp_path / 'shards'}",
                                                             "data.num_negatives=5"]))
    assert "\n" not in str(info.value) and "as few as 4" in str(info.value) and "at most 4" in str(info.value)
