"""webdataset reader: bad samples skipped and counted, ranks disjoint, mid-epoch resume exact."""
import io
import itertools
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from degla_scale.data.reader import DataError, DataPosition, ShardReader, decode_sample, list_shards

K = 2


def jpeg(colour):
    buf = io.BytesIO()
    Image.new("L", (8, 8), colour).save(buf, format="JPEG")  # grayscale on purpose: decode must give RGB
    return buf.getvalue()


def write_shards(folder, num_shards=4, per_shard=6, bad=(), prefix="s"):
    """Samples {prefix}{shard}_{i}; keys in `bad` get a corrupt image or the wrong number of negatives."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{prefix}{s}_{i}"
                negatives = [f"not {key} {k}" for k in range(K)]
                image = jpeg(10 * i)
                if key in bad and bad[key] == "corrupt":
                    image = b"\xff\xd8 this is not a jpeg"
                if key in bad and bad[key] == "negatives":
                    negatives = negatives[:1]
                sink.write({"__key__": key, "jpg": image, "txt": f"caption {key}", "json": {"negatives": negatives}})
    return folder


def fake_tokenize(texts):
    return torch.tensor([[len(t)] for t in texts])


def transform(image):
    assert image.mode == "RGB"
    return torch.zeros(3, 4, 4)


def reader(folder, rank=0, world=1, workers=0, batch=4, shuffle=3):
    return ShardReader(list_shards(str(folder)), batch_size=batch, num_negatives=K, num_workers=workers,
                       shuffle_buffer=shuffle, seed=1, rank=rank, world=world, transform=transform, tokenize=fake_tokenize)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_bad_samples_skipped_and_counted(tmp_path):
    folder = write_shards(tmp_path / "d", bad={"s0_1": "corrupt", "s2_3": "negatives", "s3_0": "corrupt"})
    position = DataPosition()
    batches = take(reader(folder).epoch(position), 5)  # 20 good samples of the 21 the first pass holds
    keys = [k for b in batches for k in b.keys]
    assert not {"s0_1", "s2_3", "s3_0"} & set(keys)
    assert position.rejected == {"corrupt_image": 2, "wrong_negatives": 1}
    b = batches[0]
    assert b.images.shape == (4, 3, 4, 4) and b.tokens.shape == (4 * (1 + K), 1)


def test_batch_layout_positives_then_negatives_sample_major(tmp_path):
    folder = write_shards(tmp_path / "d", num_shards=1, per_shard=4)
    texts = []
    r = ShardReader(list_shards(str(folder)), batch_size=2, num_negatives=K, num_workers=0, shuffle_buffer=0,
                    seed=0, rank=0, world=1, transform=transform, tokenize=lambda t: texts.append(t) or torch.zeros(len(t), 1))
    batch = next(r.epoch(DataPosition()))
    a, b = batch.keys
    assert texts[0] == [f"caption {a}", f"caption {b}", f"not {a} 0", f"not {a} 1", f"not {b} 0", f"not {b} 1"]


def test_ranks_see_disjoint_samples(tmp_path):
    folder = write_shards(tmp_path / "d", num_shards=4)
    seen = []
    for rank in range(2):
        seen.append({k for b in take(reader(folder, rank, 2).epoch(DataPosition()), 2) for k in b.keys})
    assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_has_no_repeats(tmp_path, workers):
    """The shuffle buffer is emptied at the end of each pass: reading exactly one pass gives every sample
    once, even with a buffer larger than a worker's share."""
    folder = write_shards(tmp_path / "d", num_shards=4, per_shard=6)
    keys = [k for b in take(reader(folder, workers=workers, shuffle=20).epoch(DataPosition()), 6) for k in b.keys]
    assert sorted(keys) == sorted(f"s{s}_{i}" for s in range(4) for i in range(6))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(tmp_path, workers):
    folder = write_shards(tmp_path / "d", num_shards=4, per_shard=8, bad={"s1_2": "corrupt"})
    full = [b.keys for b in take(reader(folder, workers=workers, batch=3).epoch(DataPosition()), 9)]

    position = DataPosition()
    first = [b.keys for b in take(reader(folder, workers=workers, batch=3).epoch(position), 5)]
    saved = json.loads(json.dumps(position.to_json()))  # as a checkpoint would store it
    resumed = DataPosition.from_json(saved)
    rest = [b.keys for b in take(reader(folder, workers=workers, batch=3).epoch(resumed), 4)]
    assert first + rest == full


def test_too_few_shards_is_one_clear_error(tmp_path):
    folder = write_shards(tmp_path / "d", num_shards=2)
    with pytest.raises(DataError, match="2 shards for 2 ranks × 2 workers"):
        reader(folder, world=2, workers=2)


def test_decode_sample_errors():
    with pytest.raises(ValueError, match="missing 'jpg'"):
        decode_sample({"txt": b"x"}, 0)
    with pytest.raises(ValueError, match="empty caption"):
        decode_sample({"jpg": jpeg(0), "txt": b"  "}, 0)


def test_sources_mix_by_weight_and_resume_exactly(tmp_path):
    big = list_shards(str(write_shards(tmp_path / "a", num_shards=4, per_shard=25, prefix="a")))
    small = list_shards(str(write_shards(tmp_path / "b", num_shards=4, per_shard=25, prefix="b")))

    def mixed():
        return ShardReader([big, small], weights=[3.0, 1.0], batch_size=4, num_negatives=K, num_workers=0,
                           shuffle_buffer=3, seed=1, rank=0, world=1, transform=transform, tokenize=fake_tokenize)

    position = DataPosition()
    keys = [b.keys for b in itertools.islice(mixed().epoch(position), 40)]
    share_a = sum(k.startswith("a") for ks in keys for k in ks) / 160
    assert 0.65 < share_a < 0.85  # 3:1 by weight (binomial sd ≈ 0.034 for 160 draws)
    position = DataPosition()
    first = [b.keys for b in itertools.islice(mixed().epoch(position), 15)]
    saved = DataPosition.from_json(position.to_json())
    assert first + [b.keys for b in itertools.islice(mixed().epoch(saved), 25)] == keys
