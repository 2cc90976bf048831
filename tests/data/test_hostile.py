"""Hostile and damaged data on both readers: each bad input is decoded correctly or skipped and counted under
one of samples.REASONS, and after one pass every written sample is used or counted (used + rejected ==
written); a seeded fuzz of flipped bytes and cuts neither crashes nor hangs; the reject budget stops a run
with one line.

Shards are written by the project's writers (reader.write_wds, mds.write_mds) and then damaged in place.
Two inputs cannot come out of write_mds, whose jpeg column holds JPEG only: a 16-bit PNG and a PNG bomb
reach MDS through a streaming writer whose image column is plain `bytes` (a foreign MDS dataset), which the
MDS reader decodes the same way."""
import contextlib
import io
import itertools
import json
import random
import signal
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from degla_scale.data.images import TrainImageTransform
from degla_scale.data.mds import COLUMNS, MDSReader, write_mds
from degla_scale.data.reader import DataError, DataPosition, ShardReader, list_shards, write_wds
from degla_scale.data.rejects import check_reject_budget, reject_totals
from degla_scale.data.samples import REASONS, sample_crc

K, SIDE = 2, 16
TRANSFORM = TrainImageTransform(Compose([Resize(SIDE, interpolation=InterpolationMode.BICUBIC), CenterCrop(SIDE),
                                         ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3)]), SIDE, (0.5,) * 3, (0.5,) * 3)


