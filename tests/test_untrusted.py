"""Untrusted files: a checkpoint or `.pt` file that would run code when unpickled (here: a class whose
__reduce__ creates a marker file) is refused with one line and exit 2 by launch/export.py and launch/eval.py,
and by a resume; the code never runs. DeepSpeed's own loaders (which pass weights_only=False) are forced
weights-only too."""
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint_integrity import run_cfg

from degla_scale import cli
from degla_scale.checkpoint import CheckpointError, Layout, ResumePoint, write_manifest
from degla_scale.data.reader import DataPosition

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls Path.touch(marker): what an attacker's file would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def weights(seed: int = 0) -> dict:
    return {"visual.proj": torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)), "logit_scale": torch.ones(1)}


@pytest.fixture
def marker(tmp_path):
    """The file the payload creates; the payload is proven live once, with an unsafe load."""
    path = tmp_path / "pwned"
    probe = tmp_path / "probe.pt"
    torch.save({"x": Payload(path)}, probe)
    torch.load(probe, weights_only=False)
    assert path.exists(), "the payload must run under an unsafe load"
    path.unlink()
    return path


def tag_folder(root: Path, marker: Path, evil: str, zero: bool) -> Path:
    """A complete (manifested) 1-rank checkpoint whose file `evil` carries the payload."""
    tag_dir = root / "checkpoints" / "step00000002"
    tag_dir.mkdir(parents=True)
    (tag_dir / "layout.json").write_text(json.dumps({"step": 2, "world_size": 1, "batch_size": 8, "grad_accum": 1}))
    (tag_dir / "data_rank0.json").write_text(json.dumps(DataPosition().to_json()))
    files = {
        "mp_rank_00_model_states.pt": {"module": weights(), "buffer_names": [], "param_shapes": [{}], "shared_params": {},
                                       "ds_version": "0.19.8", "frozen_param_shapes": None},
        "teacher.pt": {"alpha": 0.9, "updates": 2, "module": weights(1)},
    }
    if zero:
        files["zero_pp_rank_0_mp_rank_00_optim_states.pt"] = {"optimizer_state_dict": {"zero_stage": 1}}
    for name, state in files.items():
        if name == evil:
            state = {**state, "extra": Payload(marker)}
        torch.save(state, tag_dir / name)
    write_manifest(tag_dir, Layout(2, 1, 8, 1))
    (root / "checkpoints" / "latest").write_text(tag_dir.name)
    return tag_dir


def one_line_refusal(done: subprocess.CompletedProcess, marker: Path) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    assert "refused, as loading it could run code" in lines[0]
    return lines[0]


def test_export_refuses_a_checkpoint_whose_model_states_would_run_code(tmp_path, marker):
    tag_folder(tmp_path / "run", marker, "mp_rank_00_model_states.pt", zero=False)
    done = subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(tmp_path / "run"),
                           "--out", str(tmp_path / "x.safetensors"), "--model-name", "degla-tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_line_refusal(done, marker)
    assert line.startswith("export error: ") and "mp_rank_00_model_states.pt pickles" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_eval_refuses_a_final_student_pt_that_would_run_code(tmp_path, marker):
    student = tmp_path / "final" / "student.pt"
    student.parent.mkdir()
    torch.save({**weights(), "extra": Payload(marker)}, student)
    done = subprocess.run([sys.executable, str(ROOT / "launch/eval.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                           "--model", f"evil={student}", "--out", str(tmp_path / "eval"), "model.pretrained=null"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_line_refusal(done, marker)
    assert line.startswith("export error: ") and f"{student} pickles" in line


def blind_scan(monkeypatch):
    """Turn the static pickle scan off, as for a payload it cannot see: the weights-only loads must refuse it."""
    import degla_scale.export

    monkeypatch.setattr(degla_scale.export, "unsafe_pickle_in", lambda files: None)


@pytest.mark.parametrize("case", ["final teacher.pt", "checkpoint teacher.pt", "ZeRO optimizer states",
                                  "ZeRO optimizer states, scan blind"])
def test_every_file_an_export_reads_is_weights_only(tmp_path, marker, capsys, monkeypatch, case):
    """In process, through cli.run as launch/export.py calls it; DeepSpeed's zero_to_fp32 (which passes
    weights_only=False) included."""
    from degla_scale.export import checkpoint_state_dict

    if case.endswith("scan blind"):
        blind_scan(monkeypatch)

    if case == "final teacher.pt":
        source, which = tmp_path / "teacher.pt", "teacher"
        torch.save({**weights(), "extra": Payload(marker)}, source)
    elif case == "checkpoint teacher.pt":
        source, which = tag_folder(tmp_path, marker, "teacher.pt", zero=False), "teacher"
    else:
        source, which = tag_folder(tmp_path, marker, "zero_pp_rank_0_mp_rank_00_optim_states.pt", zero=True), "student"
    assert cli.run(lambda: checkpoint_state_dict(source, which) and 0) == cli.USAGE_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    if case.endswith("scan blind"):  # DeepSpeed's progress bar has started by then
        lines = [line for line in lines if "error" in line]
    (line,) = lines
    assert line.startswith("export error: ") and "refused, as loading it could run code" in line, line
    if case == "ZeRO optimizer states":
        assert "zero_pp_rank_0_mp_rank_00_optim_states.pt pickles builtins.getattr, pathlib.Path" in line, line
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the DeepSpeed call


def test_the_safe_files_still_load(tmp_path, marker):
    from degla_scale.export import checkpoint_state_dict

    tag_dir = tag_folder(tmp_path, marker, evil="", zero=False)
    student = checkpoint_state_dict(tmp_path, "student")
    torch.testing.assert_close(student["visual.proj"], weights()["visual.proj"])
    assert checkpoint_state_dict(tag_dir, "teacher").keys() == weights().keys()
    torch.save(weights(), tmp_path / "student.pt")
    assert checkpoint_state_dict(tmp_path / "student.pt").keys() == weights().keys()


class UnsafeLoadingEngine:
    """Stands for DeepSpeed's engine at resume: its loaders call torch.load(..., weights_only=False)."""

    def load_checkpoint(self, root, tag):
        state = torch.load(Path(root) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return root, {"step": 2, **{k: v for k, v in state.items() if k == "step"}}


@pytest.mark.parametrize("scan", ["scan", "scan blind"])
def test_a_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, marker, capsys, monkeypatch, scan):
    from degla_scale.checkpoint import find, load

    if scan == "scan blind":
        blind_scan(monkeypatch)

    tag_folder(tmp_path, marker, "mp_rank_00_model_states.pt", zero=False)
    point = find(run_cfg(tmp_path))  # complete: its manifest matches, it is the content that is refused
    assert point == ResumePoint(tmp_path / "checkpoints", "step00000002", Layout(2, 1, 8, 1))
    with pytest.raises(CheckpointError, match="refused, as loading it could run code"):
        load(point, False, point.saved, UnsafeLoadingEngine(), None, num_workers=1)
    assert not marker.exists()
    assert cli.run(lambda: load(point, False, point.saved, UnsafeLoadingEngine(), None, 1) and 0) == cli.USAGE_ERROR
    (line,) = capsys.readouterr().err.strip().splitlines()
    named = "step00000002 pickles" if scan == "scan blind" else "mp_rank_00_model_states.pt pickles builtins.getattr"
    assert line.startswith("checkpoint error: ") and named in line, line
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
