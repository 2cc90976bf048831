"""The training step's hot path: no host sync from our code outside logging steps, the teacher forward in
its own dtype, and uint8 batches normalised on the device.

The step runs in a subprocess (its own DeepSpeed process group). On CPU a sync cannot be observed, so the
probe counts the calls that force one (`.item()`, `.tolist()`, `bool()`, `float()`, `int()`, `.cpu()`,
`.numpy()` on a tensor) made from degla_scale/ or kernels/ during steps; with CUDA it also counts
`torch.cuda.set_sync_debug_mode("warn")` warnings raised from our files. DeepSpeed's own non-finite check
(bf16/fp16 `check_grad_overflow`) is outside our files and is what `bench_train_step.py` times.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from degla_scale.teacher import EMATeacher
from test_trainer import overrides

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, warnings, torch
from degla_scale.config import load_config
from degla_scale import trainer
OURS = (sys.argv[1] + "/degla_scale/", sys.argv[1] + "/kernels/")
run = trainer.setup(load_config("configs/tiny.yaml", [a for a in sys.argv[2:] if not a.startswith("--local_rank")]))
calls = []
def wrap(name):
    original = getattr(torch.Tensor, name)
    def recorded(self, *args, **kwargs):
        frame = sys._getframe(1)
        if frame.f_code.co_filename.startswith(OURS):
            calls.append(f"Tensor.{name} at {frame.f_code.co_filename.split('/')[-1]}:{frame.f_lineno}")
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, recorded)
for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
    wrap(name)
batches = run.reader.epoch(run.position)
trainer.train_step(run, batches)  # first step: lazy initialisation, autotuning
calls.clear()
if torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        terms, *_ = trainer.train_step(run, batches)
torch.cuda.is_available() and torch.cuda.set_sync_debug_mode("default")
step_calls = calls[:] + [f"sync warning at {w.filename}:{w.lineno}" for w in caught
                         if w.filename.startswith(OURS) and "synchroniz" in str(w.message)]
calls.clear()
trainer._log_record(run, terms, 1, 8, 1.0, [])  # a logging step reads values: the probe must see it
teacher = run.teacher
print(json.dumps({"step": step_calls, "log": calls[:], "input_dtype": str(run.input_dtype),
                  "teacher_dtype": str(next(teacher.forward_module.parameters()).dtype),
                  "batch_dtype": str(next(run.reader.epoch(run.position)).images.dtype)}))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_makes_no_host_sync_from_our_code(tmp_path, shards, precision):
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + PROBE)
    args = overrides(shards, tmp_path / "run", steps=6) + [f"zero.precision={precision}", "data.num_workers=0"]
    result = subprocess.run([sys.executable, str(probe), str(ROOT), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["step"] == [], f"host syncs in the step: {out['step']}"
    assert any("tolist" in c or "item" in c for c in out["log"]), "the probe sees a logging step's reads"
    assert out["batch_dtype"] == "torch.uint8"
    want = "torch.bfloat16" if precision == "bf16" else "torch.float32"
    assert out["input_dtype"] == out["teacher_dtype"] == want


def test_bf16_forward_copy_follows_the_fp32_ema_every_refresh():
    torch.manual_seed(0)
    student = torch.nn.Linear(4, 3)
    teacher = EMATeacher(student, 0.5, forward_dtype=torch.bfloat16, refresh_every=2)
    assert teacher.module.weight.dtype == torch.float32 and teacher.forward_module.weight.dtype == torch.bfloat16
    for step in range(1, 5):
        with torch.no_grad():
            student.weight.add_(1.0)
        teacher.update(student)
        ema_bf16 = teacher.module.weight.to(torch.bfloat16)
        if step % 2 == 0:
            assert torch.equal(teacher.forward_module.weight, ema_bf16)
        else:  # between refreshes the forward copy keeps the last refresh's weights
            assert not torch.equal(teacher.forward_module.weight, ema_bf16)
