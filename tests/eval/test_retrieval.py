"""Image-text retrieval: recall@k both directions with several captions per image, pessimistic ties,
row-chunked similarities, BLIP's Karpathy-split file format and layout, and clear errors.

The fake encoder embeds image i as the one-hot e_i and each caption as a hand-written row of scores
(plus a padding coordinate making it unit length), so score(image i, caption t) = S[t][i] exactly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from degla_scale.eval.common import EvalDataError
from degla_scale.eval.retrieval import evaluate_retrieval, evaluate_retrieval_split, retrieval_ranks

# Captions t = 0..11; caption t describes image t // 2. Rows: scores against images 0..5.
S = [
    [0.5, 0.0, 0.3, 0.0, 0.0, 0.06],  # t0  (img 0)
    [0.5, 0.4, 0.0, 0.0, 0.0, 0.06],  # t1  (img 0)
    [0.4, 0.3, 0.0, 0.0, 0.0, 0.06],  # t2  (img 1) own 0.3 < img0 0.4  → t2i rank 1
    [0.0, 0.5, 0.0, 0.0, 0.0, 0.06],  # t3  (img 1)
    [0.0, 0.0, 0.2, 0.0, 0.0, 0.06],  # t4  (img 2)
    [0.0, 0.0, 0.2, 0.0, 0.0, 0.06],  # t5  (img 2)
    [0.0, 0.0, 0.3, 0.5, 0.0, 0.06],  # t6  (img 3)
    [0.0, 0.0, 0.0, 0.5, 0.0, 0.06],  # t7  (img 3)
    [0.0, 0.0, 0.0, 0.5, 0.5, 0.06],  # t8  (img 4) own 0.5 ties img3 0.5 → t2i rank 1 (tie is a loss)
    [0.0, 0.0, 0.0, 0.0, 0.5, 0.06],  # t9  (img 4)
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.05],  # t10 (img 5) own 0.05 < five others → t2i rank 5
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.05],  # t11 (img 5)
]
OWNER = [t // 2 for t in range(12)]
# Image→text rank = captions of OTHER images scoring >= the image's best own caption (column-wise):
#   img0: best own 0.5; others ≥0.5: none                          → 0
#   img1: best own 0.5 (t3; t2 only 0.3); t1 scores 0.4 < 0.5      → 0   (would be 1 if only t2 counted)
#   img2: best own 0.2; t0 0.3, t6 0.3                             → 2
#   img3: best own 0.5; t8 0.5 (tie)                               → 1
#   img4: best own 0.5; none                                       → 0
#   img5: best own 0.05; t0..t9 all 0.06                           → 10
I2T_RANKS = [0, 0, 2, 1, 0, 10]
# Text→image rank = other images scoring >= its own image (row-wise): t2 → 1, t8 → 1 (tie), t10 → 5.
T2I_RANKS = [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 5, 0]
EXPECTED = {
    "image_to_text_R@1": 100 * 3 / 6,    # ranks < 1: img0, img1, img4
    "image_to_text_R@5": 100 * 5 / 6,    # all but img5
    "image_to_text_R@10": 100 * 5 / 6,   # img5's rank 10 is not < 10
    "text_to_image_R@1": 100 * 9 / 12,   # all but t2, t8, t10
    "text_to_image_R@5": 100 * 11 / 12,  # t10's rank 5 is not < 5
    "text_to_image_R@10": 100.0,
}
EXPECTED["mean_recall"] = (50 + 500 / 6 + 500 / 6 + 75 + 1100 / 12 + 100) / 6  # = 80.555...


def _caption_vec(row: list[float]) -> list[float]:
    return row + [math.sqrt(1.0 - sum(x * x for x in row))]


class FakeEncoder:
    """Image embedding: one-hot by the image's file name (`names`); caption embedding: lookup."""

    def __init__(self, names: list[str], captions: dict[str, list[float]]):
        self.names, self.captions = names, captions

    def images(self, refs, desc="images"):
        dim = len(next(iter(self.captions.values())))
        rows = []
        for ref in refs:
            assert ref.path.is_file(), ref.path
            rows.append([float(i == self.names.index(ref.path.name)) for i in range(dim)])
        return torch.tensor(rows)

    def texts(self, texts, desc="texts"):
        return torch.tensor([self.captions[t] for t in texts])


