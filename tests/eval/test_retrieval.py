"""Image-text retrieval as BLIP scores it: recall@k both directions with several captions per image (by hand),
ties, duplicate image entries and random scores against `itm_eval_as_blip` (salesforce/BLIP
train_retrieval.py `itm_eval`, transcribed here independently of the module), captions cleaned by BLIP's
pre_caption (case, punctuation, 30 words), BLIP's Karpathy-split files and layouts, and one-line errors.

The fake encoder embeds image i as the one-hot e_i and each caption as a hand-written row of scores (plus a
padding coordinate making it unit length), so score(image i, caption t) = S[t][i] exactly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from degla_scale.config import RetrievalEvalConfig
from degla_scale.eval import retrieval
from degla_scale.eval.common import EvalDataError
from degla_scale.eval.retrieval import evaluate_retrieval, prepare_retrieval, retrieval_ranks

# Captions t = 0..11; caption t describes image t // 2. Rows: scores against images 0..5. No score of a wrong
# candidate equals a right one's, so every rank below is fixed whatever a sort does with equal values.
S = [
    [0.5, 0.0, 0.3, 0.0, 0.0, 0.06],  # t0  (img 0)
    [0.5, 0.4, 0.0, 0.0, 0.0, 0.06],  # t1  (img 0)
    [0.4, 0.3, 0.0, 0.0, 0.0, 0.06],  # t2  (img 1) own 0.3 < img0 0.4  → t2i rank 1
    [0.0, 0.5, 0.0, 0.0, 0.0, 0.06],  # t3  (img 1)
    [0.0, 0.0, 0.2, 0.0, 0.0, 0.06],  # t4  (img 2)
    [0.0, 0.0, 0.2, 0.0, 0.0, 0.06],  # t5  (img 2)
    [0.0, 0.0, 0.3, 0.5, 0.0, 0.06],  # t6  (img 3)
    [0.0, 0.0, 0.0, 0.5, 0.0, 0.06],  # t7  (img 3)
    [0.0, 0.0, 0.0, 0.45, 0.5, 0.06],  # t8 (img 4)
    [0.0, 0.0, 0.0, 0.0, 0.5, 0.06],  # t9  (img 4)
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.05],  # t10 (img 5) own 0.05 < five others → t2i rank 5
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.05],  # t11 (img 5)
]
OWNER = [t // 2 for t in range(12)]
# Image→text rank = best place among all captions of any own caption (column-wise):
#   img1: best own 0.5 (t3; t2 only 0.3) beats t1's 0.4 → 0 (would be 1 if only t2 counted)
#   img2: best own 0.2 below t0 0.3 and t6 0.3 → 2;  img5: best own 0.05 below t0..t9's 0.06 → 10;  others 0
I2T_RANKS = [0, 0, 2, 0, 0, 10]
# Text→image rank = place of its own image (row-wise): t2 → 1, t10 → 5.
T2I_RANKS = [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0]
EXPECTED = {
    "image_to_text_R@1": 100 * 4 / 6,    # ranks < 1: all but img2, img5
    "image_to_text_R@5": 100 * 5 / 6,    # all but img5
    "image_to_text_R@10": 100 * 5 / 6,   # img5's rank 10 is not < 10
    "text_to_image_R@1": 100 * 10 / 12,  # all but t2, t10
    "text_to_image_R@5": 100 * 11 / 12,  # t10's rank 5 is not < 5
    "text_to_image_R@10": 100.0,
}
EXPECTED["mean_recall"] = sum(EXPECTED.values()) / 6


def itm_eval_as_blip(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """BLIP's itm_eval, one query at a time as it is written there, with BLIP's key names."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2],
            "r_mean": (sum(tr) / 3 + sum(ir) / 3) / 2}


def as_ours(blip: dict) -> dict:
    names = {"txt_r": "image_to_text_R@", "img_r": "text_to_image_R@"}
    out = {names[k[:5]] + k[5:]: v for k, v in blip.items() if k != "r_mean"}
    return {**out, "mean_recall": blip["r_mean"]}


