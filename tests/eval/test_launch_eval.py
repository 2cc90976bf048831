"""launch/eval.py: several models side by side → results.json, table.md, chart.png; the same weights give the
same numbers whichever form they come in (.pt, exported .safetensors); bad model specs are one clear line."""
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import degla_scale.models  # noqa: F401  registers "degla-tiny"
from degla_scale.data.synthetic import write_sugarcrepe, write_zeroshot
from degla_scale.export import export_safetensors

ROOT = Path(__file__).resolve().parents[2]


def run_eval(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch/eval.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                           "model.pretrained=null", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_models_side_by_side(tmp_path):
    data = tmp_path / "data"
    write_sugarcrepe(data / "sugarcrepe", seed=0, per_type=6)
    write_zeroshot(data / "zeroshot", seed=0, per_class=1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = open_clip.create_model("degla-tiny").state_dict()
        torch.save(state, tmp_path / f"m{seed}.pt")
    export_safetensors(torch.load(tmp_path / "m0.pt"), tmp_path / "m0.safetensors")
    out = tmp_path / "eval"
    done = run_eval("--out", out, "--model", f"a={tmp_path / 'm0.pt'}", "--model", f"b={tmp_path / 'm1.pt'}",
                    "--model", f"a_st={tmp_path / 'm0.safetensors'}", f"evaluation.data_root={data}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["a", "b", "a_st"]
    assert set(results["a"]) == {"sugarcrepe", "zeroshot"}
    assert results["a"] == results["a_st"], "the same weights must score the same from .pt and .safetensors"
    assert results["a"] != results["b"]
    for metrics in results["a"].values():
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| metric | a | b | a_st | change |"
    swap = next(line for line in table if line.startswith("| sugarcrepe/swap_adj |"))
    assert swap == f"| sugarcrepe/swap_adj | {results['a']['sugarcrepe']['swap_adj']:.1f} | " \
                   f"{results['b']['sugarcrepe']['swap_adj']:.1f} | {results['a']['sugarcrepe']['swap_adj']:.1f} | +0.0 |"
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_model_spec_is_one_line(tmp_path):
    from degla_scale.eval.models import ModelSpec

    with pytest.raises(ValueError, match="missing.pt does not exist"):
        ModelSpec.parse(f"x={tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="must be student or teacher"):
        ModelSpec.parse(f"x={tmp_path}#ema")
    assert ModelSpec.parse(f"{tmp_path}#teacher") == ModelSpec(f"{tmp_path}#teacher", str(tmp_path), "teacher")
    assert ModelSpec.parse("base=openclip:ViT-B-32/openai") == ModelSpec("base", "openclip:ViT-B-32/openai")
    done = run_eval("--out", tmp_path, "--model", f"x={tmp_path / 'missing.pt'}")  # the CLI: exit 2, one line
    assert done.returncode == 2 and "missing.pt does not exist" in done.stderr


def test_missing_aro_extra_is_one_line_before_any_model_loads(tmp_path):
    """The order subsets' tagger is checked when the suites are prepared: the model file here is not a
    checkpoint, so loading it first would end in another error instead of the install line."""
    coco = tmp_path / "aro/coco"
    (coco / "val2014").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(coco / "val2014/COCO_val2014_000000000001.jpg")
    (coco / "coco_karpathy_test.json").write_text(json.dumps(
        [{"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["A dog."]}]))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    done = run_eval("--out", tmp_path / "eval", "--model", f"x={tmp_path / 'garbage.pt'}",
                    f"evaluation.data_root={tmp_path}", "evaluation.suites=[aro]", "evaluation.aro.subsets=[coco_order]",
                    "evaluation.aro.seed=1")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("missing evaluation dependency: ARO order subsets need")
    assert "pip install '.[aro]' && python -m spacy download en_core_web_sm && python -m nltk.downloader punkt_tab" \
        in lines[0]
