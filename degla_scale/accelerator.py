"""Pick DeepSpeed's accelerator before DeepSpeed is imported anywhere (it reads DS_ACCELERATOR once)."""
from __future__ import annotations

import os


def configure() -> str:
    """Set DS_ACCELERATOR=cpu when there is no CUDA device (unless the user chose); return it."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def dist_backend() -> str:
    return "nccl" if configure() == "cuda" else "gloo"
