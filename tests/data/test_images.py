"""Training images: uint8 from the loader + normalisation on the device = open_clip's preprocess, and
JPEG decoding at reduced size changes pixels by no more than resampling does."""
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from degla_scale.config import load_config
from degla_scale.data.images import DeviceNormalize
from degla_scale.data.samples import decode_rgb
from degla_scale.models import image_transform, train_image_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_data import photo_jpeg  # noqa: E402  (smooth colour noise with grain, JPEG q90)


@pytest.fixture(scope="module")
def vitl():
    return load_config("configs/vitl14.yaml").model  # 224 px, bicubic, OpenAI mean/std


def test_uint8_then_device_normalize_equals_open_clip_preprocess(vitl):
    image = decode_rgb(photo_jpeg(np.random.default_rng(1), 331, 257))
    ours = train_image_transform(vitl)
    u8 = ours(image)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 224, 224)
    want = image_transform(vitl)(image)
    got = DeviceNormalize(ours.mean, ours.std, torch.device("cpu"))(u8[None], torch.float32)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(640, 480), (1024, 768)])
def test_draft_decode_is_within_resampling_tolerance(vitl, size):
    jpeg = photo_jpeg(np.random.default_rng(2), *size)
    transform = train_image_transform(vitl)
    drafted = decode_rgb(jpeg, transform.draft_size)
    assert min(drafted.size) >= 224 and drafted.size[0] < size[0], "decoded at 1/2 or less, never below the crop"
    full, draft = transform(decode_rgb(jpeg)).float(), transform(drafted).float()
    diff = (full - draft).abs().flatten()
    assert diff.mean() <= 1.5 and diff.quantile(0.99) <= 6, (diff.mean(), diff.quantile(0.99))


def test_small_or_non_jpeg_images_decode_exactly_as_before(vitl):
    transform = train_image_transform(vitl)
    small = photo_jpeg(np.random.default_rng(3), 400, 300)  # under 2 × 224 on its short side: no reduction
    assert torch.equal(transform(decode_rgb(small, 224)), transform(decode_rgb(small)))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    assert decode_rgb(png, 224).size == (800, 600)  # draft is a JPEG-only shortcut


def test_reader_batches_are_uint8(shards):
    from degla_scale.data.reader import DataPosition, ShardReader, list_shards

    tiny = load_config("configs/tiny.yaml").model
    reader = ShardReader(list_shards(str(shards)), batch_size=4, num_negatives=2, num_workers=0, shuffle_buffer=8,
                         seed=0, rank=0, world=1, transform=train_image_transform(tiny), tokenize=lambda t: torch.zeros(len(t), 1))
    batch = next(reader.epoch(DataPosition()))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 32, 32)
    assert batch.pin_memory is not None  # DataLoader(pin_memory=True) pins a Batch through this method
