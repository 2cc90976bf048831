"""Damaged checkpoints: a checkpoint is complete only when its manifest (written last) lists every file with
its size and CRC-32. A damaged `latest` is reported in one line and the newest complete checkpoint before it is
resumed; with none left, one line says how to start fresh (exit 2). Pruning never removes the last complete
checkpoint before a newer one is complete. One end-to-end run: step 6's checkpoint truncated → the relaunch
resumes from step 3 on the uninterrupted run's losses."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_trainer import overrides, records, steps_of

from degla_scale import checkpoint as ckpt
from degla_scale import cli
from degla_scale.checkpoint import CheckpointError, Layout, check_complete, find, save, write_manifest
from degla_scale.data.reader import DataPosition

ROOT = Path(__file__).resolve().parents[1]


def tag(step: int) -> str:
    return f"step{step:08d}"


def fake_checkpoint(ckpt_dir: Path, step: int, world: int = 2, latest: bool = True) -> Path:
    """A tag folder laid out like a `world`-rank ZeRO checkpoint (random bytes for DeepSpeed's files), with the
    manifest this project's save writes."""
    tag_dir = ckpt_dir / tag(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "layout.json").write_text(json.dumps({"step": step, "world_size": world, "batch_size": 8, "grad_accum": 1}))
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3000 + step))
    (tag_dir / "teacher.pt").write_bytes(os.urandom(2000))
    for r in range(world):
        (tag_dir / f"data_rank{r}.json").write_text(json.dumps(DataPosition(0, step, [8 * step]).to_json()))
        (tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(5000))
    write_manifest(tag_dir, Layout(step, world, 8, 1))
    if latest:
        (ckpt_dir / "latest").write_text(tag(step))
    return tag_dir


