"""webdataset reader: bad samples skipped and counted, ranks disjoint, mid-epoch resume exact."""
import io
import itertools
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from degla_scale.data.reader import DataError, DataPosition, ShardReader, decode_sample, list_shards
from degla_scale.data.samples import REASONS, Rejected

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
    assert position.rejected == {"unreadable_image": 2, "too_few_negatives": 1}
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


def test_decode_sample_rejects_with_the_fixed_reasons():
    cases = [({"txt": b"x"}, 0, "missing_image"), ({"jpg": jpeg(0), "txt": b"  "}, 0, "empty_caption"),
             ({"jpg": b"junk", "txt": b"x"}, 0, "unreadable_image"),
             ({"jpg": jpeg(0), "txt": b"x", "json": b"[1]"}, 0, "malformed_record"),
             ({"jpg": jpeg(0), "txt": b"x", "json": b'{"negatives": ["y"]}'}, 2, "too_few_negatives"),
             ({"jpg": jpeg(0), "txt": b"x", "json": b'{"negatives": ["y", " X "]}'}, 2, "negative_equals_positive")]
    for sample, k, reason in cases:
        with pytest.raises(Rejected) as info:
            decode_sample(sample, k)
        assert info.value.reason == reason and reason in REASONS, sample


def text_tokenize(texts):
    """Each text as its UTF-8 bytes in a fixed-width row, so a test can read the batch's captions back."""
    return torch.tensor([list(t.encode().ljust(24, b"\0")) for t in texts], dtype=torch.uint8)


def texts_of(batch):
    return [bytes(row.tolist()).rstrip(b"\0").decode() for row in batch.tokens]


def write_varied_shards(folder, num_shards=4, per_shard=6):
    """Samples holding K, K+1 or K+3 negatives ("n{key}/{k}"), as converted DeGLA records do."""
    folder.mkdir(parents=True)
    for s in range(num_shards):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                key = f"s{s}_{i}"
                negatives = [f"n{key}/{k}" for k in range(K + (0, 1, 3)[i % 3])]
                sink.write({"__key__": key, "jpg": jpeg(10 * i), "txt": f"c{key}", "json": {"negatives": negatives}})
    return folder


def picks(folder, pick, position, n, workers=0):
    """The K negatives each sample of the next n batches got: {key: [negatives]}."""
    r = ShardReader(list_shards(str(folder)), batch_size=3, num_negatives=K, num_workers=workers, shuffle_buffer=4,
                    seed=7, rank=0, world=1, transform=transform, tokenize=text_tokenize, negatives_pick=pick)
    out = {}
    for batch in take(r.epoch(position), n):
        texts = texts_of(batch)
        for i, key in enumerate(batch.keys):
            assert texts[i] == f"c{key}"
            out[key] = texts[len(batch.keys) + i * K:len(batch.keys) + (i + 1) * K]
    return out


def test_negatives_pick_first_takes_the_first_k(tmp_path):
    folder = write_varied_shards(tmp_path / "d")
    got = picks(folder, "first", DataPosition(), 8)
    assert len(got) == 24 and all(negs == [f"n{key}/{k}" for k in range(K)] for key, negs in got.items())


@pytest.mark.parametrize("workers", [0, 2])
def test_negatives_pick_random_differs_by_epoch_and_resumes_exactly(tmp_path, workers):
    folder = write_varied_shards(tmp_path / "d")
    epoch0 = picks(folder, "random", DataPosition(epoch=0), 8, workers)
    epoch1 = picks(folder, "random", DataPosition(epoch=1), 8, workers)
    assert epoch0.keys() == epoch1.keys() and len(epoch0) == 24
    for key, negs in epoch0.items():
        held = K + (0, 1, 3)[int(key.split("_")[1]) % 3]
        assert len(set(negs)) == K and set(negs) <= {f"n{key}/{k}" for k in range(held)}
    varied = [key for key in epoch0 if int(key.split("_")[1]) % 3]
    assert sum(epoch0[k] != epoch1[k] for k in varied) >= len(varied) // 2  # a draw of K of 3 or 5, in order
    assert any(epoch0[k] != [f"n{k}/{i}" for i in range(K)] for k in varied)  # not simply the first K
    position = DataPosition(epoch=1)
    first = picks(folder, "random", position, 3, workers)
    rest = picks(folder, "random", DataPosition.from_json(json.loads(json.dumps(position.to_json()))), 5, workers)
    assert {**first, **rest} == epoch1 and not first.keys() & rest.keys()


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