def _tiny_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (128, 64, 32)).save(path)


def _write_coco(folder: Path) -> FakeEncoder:
    """coco_karpathy_test.json in BLIP's format, 6 images with 2 captions each, images under val2014/."""
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(6)]
    entries, vecs = [], {}
    for i, name in enumerate(names):
        caps = [f"a picture numbered {t}" for t in range(12) if OWNER[t] == i]
        entries.append({"image": f"val2014/{name}", "caption": caps, "image_id": i})
        _tiny_image(folder / "val2014" / name)
    for t in range(12):
        vecs[f"a picture numbered {t}"] = _caption_vec(S[t])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "coco_karpathy_test.json").write_text(json.dumps(entries))
    return FakeEncoder(names, vecs)


def _close(got: dict, expected: dict, prefix: str = "") -> None:
    for key, value in expected.items():
        assert math.isclose(got[prefix + key], value, abs_tol=1e-9), (prefix + key, got[prefix + key], value)


def test_ranks_by_hand_and_chunking():
    img_ID = torch.eye(6, 7)
    txt_TD = torch.tensor([_caption_vec(row) for row in S])
    owner_T = torch.tensor(OWNER)
    for chunk in (1, 4, 5, 512):  # blocks that do and do not divide 6 and 12
        i2t, t2i = retrieval_ranks(img_ID, txt_TD, owner_T, chunk_size=chunk)
        assert i2t.tolist() == I2T_RANKS, chunk
        assert t2i.tolist() == T2I_RANKS, chunk


def test_recall_both_directions_coco_layout(tmp_path):
    enc = _write_coco(tmp_path)
    result = evaluate_retrieval(enc, tmp_path, datasets=("coco",), chunk_size=4)
    _close(result, EXPECTED, "coco/")
    assert set(result) == {f"coco/{k}" for k in EXPECTED}


def test_both_datasets_in_own_folders_with_separate_image_root(tmp_path):
    # root/coco/coco_karpathy_test.json with images under root/coco/val2014/ (the json's folder), and
    # root/flickr30k/flickr30k_test.json with images under image_roots["flickr30k"]/flickr30k-images/.
    # Dims: 0-1 coco images, 2-3 flickr images, 4 padding.
    # coco: img0 has captions c0 (scores img0 0.5, img1 0.7) and c1 (img0 0.9); img1 has c2 (img1 0.9).
    #   i2t: img0 best own 0.9 > c2's 0 → 0; img1 best own 0.9 > c0's 0.7 → 0  → R@1 100
    #   t2i: c0 own 0.5 < img1 0.7 → rank 1; c1, c2 → 0                      → R@1 2/3, R@5 1
    # flickr: img 1000 has 3 captions, img 2000 has 1, each caption 0.9 on its own image, 0.1 on the other.
    coco, flickr = tmp_path / "coco", tmp_path / "flickr30k"
    coco.mkdir()
    flickr.mkdir()
    (coco / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000000010.jpg", "caption": ["c0", "c1"], "image_id": "10"},
        {"image": "val2014/COCO_val2014_000000000020.jpg", "caption": ["c2"], "image_id": "20"},
    ]))
    (flickr / "flickr30k_test.json").write_text(json.dumps([
        {"image": "flickr30k-images/1000.jpg", "caption": ["dog one", "dog two", "dog three"]},
        {"image": "flickr30k-images/2000.jpg", "caption": ["cat one"]},
    ]))
    for path in (coco / "val2014" / "COCO_val2014_000000000010.jpg", coco / "val2014" / "COCO_val2014_000000000020.jpg",
                 tmp_path / "elsewhere" / "flickr30k-images" / "1000.jpg",
                 tmp_path / "elsewhere" / "flickr30k-images" / "2000.jpg"):
        _tiny_image(path)
    names = ["COCO_val2014_000000000010.jpg", "COCO_val2014_000000000020.jpg", "1000.jpg", "2000.jpg"]
    rows = {"c0": [0.5, 0.7, 0, 0], "c1": [0.9, 0, 0, 0], "c2": [0, 0.9, 0, 0],
            "dog one": [0, 0, 0.9, 0.1], "dog two": [0, 0, 0.9, 0.1], "dog three": [0, 0, 0.9, 0.1],
            "cat one": [0, 0, 0.1, 0.9]}
    enc = FakeEncoder(names, {k: _caption_vec([float(x) for x in v]) for k, v in rows.items()})
    result = evaluate_retrieval(enc, tmp_path, image_roots={"flickr30k": tmp_path / "elsewhere"})
    _close(result, {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100 * 2 / 3, "text_to_image_R@5": 100.0,
                    "mean_recall": (100 * 3 + 100 * 2 / 3 + 200) / 6}, "coco/")
    assert all(result[f"flickr30k/{k}"] == 100.0 for k in EXPECTED)
    assert len(result) == 2 * len(EXPECTED)
    with pytest.raises(EvalDataError, match="1000.jpg"):  # without the override, images are looked for by the json
        evaluate_retrieval(enc, tmp_path, datasets=("flickr30k",))


