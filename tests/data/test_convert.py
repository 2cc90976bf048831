"""The converter on a fabricated DeGLA-JSON release and COCO-style image folder with planted bad records:
the shards hold exactly the good records, rejects.jsonl names each bad one with its reason."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from test_reader import jpeg

ROOT = Path(__file__).resolve().parents[2]
K = 4
BAD = {  # image_id → (what is planted, the reason the converter must give)
    101: ("corrupt JPEG", "unreadable_image"),
    102: ("missing file", "missing_image"),
    103: ("3 negatives instead of 4", "wrong_negatives"),
    104: ("empty caption", "empty_caption"),
    105: ("a negative equal to the positive", "negative_equals_positive"),
}


def fabricate(tmp_path):
    images = tmp_path / "coco" / "train2014"
    images.mkdir(parents=True)
    records = []
    for image_id in list(range(1, 8)) + sorted(BAD):
        caption = f"a photo number {image_id}"
        negatives = [f"negative {k} of {image_id}" for k in range(K)]
        path = images / f"COCO_train2014_{image_id:012d}.jpg"
        path.write_bytes(jpeg(image_id * 9 % 255))
        if image_id == 101:
            path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
        if image_id == 102:
            path.unlink()
        if image_id == 103:
            negatives = negatives[:3]
        if image_id == 104:
            caption = "   "
        if image_id == 105:
            negatives[2] = caption.upper()
        records.append({"image_id": image_id, "original": caption, "enhanced": negatives})
    records.append({"image_id": 3, "original": "a second caption of image 3", "enhanced": [f"n{k}" for k in range(K)]})
    release = tmp_path / "degla.json"
    release.write_text(json.dumps(records))
    return release, tmp_path / "coco"


def _keys(out, fmt):
    if fmt == "mds":
        from streaming import LocalDataset

        return sorted(s["key"] for s in LocalDataset(str(out)))
    return sorted(s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(sorted(map(str, out.glob("*.tar")))),
                                                          wds.tarfile_to_samples()))


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_converter_keeps_exactly_the_good_records_and_names_each_bad_one(tmp_path, fmt):
    release, image_root = fabricate(tmp_path)
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--from", "degla-json", str(release),
                           "--image-root", str(image_root), "--format", fmt, "--out", str(out), "--num-negatives", str(K),
                           "--shard-size", "3", "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    good = [f"{i:012d}_{i - 1}" for i in range(1, 8)] + [f"{3:012d}_{12}"]
    assert _keys(out, fmt) == sorted(good)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"].split("_")[0]: r["reason"] for r in rejects} == {f"{i:012d}": reason for i, (_, reason) in BAD.items()}
    assert summary["num_samples"] == 8 and summary["read"] == 13
    assert summary["rejected"] == {reason: 1 for _, reason in BAD.values()}
    assert summary["distinct_images"] == 7 and summary["records_per_image"] == pytest.approx(8 / 7, abs=0.01)


def test_an_interrupted_conversion_resumes_without_redoing_finished_shards(tmp_path):
    from degla_scale.data.convert import convert, read_degla_json

    release, image_root = fabricate(tmp_path)
    out = tmp_path / "shards"
    first = convert(read_degla_json(release, image_root), out, "wds", K, shard_size=3, workers=1, progress=False)
    keys = _keys(out, "wds")
    progress = json.loads((out / "progress.json").read_text())
    # Interrupt after two shards: forget the rest, and remove their files.
    (out / "progress.json").write_text(json.dumps({"shards": progress["shards"][:2]}))
    for name in first["shards"][2:]:
        (out / name).unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in first["shards"][:2]}
    again = convert(read_degla_json(release, image_root), out, "wds", K, shard_size=3, workers=1, progress=False)
    assert again == first
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    assert _keys(out, "wds") == keys and len(keys) == first["num_samples"] == 8


def test_bad_invocation_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--from", "degla-json",
                           str(tmp_path / "none.json"), "--image-root", str(tmp_path), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "none.json: no such file" in done.stderr.strip().splitlines()[-1]


def test_jsonl_and_existing_wds_shards_take_negatives_from_a_side_file(tmp_path):
    from degla_scale.data.convert import convert, read_jsonl, read_side_negatives, read_wds

    (tmp_path / "img").mkdir()
    lines, side = [], []
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(40 * i))
        lines.append({"id": f"s{i}", "image": f"img/{i}.jpg", "caption": f"caption {i}"})
        side.append({"id": f"s{i}", "negatives": [f"neg {i} {k}" for k in range(2 if i != 3 else 1)]})
    (tmp_path / "data.jsonl").write_text("\n".join(map(json.dumps, lines)))
    (tmp_path / "negatives.jsonl").write_text("\n".join(map(json.dumps, side)))
    table = read_side_negatives(tmp_path / "negatives.jsonl")
    first = convert(read_jsonl(tmp_path / "data.jsonl", None, table), tmp_path / "a", "wds", 2, 10, 1, progress=False)
    assert _keys(tmp_path / "a", "wds") == ["s0", "s1", "s2"] and first["rejected"]["wrong_negatives"] == 1
    # Those shards as "existing img2dataset shards" (jpg + txt), negatives again from the side file:
    second = convert(read_wds(str(tmp_path / "a"), table), tmp_path / "b", "mds", 2, 10, 1, progress=False)
    assert _keys(tmp_path / "b", "mds") == ["s0", "s1", "s2"] and second["num_samples"] == 3
