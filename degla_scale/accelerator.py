"""Pick DeepSpeed's accelerator before DeepSpeed is imported anywhere (it reads DS_ACCELERATOR once)."""
from __future__ import annotations

import importlib
import os


def configure() -> str:
    """Set DS_ACCELERATOR=cpu when there is no CUDA device (unless the user chose); return it."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def dist_backend() -> str:
    """The process-group backend; on CPU also stops DeepSpeed compiling its shared-memory op."""
    if configure() == "cuda":
        return "nccl"
    # DeepSpeed JIT-compiles a shared-memory all-reduce (~40 s with gcc, once per machine) when its
    # comm backend starts; only tensor-parallel inference calls it, training on CPU runs on gloo.
    # (by module path: `import deepspeed.comm.torch as m` yields plain torch, re-exported by deepspeed.comm)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_comm_torch, "build_shm_op"):
        ds_comm_torch.build_shm_op = lambda: None
    return "gloo"