def train(shards, run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                           *overrides(shards, run_dir, steps=steps)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def run_cfg(run_dir: Path, resume: str = "auto"):
    """What find() reads of a Config."""
    return SimpleNamespace(run_dir=str(run_dir), checkpoint=SimpleNamespace(resume=resume))


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_the_manifest_lists_every_file_and_a_complete_latest_resumes_quietly(tmp_path, capsys):
    ckpt_dir = tmp_path / "checkpoints"
    fake_checkpoint(ckpt_dir, 3)
    six = fake_checkpoint(ckpt_dir, 6)
    manifest = json.loads((six / "manifest.json").read_text())
    assert manifest["format"] == ckpt.MANIFEST_FORMAT and manifest["step"] == 6 and manifest["world_size"] == 2
    assert sorted(manifest["files"]) == sorted(p.name for p in six.iterdir() if p.name != "manifest.json")
    assert manifest["files"]["teacher.pt"]["bytes"] == 2000 and len(manifest["files"]["teacher.pt"]["crc32"]) == 8
    point = find(run_cfg(tmp_path))
    assert point.tag == tag(6) and point.saved == Layout(6, 2, 8, 1)
    assert stderr_lines(capsys) == []
    assert find(run_cfg(tmp_path, resume="none")) is None
    assert find(run_cfg(tmp_path / "fresh")) is None  # nothing saved yet: a fresh start


def _truncate(six: Path, ckpt_dir: Path):
    path = six / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _flip_a_byte(six: Path, ckpt_dir: Path):
    path = six / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the checksum tells


DAMAGE = {  # → what the line says, the tag resumed
    "truncated": (_truncate, "step00000006 (named by latest) has zero_pp_rank_1_mp_rank_00_optim_states.pt at 1666 "
                  "bytes, its manifest says 5000", 3),
    "missing per-rank file": (lambda six, _: (six / "data_rank1.json").unlink(), "step00000006 (named by latest) lacks "
                              "data_rank1.json", 3),
    "checksum": (_flip_a_byte, "step00000006 (named by latest) has mp_rank_00_model_states.pt not matching its checksum", 3),
    "no manifest": (lambda six, _: (six / "manifest.json").unlink(), "step00000006 (named by latest) has no manifest.json", 3),
    "latest is garbage": (lambda _, d: (d / "latest").write_bytes(b"\x00\xffgarbage\n"), "latest holds '\\x00", 6),
    "latest names nothing": (lambda _, d: (d / "latest").write_text(tag(9)), "step00000009 (named by latest) does not "
                             "exist; step00000006 has zero_pp_rank_1", 3),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_falls_back_to_the_previous_complete_checkpoint_in_one_line(tmp_path, capsys, damage):
    ckpt_dir = tmp_path / "checkpoints"
    fake_checkpoint(ckpt_dir, 3)
    six = fake_checkpoint(ckpt_dir, 6)
    spoil, said, resumed = DAMAGE[damage]
    spoil(six, ckpt_dir)
    if damage == "latest names nothing":
        _truncate(six, ckpt_dir)  # and the one before it is damaged too: the scan goes on, newest first
    verdicts = {find(run_cfg(tmp_path)).tag for _ in range(3)}  # every rank, any number of times: the same
    assert verdicts == {tag(resumed)}
    lines = stderr_lines(capsys)
    assert len(lines) == 3 and len(set(lines)) == 1, lines  # one line per call
    assert lines[0].startswith("checkpoint: ") and said in lines[0], lines[0]
    assert f"resuming from {tag(resumed)}" in lines[0]


def test_no_complete_checkpoint_left_is_one_line_and_exit_2(tmp_path, capsys):
    ckpt_dir = tmp_path / "checkpoints"
    three = fake_checkpoint(ckpt_dir, 3)
    (three / "manifest.json").unlink()
    six = fake_checkpoint(ckpt_dir, 6)
    _truncate(six, ckpt_dir)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find(run_cfg(tmp_path))
    assert cli.run(lambda: find(run_cfg(tmp_path)) and 0) == cli.USAGE_ERROR
    (line,) = stderr_lines(capsys)
    assert line.startswith("checkpoint error: ") and tag(6) in line and tag(3) in line
    assert "checkpoint.resume=none" in line and f"delete {ckpt_dir}" in line
    # a first save that never finished, no latest at all: the same verdict
    shutil.rmtree(ckpt_dir)
    fake_checkpoint(ckpt_dir, 3, latest=False)
    (ckpt_dir / tag(3) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="there is no latest file; step00000003 has no manifest.json"):
        find(run_cfg(tmp_path))


class FakeEngine:
    """engine.save_checkpoint's part of a save: DeepSpeed's files, one rank; `killed` stops it midway."""

    def __init__(self, killed: bool = False):
        self.killed = killed

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # the manifest comes first, then this project writes latest
        tag_dir = Path(save_dir) / tag
        assert not (tag_dir / "manifest.json").exists()
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4000))
        if self.killed:
            raise KeyboardInterrupt("killed mid-save")
        (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(6000))


def _save(ckpt_dir: Path, step: int, keep_last: int, killed: bool = False):
    save(ckpt_dir, Layout(step, 1, 8, 1), FakeEngine(killed), None, DataPosition(0, step, [8 * step]), keep_last)


def test_keep_last_never_deletes_the_last_complete_checkpoint_before_a_newer_one_is_complete(tmp_path, capsys):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2, keep_last=1)
    (ckpt_dir / tag(2) / "manifest.json").unlink()  # step 2: incomplete (its save "never finished")
    (ckpt_dir / "universal" / tag(2) / "zero").mkdir(parents=True)
    _save(ckpt_dir, 3, keep_last=2)
    assert check_complete(ckpt_dir / tag(3)) is None and (ckpt_dir / "latest").read_text() == tag(3)
    assert not (ckpt_dir / tag(2)).exists() and not (ckpt_dir / "universal" / tag(2)).exists()  # incomplete, older: gone
    with pytest.raises(KeyboardInterrupt):
        _save(ckpt_dir, 6, keep_last=1, killed=True)
    assert check_complete(ckpt_dir / tag(3)) is None and (ckpt_dir / "latest").read_text() == tag(3)
    assert "manifest.json" in check_complete(ckpt_dir / tag(6))
    assert find(run_cfg(tmp_path)).tag == tag(3)  # latest is complete: the newer, incomplete one is ignored
    _save(ckpt_dir, 4, keep_last=1)  # the resumed run's next save; step 6's folder (a later step) is left alone
    assert sorted(p.name for p in ckpt_dir.glob("step*")) == [tag(4), tag(6)]
    _save(ckpt_dir, 6, keep_last=2)  # overwrites the incomplete step 6 from scratch
    assert check_complete(ckpt_dir / tag(6)) is None and sorted(p.name for p in ckpt_dir.glob("step*")) == [tag(4), tag(6)]
    _save(ckpt_dir, 9, keep_last=2)  # keep_last counts complete checkpoints
    assert sorted(p.name for p in ckpt_dir.glob("step*")) == [tag(6), tag(9)]
    assert stderr_lines(capsys) == []


