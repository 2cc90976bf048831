import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import shared helpers from each other
if not torch.cuda.is_available():  # Triton kernels run on the CPU under the interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--run-long", action="store_true", help="also run the tests marked long (make test-long)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")
    config.addinivalue_line("markers", "long: more than ~40 s on a 2-core CPU and covered in part by a shorter "
                                       "test; skipped unless --run-long, which keeps `make test` under 30 minutes")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config, items):
    skip_long = pytest.mark.skip(reason="long: run with --run-long (make test-long)")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "long" in item.keywords and not config.getoption("--run-long"):
            item.add_marker(skip_long)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


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


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory):
    """Uninterrupted 2-rank runs of 5 steps (checkpoints every 2) through the DeepSpeed launcher, one per shard
    format, on shards of their own (the same samples as `shards`), built on first use and shared by the
    resume tests of every module: get(fmt) → (the data overrides, the run's records by step)."""
    from degla_scale.data.synthetic import write_shards
    from test_trainer import launch_two_ranks

    root, runs, ports = tmp_path_factory.mktemp("reference"), {}, iter(range(29551, 29560))

    def get(fmt: str) -> tuple[list[str], dict]:
        data_dir = root / f"finetune_{fmt}"
        data = [f"data.format={fmt}", f"data.train_shards={data_dir}"]
        if fmt not in runs:
            write_shards(data_dir, "finetune", seed=0, num_samples=96, num_negatives=2, shard_size=8, workers=1, fmt=fmt)
            runs[fmt] = launch_two_ranks(data_dir, root / f"run_{fmt}", next(ports), *data, "checkpoint.every=2", steps=5)
        return data, runs[fmt]
    return get
