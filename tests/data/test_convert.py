"""The converter on a fabricated DeGLA-JSON release and COCO-style image folder with planted bad records:
the shards hold exactly the good records with every negative they had, rejects.jsonl names each bad one
with its reason."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from test_reader import jpeg

from degla_scale.data.samples import REASONS

ROOT = Path(__file__).resolve().parents[2]
K = 4
NEGATIVES = {1: 4, 2: 5, 3: 7, 4: 5, 5: 4, 6: 7, 7: 5}  # good image_id → negatives in its record (K or more)
BAD = {  # image_id → (what is planted, the reason the converter must give)
    101: ("corrupt JPEG", "unreadable_image"),
    102: ("missing file", "missing_image"),
    103: ("3 negatives for K=4", "too_few_negatives"),
    104: ("empty caption", "empty_caption"),
    105: ("a negative equal to the positive", "negative_equals_positive"),
    106: ("an empty negative", "empty_negative"),
    107: ("no image_id", "malformed_record"),
}


def fabricate(tmp_path):
    """A DeGLA-format JSON (the release's {image_id, original, enhanced}) and its COCO train2014 folder."""
    images = tmp_path / "coco" / "train2014"
    images.mkdir(parents=True)
    records = []
    for image_id in list(NEGATIVES) + sorted(BAD):
        caption = f"a photo number {image_id}"
        negatives = [f"negative {k} of {image_id}" for k in range(NEGATIVES.get(image_id, 5))]
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
        if image_id == 106:
            negatives[4] = " "
        records.append({"image_id": image_id, "original": caption, "enhanced": negatives})
        if image_id == 107:
            del records[-1]["image_id"]
    records.append({"image_id": 3, "original": "a second caption of image 3", "enhanced": [f"n{k}" for k in range(5)]})
    release = tmp_path / "degla.json"
    release.write_text(json.dumps(records))
    return release, tmp_path / "coco"


def _keys(out, fmt):
    if fmt == "mds":
        from streaming import LocalDataset

        return sorted(s["key"] for s in LocalDataset(str(out)))
    return sorted(s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(sorted(map(str, out.glob("*.tar")))),
                                                          wds.tarfile_to_samples()))


def _samples(out, fmt) -> dict[str, list[str]]:
    """key → stored negatives, read back with the libraries' own readers."""
    if fmt == "mds":
        from streaming import LocalDataset

        return {s["key"]: s["negatives"] for s in LocalDataset(str(out))}
    return {s["__key__"]: json.loads(s["json"])["negatives"] for s in wds.DataPipeline(
        wds.SimpleShardList(sorted(map(str, out.glob("*.tar")))), wds.tarfile_to_samples())}


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_converter_keeps_exactly_the_good_records_and_names_each_bad_one(tmp_path, fmt):
    release, image_root = fabricate(tmp_path)
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--from", "degla-json", str(release),
                           "--image-root", str(image_root), "--format", fmt, "--out", str(out), "--num-negatives", str(K),
                           "--shard-size", "3", "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    index = {image_id: i for i, image_id in enumerate(list(NEGATIVES) + sorted(BAD))}
    want = {f"{i:012d}_{index[i]}": [f"negative {k} of {i}" for k in range(n)] for i, n in NEGATIVES.items()}
    want[f"{3:012d}_{len(index)}"] = [f"n{k}" for k in range(5)]
    assert _samples(out, fmt) == want  # every good record, with every negative it had
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == sorted(reason for _, reason in BAD.values())
    for r in rejects:
        assert r["reason"] in REASONS
        if r["id"].startswith("record_"):
            assert r["reason"] == "malformed_record" and r["id"] == f"record_{index[107]}"
        else:
            assert r["reason"] == BAD[int(r["id"].split("_")[0])][1]
    assert next(r["detail"] for r in rejects if r["reason"] == "too_few_negatives") == "has 3, needs K=4"
    assert summary["num_samples"] == 8 and summary["read"] == 15
    assert summary["rejected"] == {reason: int(reason in {r for _, r in BAD.values()}) for reason in REASONS}
    assert summary["min_negatives"] == 4 and summary["max_negatives"] == 7
    assert summary["negatives_per_sample"] == {"4": 2, "5": 4, "7": 2}
    assert summary["more_than_k"] == 6 and summary["negatives_stored"] == 2 * 4 + 4 * 5 + 2 * 7
    assert summary["distinct_images"] == 7 and summary["records_per_image"] == pytest.approx(8 / 7, abs=0.01)
    assert json.loads((out / "manifest.json").read_text())["min_negatives"] == 4


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


def test_jsonl_and_existing_wds_shards_keep_every_negative_of_a_side_file(tmp_path):
    from degla_scale.data.convert import convert, read_jsonl, read_side_negatives, read_wds

    (tmp_path / "img").mkdir()
    counts = {"s0": 4, "s1": 5, "s2": 7, "s3": 3}  # s3 has too few for K = 4
    lines, side = [], []
    for i, (key, n) in enumerate(counts.items()):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(40 * i))
        lines.append({"id": key, "image": f"img/{i}.jpg", "caption": f"caption {i}"})
        side.append({"id": key, "negatives": [f"neg {i} {k}" for k in range(n)], "types": ["swap_noun"] * n})
    (tmp_path / "data.jsonl").write_text("\n".join(map(json.dumps, lines)))
    (tmp_path / "negatives.jsonl").write_text("\n".join(map(json.dumps, side)))
    table = read_side_negatives(tmp_path / "negatives.jsonl")
    want = {key: [f"neg {i} {k}" for k in range(n)] for i, (key, n) in enumerate(counts.items()) if n >= K}
    first = convert(read_jsonl(tmp_path / "data.jsonl", None, table), tmp_path / "a", "wds", K, 10, 1, progress=False)
    assert _samples(tmp_path / "a", "wds") == want and first["rejected"]["too_few_negatives"] == 1
    assert first["more_than_k"] == 2 and first["negatives_stored"] == 16 and first["min_negatives"] == 4
    # Those shards as "existing img2dataset shards" (jpg + txt), negatives again from the side file:
    second = convert(read_wds(str(tmp_path / "a"), table), tmp_path / "b", "mds", K, 10, 1, progress=False)
    assert _samples(tmp_path / "b", "mds") == want and second["num_samples"] == 3 and second["more_than_k"] == 2


def test_a_broken_side_file_line_is_named(tmp_path):
    from degla_scale.data.convert import read_side_negatives
    from degla_scale.data.reader import DataError

    (tmp_path / "negatives.jsonl").write_text('{"id": "a", "negatives": ["x"]}\n{"id": "b", "negat\n')
    with pytest.raises(DataError, match=r"negatives.jsonl:2 is not a JSON object"):
        read_side_negatives(tmp_path / "negatives.jsonl")


def test_readme_documents_exactly_the_reject_reasons():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Reject reasons"):readme.index("## Evaluation and export")]
    documented = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert documented == list(REASONS)