def test_each_rank_checksums_its_own_files_and_a_share_of_the_rest():
    files = [("data_rank0.json", 10), ("data_rank1.json", 10), ("layout.json", 5), ("mp_rank_00_model_states.pt", 900),
             ("teacher.pt", 800), ("teacher_shard_rank1.pt", 400), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 1000),
             ("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 1000)]
    shares = ckpt._share_out(files, 2)
    assert sorted(shares[0] + shares[1]) == sorted(name for name, _ in files)
    assert "data_rank1.json" in shares[1] and "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in shares[1]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shares[0]
    assert "mp_rank_00_model_states.pt" in shares[0] and "teacher.pt" in shares[1]  # largest first, least loaded
    assert sorted(ckpt._share_out(files, 1)[0]) == sorted(name for name, _ in files)


def test_export_picks_the_newest_complete_checkpoint_and_refuses_an_incomplete_one(tmp_path):
    from degla_scale.export import ExportError, resolve_tag_dir

    ckpt_dir = tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpt_dir, 3)
    six = fake_checkpoint(ckpt_dir, 6)
    assert resolve_tag_dir(tmp_path / "run") == six and resolve_tag_dir(ckpt_dir) == six
    _truncate(six, ckpt_dir)
    assert resolve_tag_dir(tmp_path / "run") == ckpt_dir / tag(3)
    with pytest.raises(ExportError, match="step00000006 is not a complete checkpoint") as info:
        resolve_tag_dir(six)
    assert "\n" not in str(info.value)
    (ckpt_dir / tag(3) / "data_rank1.json").unlink()
    with pytest.raises(ExportError, match="holds no complete checkpoint"):
        resolve_tag_dir(ckpt_dir)


def test_truncated_checkpoint_relaunch_resumes_from_the_previous_one_on_the_same_losses(tmp_path, shards):
    """A run stopped after step 6's checkpoint is the uninterrupted 9-step run's folder as it was then (step 9's
    checkpoint, final/ and the later log records gone); step 6's optimizer file is then cut to a third."""
    reference = tmp_path / "reference"
    done = train(shards, reference, 9)
    assert done.returncode == 0, done.stderr[-3000:]
    want = steps_of(reference)
    assert sorted(want) == list(range(1, 10))

    stopped = tmp_path / "stopped"
    shutil.copytree(reference, stopped, ignore=shutil.ignore_patterns("final", tag(9), "loss_curve.png"))
    (stopped / "checkpoints/latest").write_text(tag(6))
    kept = [r for r in records(reference) if r.get("step", 0) <= 6 and r.get("event") != "end"]
    (stopped / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    optim = next((stopped / "checkpoints" / tag(6)).glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 3])

    done = train(shards, stopped, 9)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if tag(6) in line]
    assert len(said) == 1 and f"has {optim.name} at" in said[0] and "resuming from step00000003" in said[0], done.stderr
    starts = [r for r in records(stopped) if r.get("event") == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == 3
    got = {}
    for r in records(stopped)[records(stopped).index(starts[1]):]:
        if "loss.total" in r:
            got[r["step"]] = r
    assert sorted(got) == list(range(4, 10))
    for step, r in got.items():
        assert r["sample_ids"] == want[step]["sample_ids"], f"step {step} saw different samples"
        for term in ("loss.total", "loss.clip", "loss.igc", "loss.tgc", "loss.distill"):
            assert r[term] == pytest.approx(want[step][term], rel=1e-4, abs=1e-6), (step, term)
    assert (stopped / "checkpoints/latest").read_text() == tag(9)
    assert check_complete(stopped / "checkpoints" / tag(6)) is None  # rewritten whole by the resumed run