def blip_reference(sim_IT: np.ndarray, owner_T: list[int]) -> dict:
    img2txt = {i: [t for t, o in enumerate(owner_T) if o == i] for i in range(sim_IT.shape[0])}
    return as_ours(itm_eval_as_blip(sim_IT, sim_IT.T, dict(enumerate(owner_T)), img2txt))


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


def _close(got: dict, expected: dict, prefix: str = "") -> None:  # noqa: E302
    for key, value in expected.items():
        assert math.isclose(got[prefix + key], value, abs_tol=1e-9), (prefix + key, got[prefix + key], value)


def test_ranks_by_hand_blip_and_row_blocks(monkeypatch):
    sim_IT = np.asarray([row for row in S], dtype=np.float32).T.copy()
    for rows in (1, 4, 5, 256):  # blocks that do and do not divide 6 and 12
        monkeypatch.setattr(retrieval, "_ROWS", rows)
        i2t, t2i = retrieval_ranks(sim_IT, np.asarray(OWNER))
        assert i2t.tolist() == I2T_RANKS, rows
        assert t2i.tolist() == T2I_RANKS, rows
    _close(blip_reference(sim_IT, OWNER), EXPECTED)  # the transcription agrees with the hand count


def test_recall_both_directions_coco_layout(tmp_path):
    enc = _write_coco(tmp_path)
    result = evaluate_retrieval(enc, tmp_path, RetrievalEvalConfig(datasets=["coco"]))
    _close(result, EXPECTED, "coco/")
    assert set(result) == {f"coco/{k}" for k in EXPECTED}
    assert result.averaged_over["coco/mean_recall"] == [f"coco/{k}" for k in EXPECTED if k != "mean_recall"]


def test_ties_fall_as_numpy_argsort_leaves_them(tmp_path, monkeypatch):
    # The old rule counted a wrong candidate tying the right one as ahead of it; BLIP takes argsort's order.
    # Scores on a grid of 0.1 steps, so most rows hold ties; 23 images x 3 captions = 69-wide rows (numpy's
    # introsort, not its small-array insertion sort), in blocks of 7 rows.
    gen = np.random.default_rng(0)
    sim_IT = (gen.integers(0, 4, size=(23, 69)) / 10).astype(np.float32)
    owner_T = [t // 3 for t in range(69)]
    monkeypatch.setattr(retrieval, "_ROWS", 7)
    ours = retrieval.recall_metrics(*retrieval_ranks(sim_IT, np.asarray(owner_T)))
    assert ours == pytest.approx(blip_reference(sim_IT, owner_T))
    # Collapsed model, 3 images with a caption each: every score equal. The old rule gave R@1 0 for all.
    flat = np.full((3, 3), 0.5, dtype=np.float32)
    assert retrieval.recall_metrics(*retrieval_ranks(flat, np.arange(3))) == pytest.approx(
        blip_reference(flat, [0, 1, 2]))


def test_captions_are_cleaned_as_blip_does(tmp_path):
    # BLIP's pre_caption (max_words 30) before embedding: lower case, . ! " ( ) * # : ; ~ → space, 30 words.
    long = " ".join(f"w{i}" for i in range(35))
    entries = [{"image": "flickr30k-images/1.jpg", "caption": ["A Dog (brown) runs!", long + "."]},
               {"image": "flickr30k-images/2.jpg", "caption": ["a dog brown runs", "A cat; sleeping."]}]
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(entries))
    for n in ("1.jpg", "2.jpg"):
        _tiny_image(tmp_path / "flickr30k-images" / n)
    first30 = " ".join(f"w{i}" for i in range(30))  # by hand: the 35-word caption keeps 30 words
    vecs = {"a dog brown runs": _caption_vec([0.5, 0.5]),  # both images' first captions clean to this string
            first30: _caption_vec([0.6, 0.0]), "a cat sleeping": _caption_vec([0.0, 0.9])}
    enc = FakeEncoder(["1.jpg", "2.jpg"], vecs)  # a caption left uncleaned would be a KeyError here
    suite = prepare_retrieval(tmp_path, RetrievalEvalConfig(datasets=["flickr30k"]))
    assert suite.splits[0].captions == ["a dog brown runs", first30, "a dog brown runs", "a cat sleeping"]
    result = suite.score(enc)
    sim_IT = np.asarray([[0.5, 0.6, 0.5, 0.0], [0.5, 0.0, 0.5, 0.9]], dtype=np.float32)
    _close(result, blip_reference(sim_IT, [0, 0, 1, 1]), "flickr30k/")
    # by hand: img1's best own caption (w0..w29, 0.6) beats everything → i2t R@1 100; text→image: the tied
    # "a dog brown runs" rows fall by argsort ([0.5, 0.5] reversed puts image 2 first: caption 0 is at rank 1)
    assert result["flickr30k/image_to_text_R@1"] == 100.0 and result["flickr30k/text_to_image_R@1"] == 75.0


