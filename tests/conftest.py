import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import shared helpers from each other
if not torch.cuda.is_available():  # Triton kernels run on the CPU under the interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Small fine-tuning shards shared by the trainer and checkpoint tests (96 samples, K=2, 12 shards of 8).
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from degla_scale.data.synthetic import write_shards

    out = tmp_path_factory.mktemp("data") / "finetune"
    write_shards(out, "finetune", seed=0, num_samples=96, num_negatives=2, shard_size=8, workers=1)
    return out


@pytest.fixture(scope="module")
def mds_shards(tmp_path_factory):
    from degla_scale.data.synthetic import write_shards

    out = tmp_path_factory.mktemp("data") / "finetune_mds"
    write_shards(out, "finetune", seed=0, num_samples=96, num_negatives=2, shard_size=8, workers=1, fmt="mds")
    return out
