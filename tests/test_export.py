"""Export round trip: a run's checkpoint (ZeRO-0 here, ZeRO-3 on 2 ranks in test_checkpoint.py) → safetensors → open_clip's own loader
gives the embeddings of the weights the run held at its end, which the trainer assembled live from every
rank (final/student.pt, final/teacher.pt) by another path than the export's offline merge of the files."""
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from test_trainer import overrides

import degla_scale.models  # noqa: F401  registers the "degla-tiny" architecture with open_clip

ROOT = Path(__file__).resolve().parents[1]


def export(checkpoint, out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(checkpoint),
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


@torch.no_grad()
def embeddings(clip):
    clip.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer("degla-tiny")(["a red circle left of a blue square", "a small star", "x"])
    return clip.encode_image(images, normalize=True), clip.encode_text(tokens, normalize=True)


def reference(state_file):
    clip = open_clip.create_model("degla-tiny")
    clip.load_state_dict(torch.load(state_file, weights_only=True))
    return embeddings(clip)


def check_round_trip(run, tmp_path, early_tag="step00000001"):
    """Student and teacher exported from the run's latest checkpoint load in open_clip with the embeddings
    of the run's final weights; an earlier checkpoint's export differs (training moved the weights)."""
    for which in ("student", "teacher"):
        out = tmp_path / f"{which}.safetensors"
        done = export(run, out, "--which", which)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "degla-tiny" in done.stdout
        clip, _, _ = open_clip.create_model_and_transforms("degla-tiny", pretrained=str(out))
        for got, want in zip(embeddings(clip), reference(run / f"final/{which}.pt")):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    check_directory_export(run, tmp_path)
    early = tmp_path / "early.safetensors"
    assert export(run / "checkpoints" / early_tag, early).returncode == 0
    moved = open_clip.create_model("degla-tiny", pretrained=str(early))
    assert not torch.equal(embeddings(moved)[0], reference(run / "final/student.pt")[0]), "training must move the weights"


# A fresh interpreter with plain open_clip only: the directory must carry the custom architecture itself.
PLAIN_OPEN_CLIP = """
import sys, open_clip, torch
clip, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
tokenizer = open_clip.get_tokenizer("local-dir:" + sys.argv[1])
assert not any(m.startswith("degla_scale") for m in sys.modules), "degla_scale was imported"
clip.eval()
images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
tokens = tokenizer(["a red circle left of a blue square", "a small star", "x"])
with torch.no_grad():
    torch.save((clip.encode_image(images, normalize=True), clip.encode_text(tokens, normalize=True),
                preprocess.transforms[0].size), sys.argv[2])
"""


def check_directory_export(run, tmp_path):
    out = tmp_path / "exported"
    done = export(run, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"local-dir:{out}" in done.stdout
    loaded = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(out), str(tmp_path / "emb.pt")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    image, text, size = torch.load(tmp_path / "emb.pt")
    want_image, want_text = reference(run / "final/student.pt")
    torch.testing.assert_close(image, want_image, rtol=0, atol=0)
    torch.testing.assert_close(text, want_text, rtol=0, atol=0)
    assert size == 32  # the architecture's preprocessing travels with it


@pytest.mark.slow
def test_export_round_trip_zero0(tmp_path, shards):
    """ZeRO-0 (the checkpoint holds the module itself); ZeRO-3 on 2 ranks is checked on the run of
    tests/test_checkpoint.py::test_two_rank_checkpoint_resumes_on_one_rank[3]."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                           *overrides(shards, run, steps=2), "zero.stage=0", "checkpoint.every=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check_round_trip(run, tmp_path)


def test_export_refuses_what_it_cannot_read(tmp_path):
    from degla_scale.export import ExportError, export_safetensors

    (tmp_path / "empty").mkdir()
    done = export(tmp_path / "empty", tmp_path / "x.safetensors")  # the CLI: exit 2, one line
    assert done.returncode == 2 and "holds no DeepSpeed checkpoint" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(ExportError, match="rename it"):
        export_safetensors({"w": torch.ones(2)}, tmp_path / "x.pt")