def test_both_datasets_with_blips_ann_root_and_image_roots(tmp_path):
    # BLIP's layout: the annotation files in one folder (ann_root), each dataset's images under its own image_root;
    # and ARO's: root/<dataset>/<file> with images beside it.
    # Dims: 0-1 coco images, 2-3 flickr images, 4 padding.
    # coco: img0 has captions c0 (scores img0 0.5, img1 0.7) and c1 (img0 0.9); img1 has c2 (img1 0.9).
    #   i2t: img0 best own 0.9 > c2's 0 → 0; img1 best own 0.9 > c0's 0.7 → 0  → R@1 100
    #   t2i: c0 own 0.5 < img1 0.7 → rank 1; c1, c2 → 0                      → R@1 2/3, R@5 1
    # flickr: img 1000 has 3 captions, img 2000 has 1, each caption 0.9 on its own image, 0.1 on the other.
    ann = tmp_path / "annotation"
    ann.mkdir()
    (ann / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000000010.jpg", "caption": ["c0", "c1"], "image_id": "10"},
        {"image": "val2014/COCO_val2014_000000000020.jpg", "caption": ["c2"], "image_id": "20"},
    ]))
    (ann / "flickr30k_test.json").write_text(json.dumps([
        {"image": "flickr30k-images/1000.jpg", "caption": ["dog one", "dog two", "dog three"]},
        {"image": "flickr30k-images/2000.jpg", "caption": ["cat one"]},
    ]))
    for path in (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000010.jpg",
                 tmp_path / "coco" / "val2014" / "COCO_val2014_000000000020.jpg",
                 tmp_path / "f30k" / "flickr30k-images" / "1000.jpg", tmp_path / "f30k" / "flickr30k-images" / "2000.jpg"):
        _tiny_image(path)
    names = ["COCO_val2014_000000000010.jpg", "COCO_val2014_000000000020.jpg", "1000.jpg", "2000.jpg"]
    rows = {"c0": [0.5, 0.7, 0, 0], "c1": [0.9, 0, 0, 0], "c2": [0, 0.9, 0, 0],
            "dog one": [0, 0, 0.9, 0.1], "dog two": [0, 0, 0.9, 0.1], "dog three": [0, 0, 0.9, 0.1],
            "cat one": [0, 0, 0.1, 0.9]}
    enc = FakeEncoder(names, {k: _caption_vec([float(x) for x in v]) for k, v in rows.items()})
    cfg = RetrievalEvalConfig(coco_image_root=str(tmp_path / "coco"), flickr30k_image_root=str(tmp_path / "f30k"))
    result = evaluate_retrieval(enc, ann, cfg)
    _close(result, {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100 * 2 / 3, "text_to_image_R@5": 100.0,
                    "mean_recall": (100 * 3 + 100 * 2 / 3 + 200) / 6}, "coco/")
    assert all(result[f"flickr30k/{k}"] == 100.0 for k in EXPECTED)
    assert len(result) == 2 * len(EXPECTED)
    with pytest.raises(EvalDataError, match=r"1000.jpg.*evaluation.retrieval.flickr30k_image_root"):
        prepare_retrieval(ann, RetrievalEvalConfig(datasets=["flickr30k"]))  # images looked for beside the json

    aro = tmp_path / "aro_layout"  # root/<dataset>/flickr30k_test_karpathy.json, flickr30k-images/ beside it
    (aro / "flickr30k").mkdir(parents=True)
    (aro / "flickr30k" / "flickr30k_test_karpathy.json").write_text((ann / "flickr30k_test.json").read_text())
    for n in ("1000.jpg", "2000.jpg"):
        _tiny_image(aro / "flickr30k" / "flickr30k-images" / n)
    assert evaluate_retrieval(enc, aro, RetrievalEvalConfig(datasets=["flickr30k"]))["flickr30k/mean_recall"] == 100.0