def test_ties_count_against_the_model(tmp_path):
    # Collapsed model: 3 images, 1 caption each, all embeddings identical → every score equal.
    # Each query has 2 wrong candidates tying its right one → rank 2 → R@1 0 %, R@5 = R@10 = 100 %.
    names = ["a.jpg", "b.jpg", "c.jpg"]
    for n in names:
        _tiny_image(tmp_path / "imgs" / n)
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(
        [{"image": f"imgs/{n}", "caption": [f"caption {n}"]} for n in names]))

    class Collapsed(FakeEncoder):
        def images(self, refs, desc="images"):
            return torch.tensor([[1.0, 0.0]] * len(refs))

    enc = Collapsed(names, {f"caption {n}": [1.0, 0.0] for n in names})
    result = evaluate_retrieval_split(enc, tmp_path / "coco_karpathy_test.json")
    assert result["image_to_text_R@1"] == 0.0 and result["text_to_image_R@1"] == 0.0
    assert result["image_to_text_R@5"] == 100.0 and result["text_to_image_R@10"] == 100.0
    assert math.isclose(result["mean_recall"], 400 / 6)


def test_string_captions_and_repeated_images_are_merged(tmp_path):
    # Train-style entries (one caption string each) naming the same image twice: one image, two captions.
    _tiny_image(tmp_path / "x.jpg")
    _tiny_image(tmp_path / "y.jpg")
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "x.jpg", "caption": "x first"}, {"image": "y.jpg", "caption": "y only"},
        {"image": "x.jpg", "caption": "x second"},
    ]))
    # x: captions score x 0.2 / 0.9; y's caption scores x 0.5 and y 0.6.
    # img x: best own 0.9 > 0.5 → rank 0 (merging matters: with "x first" alone, 0.2 < 0.5 → rank 1).
    enc = FakeEncoder(["x.jpg", "y.jpg"], {
        "x first": [0.2, 0.0, math.sqrt(0.96)], "x second": [0.9, 0.0, math.sqrt(0.19)],
        "y only": [0.5, 0.6, math.sqrt(0.39)]})
    result = evaluate_retrieval_split(enc, tmp_path / "coco_karpathy_test.json")
    assert result["image_to_text_R@1"] == 100.0
    # "x first" scores x 0.2 > y 0 → right; all captions rank their own image first.
    assert result["text_to_image_R@1"] == 100.0


def test_missing_and_malformed_files(tmp_path):
    enc = FakeEncoder([], {"unused": [1.0]})
    with pytest.raises(EvalDataError, match="coco_karpathy_test.json"):
        evaluate_retrieval(enc, tmp_path, datasets=("coco",))
    with pytest.raises(EvalDataError, match="flickr30k_test.json"):
        evaluate_retrieval(enc, tmp_path, datasets=("flickr30k",))
    with pytest.raises(EvalDataError, match="nowhere"):
        evaluate_retrieval(enc, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown retrieval dataset"):
        evaluate_retrieval(enc, tmp_path, datasets=("imagenet",))

    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["a thing"]}]))
    with pytest.raises(EvalDataError, match=r"1 of 1 .*images missing, e.g. .*val2014[/\\]COCO_val2014_000000000001.jpg") as err:
        evaluate_retrieval(enc, tmp_path, datasets=("coco",))
    assert "\n" not in str(err.value)

    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([{"file": "x.jpg", "captions": ["a"]}]))
    with pytest.raises(EvalDataError, match="entry 0 is malformed"):
        evaluate_retrieval(enc, tmp_path, datasets=("coco",))
