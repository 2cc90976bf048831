"""The MDS reader in one process: bad samples are counted and replaced (batches keep their size), and a
reader built from a saved position continues with exactly the samples the uninterrupted one yields."""
import dataclasses
import itertools

import pytest
import torch
from test_reader import jpeg

from degla_scale.data.mds import MDSReader, write_mds
from degla_scale.data.reader import DataPosition

K = 2


def _records(n):
    for i in range(n):
        negatives = [f"neg {i} {k}" for k in range(K)]
        record = {"key": f"s{i:03d}", "jpg": jpeg(i * 7 % 255), "caption": f"caption {i}",
                  "negatives": negatives, "types": ["swap_noun"] * K}
        if i == 5:
            record["caption"] = "  "  # (a corrupt JPEG cannot reach MDS: its jpeg column must open it to write it)
        if i == 9:
            record["negatives"] = negatives[:1]  # fewer negatives than K
        yield record


def _reader(path):
    return MDSReader(str(path), batch_size=4, num_negatives=K, num_workers=0, seed=0,
                     transform=lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float32),
                     tokenize=lambda texts: torch.zeros(len(texts), 3))


def test_bad_samples_are_counted_and_replaced(tmp_path):
    assert write_mds(tmp_path, _records(24)) == 24
    position = DataPosition()
    batches = list(itertools.islice(_reader(tmp_path).epoch(position), 6))
    keys = [k for b in batches for k in b.keys]
    assert all(b.images.shape[0] == 4 and b.tokens.shape[0] == 4 * (1 + K) for b in batches)
    assert position.rejected == {"empty_caption": 1, "too_few_negatives": 1}
    assert {"s005", "s009"}.isdisjoint(keys) and len(set(keys)) == 22  # the 22 good samples, two of them twice


def test_resume_from_a_saved_position_continues_the_same_samples(tmp_path):
    write_mds(tmp_path, (r for r in _records(40) if r["key"] not in ("s005", "s009")))
    position = DataPosition()
    full = [b.keys for b in itertools.islice(_reader(tmp_path).epoch(position), 9)]
    position = DataPosition()
    first = [b.keys for b in itertools.islice(_reader(tmp_path).epoch(position), 4)]
    saved = DataPosition.from_json(position.to_json())
    rest = [b.keys for b in itertools.islice(_reader(tmp_path).epoch(saved), 5)]
    assert first + rest == full


def test_sources_mix_by_weight(tmp_path):
    write_mds(tmp_path / "a", ({**r, "key": "a" + r["key"]} for r in _records(40) if r["key"] not in ("s005", "s009")))
    write_mds(tmp_path / "b", ({**r, "key": "b" + r["key"]} for r in _records(40) if r["key"] not in ("s005", "s009")))
    reader = MDSReader([str(tmp_path / "a"), str(tmp_path / "b")], weights=[3.0, 1.0], batch_size=4, num_negatives=K,
                       num_workers=0, seed=0, transform=lambda im: torch.zeros(1), tokenize=lambda t: torch.zeros(len(t), 1))
    keys = [k for b in itertools.islice(reader.epoch(DataPosition()), 19) for k in b.keys]
    assert sum(k.startswith("a") for k in keys) / len(keys) == pytest.approx(0.75, abs=0.05)  # streaming's proportions


def test_a_remote_source_is_downloaded_into_its_local_cache(tmp_path):
    """streaming's own download path, with a folder as the remote (its local downloader)."""
    write_mds(tmp_path / "remote", (r for r in _records(24) if r["key"] not in ("s005", "s009")))
    direct = [b.keys for b in itertools.islice(_reader(tmp_path / "remote").epoch(DataPosition()), 5)]
    cached = MDSReader([str(tmp_path / "cache")], remotes=[str(tmp_path / "remote")], batch_size=4, num_negatives=K,
                       num_workers=0, seed=0, transform=lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float32),
                       tokenize=lambda texts: torch.zeros(len(texts), 3))
    assert [b.keys for b in itertools.islice(cached.epoch(DataPosition()), 5)] == direct
    assert (tmp_path / "cache" / "index.json").is_file()


def test_jpeg_bytes_are_stored_as_they_are(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from streaming import LocalDataset

    rng = np.random.default_rng(0)
    original = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(original, format="JPEG", quality=97)
    write_mds(tmp_path, iter([{"key": "x", "jpg": original.getvalue(), "caption": "c", "negatives": [], "types": []}]))
    stored = LocalDataset(str(tmp_path))[0]["jpg"]
    assert np.array_equal(np.asarray(stored), np.asarray(Image.open(io.BytesIO(original.getvalue()))))  # not re-encoded


def _varied(n):
    """Records holding K, K+1 or K+3 negatives, as converted DeGLA records do."""
    for i in range(n):
        negatives = [f"n{i}/{k}" for k in range(K + (0, 1, 3)[i % 3])]
        yield {"key": f"s{i:03d}", "jpg": jpeg(i * 7 % 255), "caption": f"c{i}", "negatives": negatives, "types": []}


def _picks(path, pick, position, n):
    from test_reader import text_tokenize, texts_of

    reader = MDSReader(str(path), batch_size=4, num_negatives=K, num_workers=0, seed=3, negatives_pick=pick,
                       transform=lambda im: torch.zeros(1), tokenize=text_tokenize)
    out = {}
    for batch in itertools.islice(reader.epoch(position), n):
        texts = texts_of(batch)
        for i, key in enumerate(batch.keys):
            out[key] = texts[4 + i * K:4 + (i + 1) * K]
    return out


def test_negatives_pick_first_and_random_with_resume(tmp_path):
    write_mds(tmp_path, _varied(24))
    first = _picks(tmp_path, "first", DataPosition(), 6)
    assert len(first) == 24 and all(negs == [f"n{int(key[1:])}/{k}" for k in range(K)] for key, negs in first.items())
    position = DataPosition()
    epoch0 = _picks(tmp_path, "random", position, 6)
    after_epoch0 = dataclasses.replace(position, epoch=1, batches=0)  # as the trainer starts the next epoch
    epoch1 = _picks(tmp_path, "random", dataclasses.replace(after_epoch0), 6)
    assert epoch1.keys() == epoch0.keys()
    varied = [key for key in epoch0 if int(key[1:]) % 3]
    assert all(set(epoch0[k]) <= {f"n{int(k[1:])}/{i}" for i in range(K + 3)} for k in epoch0)
    assert sum(epoch0[k] != epoch1[k] for k in varied) >= len(varied) // 2
    position = dataclasses.replace(after_epoch0)
    head = _picks(tmp_path, "random", position, 2)
    tail = _picks(tmp_path, "random", DataPosition.from_json(position.to_json()), 4)
    assert {**head, **tail} == epoch1 and not head.keys() & tail.keys()