def test_an_image_listed_twice_is_two_images(tmp_path):
    # BLIP reads one image per entry and never merges entries: x.jpg listed twice is two images with equal
    # embeddings, each owning only its own entry's captions (the old code merged them into one).
    _tiny_image(tmp_path / "x.jpg")
    _tiny_image(tmp_path / "y.jpg")
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "x.jpg", "caption": "x first"}, {"image": "y.jpg", "caption": "y only"},
        {"image": "x.jpg", "caption": "x second"},
    ]))
    vecs = {"x first": [0.2, 0.0, math.sqrt(0.96)], "x second": [0.9, 0.0, math.sqrt(0.19)],
            "y only": [0.5, 0.6, math.sqrt(0.39)]}
    suite = prepare_retrieval(tmp_path, RetrievalEvalConfig(datasets=["coco"]))
    assert [ref.path.name for ref in suite.splits[0].images] == ["x.jpg", "y.jpg", "x.jpg"]
    result = suite.score(FakeEncoder(["x.jpg", "y.jpg"], vecs))
    sim_IT = np.asarray([[0.2, 0.5, 0.9], [0.0, 0.6, 0.0], [0.2, 0.5, 0.9]], dtype=np.float32)
    _close(result, blip_reference(sim_IT, [0, 1, 2]), "coco/")
    # by hand: the first x's only caption (0.2) is below "y only" (0.5) and "x second" (0.9) → rank 2; y and the
    # second x rank their captions first → i2t R@1 2/3 (merged, x would have owned "x second": 100)
    assert result["coco/image_to_text_R@1"] == pytest.approx(200 / 3)


def test_missing_and_malformed_files(tmp_path):
    coco = RetrievalEvalConfig(datasets=["coco"])
    with pytest.raises(EvalDataError, match="coco_karpathy_test.json"):
        prepare_retrieval(tmp_path, coco)
    with pytest.raises(EvalDataError, match="flickr30k_test.json"):
        prepare_retrieval(tmp_path, RetrievalEvalConfig(datasets=["flickr30k"]))
    with pytest.raises(EvalDataError, match="nowhere"):
        prepare_retrieval(tmp_path / "nowhere")
    with pytest.raises(EvalDataError, match="unknown retrieval dataset 'imagenet'"):
        prepare_retrieval(tmp_path, RetrievalEvalConfig(datasets=["imagenet"]))

    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["a thing"]}]))
    with pytest.raises(EvalDataError, match=r"1 of 1 .*images missing, e.g. .*val2014[/\\]COCO_val2014_000000000001.jpg") as err:
        prepare_retrieval(tmp_path, coco)
    assert "\n" not in str(err.value)

    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([{"file": "x.jpg", "captions": ["a"]}]))
    with pytest.raises(EvalDataError, match="entry 0 is malformed"):
        prepare_retrieval(tmp_path, coco)