def encode(image: Image.Image, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def grey(i: int) -> int:
    return 20 + 10 * i


def records(prefix: str, n: int = 8, **images):
    """n samples {prefix}{i:02d}: a grey 8×8 JPEG of grey(i), caption, K negatives; `images` replaces some
    samples' image bytes, by index (i2=... → sample 2)."""
    for i in range(n):
        key = f"{prefix}{i:02d}"
        jpg = images.get(f"i{i}", encode(Image.new("L", (8, 8), grey(i))))
        yield {"key": key, "jpg": jpg, "caption": f"caption {key}", "negatives": [f"not {key} {k}" for k in range(K)],
               "types": ["swap_noun"] * K}


def text_tokenize(texts):
    return torch.tensor([list(t.encode().ljust(24, b"\0")) for t in texts], dtype=torch.uint8)


def wds_dir(folder: Path, shards: list[list[dict]], manifest: bool = False) -> Path:
    folder.mkdir(parents=True)
    for s, recs in enumerate(shards):
        write_wds(folder / f"shard-{s:06d}.tar", recs)
    if manifest:  # as degla_scale/data/convert.py writes it
        (folder / "manifest.json").write_text(json.dumps(
            {"format": "wds", "shard_samples": {f"shard-{s:06d}.tar": len(r) for s, r in enumerate(shards)}}))
    return folder


def wds_pass(folder: Path, batch_size=4, workers=0):
    """One pass of the webdataset reader → (used keys, images by key, texts by key, position)."""
    reader = ShardReader(list_shards(str(folder)), batch_size=batch_size, num_negatives=K, num_workers=workers,
                         shuffle_buffer=3, seed=0, rank=0, world=1, transform=TRANSFORM, tokenize=text_tokenize, passes=1)
    position = DataPosition()
    return collect(reader.epoch(position), position)


def mds_pass(folder: Path, written: int, batch_size=4):
    """One epoch of the MDS reader (`written` a multiple of the batch) → (used keys, images, texts, position)."""
    reader = MDSReader(str(folder), batch_size=batch_size, num_negatives=K, num_workers=0, seed=0, transform=TRANSFORM,
                       tokenize=text_tokenize)
    position = DataPosition()
    return collect(itertools.islice(reader.epoch(position), written // batch_size), position)


def collect(batches, position):
    keys, images, texts = [], {}, {}
    with deadline(60):
        for batch in batches:
            rows = [bytes(r.tolist()).rstrip(b"\0").decode() for r in batch.tokens]
            b = len(batch.keys)
            for i, key in enumerate(batch.keys):
                keys.append(key)
                images[key] = batch.images[i]
                texts[key] = [rows[i]] + rows[b + i * K:b + (i + 1) * K]
    return keys, images, texts, position


@contextlib.contextmanager
def deadline(seconds: int):
    def expire(*_):
        raise TimeoutError(f"the reader did not finish one pass within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def patch(path: Path, old: bytes, new: bytes) -> None:
    """Replace the one occurrence of `old` in the file by `new` (same length: sizes and offsets stay)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1, (path, old)
    path.write_bytes(data.replace(old, new))


def mds_file(folder: Path) -> Path:
    files = sorted(folder.glob("**/*.mds"))
    assert files, folder
    return files[0]


# ---------------------------------------------------------------- hostile images


def cmyk_jpeg() -> bytes:
    return encode(Image.new("RGB", (SIDE, SIDE), (200, 30, 60)).convert("CMYK"))


def png16() -> bytes:
    """16-bit grayscale (mode I;16): pixel (r, c) holds v·257, v = 16r + c, so the 8-bit image holds v."""
    values = (np.arange(SIDE * SIDE, dtype=np.uint16).reshape(SIDE, SIDE) * 257).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width×height black pixels, a few kB compressed."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """An 8×8 JPEG whose frame header claims width×height (PIL checks its limit on the header)."""
    data = bytearray(encode(Image.new("L", (8, 8), 99)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def one_pixel() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 200, 90)))


def assert_colour(image_3HW: torch.Tensor, rgb, tol=8):
    assert image_3HW.dtype == torch.uint8 and image_3HW.shape == (3, SIDE, SIDE)
    diff = (image_3HW.int() - torch.tensor(rgb).view(3, 1, 1)).abs().max().item()
    assert diff <= tol, (image_3HW[:, 0, 0].tolist(), rgb)


def test_images_decode_correctly_on_both_readers(tmp_path):
    """1×1, CMYK and 16-bit grayscale images are used, with the right pixels (16-bit scaled to 8 bits, not
    clipped to white): 8 of 8 used, nothing rejected."""
    images = {"i1": one_pixel(), "i2": cmyk_jpeg(), "i3": png16()}
    keys, got, _, position = wds_pass(wds_dir(tmp_path / "w", [list(records("w", **images))]))
    assert sorted(keys) == [f"w{i:02d}" for i in range(8)] and position.rejected == {}
    assert position.samples_read == 8
    expected_16 = torch.arange(SIDE * SIDE, dtype=torch.uint8).view(SIDE, SIDE).expand(3, SIDE, SIDE)
    assert_colour(got["w01"], (10, 200, 90))
    assert_colour(got["w02"], (200, 30, 60))
    assert torch.equal(got["w03"], expected_16)

    # MDS: write_mds stores JPEGs as they are (1×1, CMYK); a 16-bit PNG comes through a `bytes` column
    write_mds(tmp_path / "m", records("m", i1=one_pixel(), i2=cmyk_jpeg()))
    keys, got, _, position = mds_pass(tmp_path / "m", 8)
    assert sorted(set(keys)) == [f"m{i:02d}" for i in range(8)] and position.rejected == {}
    assert_colour(got["m01"], (10, 200, 90))
    assert_colour(got["m02"], (200, 30, 60))
    foreign_mds(tmp_path / "f", records("f", i3=png16()))
    keys, got, _, position = mds_pass(tmp_path / "f", 8)
    assert sorted(set(keys)) == [f"f{i:02d}" for i in range(8)] and position.rejected == {}
    assert torch.equal(got["f03"], expected_16)


def foreign_mds(folder: Path, recs) -> None:
    """An MDS dataset written with streaming's own writer, image column `bytes` (any image format)."""
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={**COLUMNS, "jpg": "bytes"}) as sink:
        for r in recs:
            sink.write({**r, "crc": sample_crc(r["key"], r["jpg"], r["caption"].encode(), r["negatives"])})


def test_decompression_bombs_are_rejected_not_decoded(tmp_path, monkeypatch):
    """Over Image.MAX_IMAGE_PIXELS: rejected as image_too_large, from the header, both over 2× the limit (PIL
    raises) and between 1× and 2× (PIL only warns): 6 used, 2 rejected."""
    limit = Image.MAX_IMAGE_PIXELS
    assert 9000 * 10000 > limit and 20000 * 20000 > 2 * limit
    folder = wds_dir(tmp_path / "w", [list(records("w", i2=png_bomb(20000, 20000), i5=jpeg_claiming(10000, 9000)))])
    keys, _, _, position = wds_pass(folder)
    assert len(keys) == 6 and position.rejected == {"image_too_large": 2} and position.samples_read == 8

    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)  # write_mds opens each image to store it
        write_mds(tmp_path / "m", records("m", i2=jpeg_claiming(20000, 20000), i5=jpeg_claiming(10000, 9000)))
    keys, _, _, position = mds_pass(tmp_path / "m", 8)
    assert len(set(keys)) == 6 and position.rejected == {"image_too_large": 2} and position.samples_read == 8
    foreign_mds(tmp_path / "f", records("f", i2=png_bomb(20000, 20000)))
    keys, _, _, position = mds_pass(tmp_path / "f", 8)
    assert len(set(keys)) == 7 and position.rejected == {"image_too_large": 1}


@pytest.mark.parametrize("case,old,new,reason", [
    ("non-UTF-8 caption", b"caption x03", b"\xffaption x03", "caption_not_utf8"),
    ("malformed negatives json", b'["not x04 0"', b'{"not x04 0"', "unreadable_negatives"),
    ("flipped image byte", None, None, "checksum_mismatch"),
])
def test_bad_text_or_bytes_one_sample_rejected_on_both_readers(tmp_path, case, old, new, reason):
    """One bad sample of 8: 7 used, 1 counted under its reason, with the shard as the example."""
    recs = list(records("x"))
    folder = wds_dir(tmp_path / "w", [recs])
    shard = folder / "shard-000000.tar"
    write_mds(tmp_path / "m", iter(recs))
    for path in (shard, mds_file(tmp_path / "m")):
        if old is None:  # a byte inside sample 6's JPEG data (entropy-coded: PIL would decode it silently)
            jpg = recs[6]["jpg"]
            sos = jpg.index(b"\xff\xda")
            at = sos + 2 + int.from_bytes(jpg[sos + 2:sos + 4], "big")  # the first entropy-coded byte
            old, new = jpg[at - 6:], jpg[at - 6:at] + bytes([jpg[at] ^ 0x10]) + jpg[at + 1:]
            patch(path, old, new)
            old = None
        else:
            patch(path, old, new)
    keys, _, _, position = wds_pass(folder)
    assert len(keys) == 7 and position.rejected == {reason: 1}, case
    assert position.reject_examples == {reason: str(shard)} and position.samples_read == 8
    keys, _, _, position = mds_pass(tmp_path / "m", 8)
    assert len(set(keys)) == 7 and position.rejected == {reason: 1}, case
    assert position.reject_examples == {reason: str(mds_file(tmp_path / "m"))} and position.samples_read == 8


# ---------------------------------------------------------------- damaged shards


def wds_sample_ends(shard: Path) -> list[int]:
    """The byte where each sample's last member ends, from the intact shard."""
    ends = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            if not m.name.startswith("__"):
                ends[m.name.split(".")[0]] = m.offset_data + m.size
    return sorted(ends.values())


def mds_sample_ends(path: Path) -> list[int]:
    data = path.read_bytes()
    n = struct.unpack("<I", data[:4])[0]
    return list(struct.unpack(f"<{n + 1}I", data[4:8 + 4 * n]))[1:]


def test_truncated_shard_counts_the_samples_after_the_cut(tmp_path):
    """A shard cut in half: the samples wholly before the cut are used, the rest counted as damaged_shard."""
    shards = [list(records(f"t{s}")) for s in range(3)]
    folder = wds_dir(tmp_path / "w", shards)
    shard = folder / "shard-000001.tar"
    cut = shard.stat().st_size // 2
    whole = sum(end <= cut for end in wds_sample_ends(shard))
    shard.write_bytes(shard.read_bytes()[:cut])
    keys, _, _, position = wds_pass(folder)
    assert 0 < whole < 8 and len(keys) == 16 + whole and len(set(keys)) == len(keys)
    assert position.rejected == {"damaged_shard": 8 - whole}, whole
    assert position.reject_examples == {"damaged_shard": str(shard)} and position.samples_read == 24

    write_mds(tmp_path / "m", itertools.chain(*shards), shard_bytes=3000)
    files = sorted((tmp_path / "m").glob("*.mds"))
    assert len(files) >= 3
    path = files[1]
    n_in = len(mds_sample_ends(path))
    cut = path.stat().st_size // 2
    whole = sum(end <= cut for end in mds_sample_ends(path))
    path.write_bytes(path.read_bytes()[:cut])
    keys, _, _, position = mds_pass(tmp_path / "m", 24)
    assert 0 < whole < n_in and len(set(keys)) == 24 - (n_in - whole)
    assert position.rejected == {"damaged_shard": n_in - whole} and position.samples_read == 24


@pytest.mark.parametrize("manifest", [True, False])
def test_zero_byte_shard(tmp_path, manifest):
    """A zero-byte shard: with manifest.json's per-shard counts its 8 samples are counted; without them
    (shards made elsewhere) its own count is gone with it, and the event counts 1."""
    folder = wds_dir(tmp_path / "w", [list(records(f"z{s}")) for s in range(3)], manifest=manifest)
    (folder / "shard-000002.tar").write_bytes(b"")
    keys, _, _, position = wds_pass(folder)
    assert len(keys) == 16 and position.rejected == {"damaged_shard": 8 if manifest else 1}
    assert position.samples_read == 16 + (8 if manifest else 1)
    if manifest:
        write_mds(tmp_path / "m", itertools.chain(*(records(f"z{s}") for s in range(3))), shard_bytes=3000)
        files = sorted((tmp_path / "m").glob("*.mds"))
        n_in = len(mds_sample_ends(files[0]))
        files[0].write_bytes(b"")
        keys, _, _, position = mds_pass(tmp_path / "m", 24)
        assert len(set(keys)) == 24 - n_in and position.rejected == {"damaged_shard": n_in}


def test_a_slot_with_only_damaged_shards_raises_instead_of_hanging(tmp_path):
    folder = wds_dir(tmp_path / "w", [list(records(f"e{s}")) for s in range(2)])
    for shard in folder.glob("*.tar"):
        shard.write_bytes(b"")
    reader = ShardReader(list_shards(str(folder)), batch_size=4, num_negatives=K, num_workers=0, shuffle_buffer=3,
                         seed=0, rank=0, world=1, transform=TRANSFORM, tokenize=text_tokenize)
    with deadline(30), pytest.raises(DataError, match="passes over its shards .* without one usable sample"):
        next(reader.epoch(DataPosition()))


# ---------------------------------------------------------------- fuzz


def damage(path: Path, rng: random.Random, action: str) -> None:
    data = bytearray(path.read_bytes())
    if action == "cut":
        data = data[:rng.randrange(len(data))]
    elif action == "flip":
        for at in rng.sample(range(len(data)), rng.randint(1, 64)):
            data[at] ^= rng.randrange(1, 256)
    elif action == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


ACTIONS = ["cut", "flip", "flip", "empty", "none", "cut", "flip", "none"]


def check_one_pass(written: dict, keys, images, texts, position, distinct_only: bool):
    """Every written sample used once (MDS: its place in a batch may be refilled by a repeat of a good one) or
    counted; every used sample intact (pixels, caption, negatives)."""
    used = Counter(keys)
    if not distinct_only:
        assert max(used.values(), default=1) == 1
    assert set(used) <= set(written)
    assert len(used) + sum(position.rejected.values()) == len(written), (len(used), position.rejected)
    assert set(position.rejected) <= set(REASONS)
    for key in used:
        i = int(key[-2:])
        assert_colour(images[key], (grey(i),) * 3, tol=3)
        assert texts[key] == [f"caption {key}"] + [f"not {key} {k}" for k in range(K)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_flips_and_cuts_neither_crash_nor_hang_and_count_every_sample(tmp_path, seed):
    rng = random.Random(seed)
    shards = [list(records(f"f{s}")) for s in range(8)]
    written = {r["key"] for recs in shards for r in recs}
    folder = wds_dir(tmp_path / "w", shards, manifest=True)  # a flip in a shard's first header loses its own count
    actions = rng.sample(ACTIONS, len(ACTIONS))
    for shard, action in zip(sorted(folder.glob("*.tar")), actions):
        damage(shard, rng, action)
    check_one_pass(written, *wds_pass(folder, batch_size=3, workers=2 if seed == 0 else 0), distinct_only=False)

    write_mds(tmp_path / "m", itertools.chain(*shards), shard_bytes=3000)
    for path, action in zip(sorted((tmp_path / "m").glob("*.mds")), actions):
        damage(path, rng, action)
    check_one_pass(written, *mds_pass(tmp_path / "m", 64), distinct_only=True)


# ---------------------------------------------------------------- the budget


def test_reject_budget_under_it_passes():
    check_reject_budget({}, 0, {}, 0.01)
    check_reject_budget({"unreadable_image": 10}, 1000, {"unreadable_image": "/d/a.tar"}, 0.01)  # exactly 1%
    check_reject_budget({"damaged_shard": 500}, 1000, {}, 1.0)  # 1 = never stop


def test_reject_budget_over_it_raises_one_line_naming_fraction_reasons_and_a_shard():
    with pytest.raises(DataError) as info:
        check_reject_budget({"unreadable_image": 10, "damaged_shard": 20, "empty_caption": 0}, 960,
                            {"unreadable_image": "/d/b.tar", "damaged_shard": "/d/x.tar"}, 0.01)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("3.12% of 960 samples read were rejected (> data.max_rejected_fraction=0.01)")
    assert "damaged_shard 20, unreadable_image 10; e.g. shard /d/x.tar" in message and "empty_caption" not in message
    assert message.endswith("fix or remake those shards, or raise data.max_rejected_fraction")


def test_reject_budget_from_a_damaged_run_and_position_json(tmp_path):
    folder = wds_dir(tmp_path / "w", [list(records(f"b{s}")) for s in range(3)], manifest=True)
    (folder / "shard-000001.tar").write_bytes(b"")
    *_, position = wds_pass(folder)
    saved = json.loads(json.dumps(position.to_json()))
    assert saved["samples_read"] == 24 and saved["reject_examples"] == {"damaged_shard": str(folder / "shard-000001.tar")}
    ranks = [DataPosition.from_json(saved), DataPosition(samples_read=76)]
    assert reject_totals(ranks) == ({"damaged_shard": 8}, 100, {"damaged_shard": str(folder / "shard-000001.tar")})
    check_reject_budget(*reject_totals(ranks), max_fraction=0.1)
    with pytest.raises(DataError, match=r"^8% of 100 samples read .* damaged_shard 8; e.g. shard .*shard-000001.tar"):
        check_reject_budget(*reject_totals(ranks), max_fraction=0.05)
    old = {k: v for k, v in saved.items() if k not in ("samples_read", "reject_examples")}  # before these fields
    assert DataPosition.from_json(old) == DataPosition(0, position.batches, position.consumed, {"damaged_shard": 8})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_over_damaged_shards_is_exact_and_counts_once(tmp_path, workers):
    """A damaged shard's lost samples are counted once across a mid-epoch checkpoint (not again by the
    resumed worker, which skips what it had read), and the batches continue exactly."""
    folder = wds_dir(tmp_path / "w", [list(records(f"r{s}")) for s in range(4)], manifest=True)
    shard = folder / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    (folder / "shard-000003.tar").write_bytes(b"")

    def reader():
        return ShardReader(list_shards(str(folder)), batch_size=3, num_negatives=K, num_workers=workers, shuffle_buffer=3,
                           seed=0, rank=0, world=1, transform=TRANSFORM, tokenize=text_tokenize)
    with deadline(60):
        full_position = DataPosition()
        full = [b.keys for b in itertools.islice(reader().epoch(full_position), 12)]
        position = DataPosition()
        first = [b.keys for b in itertools.islice(reader().epoch(position), 5)]
        resumed = DataPosition.from_json(json.loads(json.dumps(position.to_json())))
        rest = [b.keys for b in itertools.islice(reader().epoch(resumed), 7)]
    assert first + rest == full
    assert resumed.rejected == full_position.rejected and resumed.samples_read == full_position.samples_read
    # 36 used in 12 batches of 3, over 2 passes; each pass loses shard 3's 8 samples and shard 2's cut half (4)
    assert full_position.rejected == {"damaged_shard": 24} and full_position.samples_read == 60
    assert position.rejected == {"damaged_shard": 8}  # at the checkpoint: the first pass's empty shard
