"""ARO evaluator on fabricated files in the released format, scored as the release's dataset_zoo/aro_datasets.py
does: strict VG ties, macro averaging, the symmetric relations and small attribute pairs left out, crop boxes,
the four order perturbations exactly as its perturbations.py draws them (checked against a literal second
implementation below), argmax == 0 precision@1 (a perturbation identical to the caption resolves to the
caption), BLIP's pre_caption, NLTK's tokenisation, and the missing-tagger line. Expected numbers are worked out
by hand in the comments or by the second implementation in this file."""
from __future__ import annotations

import json
import random
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from degla_scale.config import AroEvalConfig
from degla_scale.eval import aro
from degla_scale.eval.aro import (
    SYMMETRIC_RELATIONS,
    OrderRandom,
    macro_accuracy,
    order_correct,
    order_perturbations,
    prepare_aro,
)
from degla_scale.eval.common import EvalDataError, EvalDependencyError, ImageRef, pre_caption

RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


class FakeEncoder:
    """Image embedding: the mean colour of the (cropped) image. Text embedding: looked up in `text_vecs`, with
    `default` for any other text (None: an unknown text is a test bug). Counts calls, to check fail-fast."""

    def __init__(self, text_vecs: dict[str, tuple[float, ...]], default: tuple[float, ...] | None = None):
        self.text_vecs, self.default, self.calls = text_vecs, default, 0

    def images(self, refs, desc="images"):
        self.calls += 1
        rows = [torch.from_numpy(np.asarray(ref.load(), dtype=np.float32)).mean((0, 1)) for ref in refs]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def texts(self, texts, desc="texts"):
        self.calls += 1
        rows = [self.text_vecs[t] if self.default is None or t in self.text_vecs else self.default for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def evaluate(encoder, root, subsets, tagger=None, tokenize=None, **cfg):
    return prepare_aro(root, AroEvalConfig(subsets=list(subsets), **cfg), tagger, tokenize).score(encoder)


def save_image(path, colour, size=(8, 8), box=None, box_colour=None):
    """A `colour` image, with the (x, y, w, h) `box` painted `box_colour`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    if box:
        x, y, w, h = box
        image.paste(box_colour, (x, y, x + w, y + h))
    image.save(path)


# ------------------------------------------------------------------------------------------------ VG subsets

def vg_record(image, true, false, box=(0, 0, 8, 8), **extra):
    x, y, w, h = box
    return {"image_id": image.split(".")[0], "image_path": image, "bbox_x": x, "bbox_y": y, "bbox_w": w,
            "bbox_h": h, "true_caption": true, "false_caption": false, **extra}


@pytest.fixture
def vg_root(tmp_path):
    """red.png, green.png (8x8) and boxed.png: red with a green 4x4 square at (4, 4)."""
    save_image(tmp_path / "images/red.png", (255, 0, 0))
    save_image(tmp_path / "images/green.png", (0, 255, 0))
    save_image(tmp_path / "images/boxed.png", (255, 0, 0), box=(4, 4, 4, 4), box_colour=(0, 255, 0))
    return tmp_path


RELATION_TEXTS = {
    "the cup is on the table": RED, "the table is on the cup": GREEN,
    "the man is holding the cup": RED, "the cup is holding the man": GREEN,
    "the dog is next to the cat": RED, "the cat is next to the dog": GREEN,
    "the tie caption": GREEN, "the other tie caption": GREEN,
}


def write_relation(root, records):
    (root / "visual_genome_relation.json").write_text(json.dumps(records))


def test_vg_relation_strict_macro_and_symmetric_excluded(vg_root):
    on, on_false = "the cup is on the table", "the table is on the cup"
    hold, hold_false = "the man is holding the cup", "the cup is holding the man"
    nxt, nxt_false = "the dog is next to the cat", "the cat is next to the dog"
    records = [
        vg_record("red.png", on, on_false, relation_name="on"),            # red: 1 > 0, right
        vg_record("red.png", on, on_false, relation_name="on"),            # right
        vg_record("red.png", "the tie caption", "the other tie caption", relation_name="on"),  # 0 == 0: tie, wrong
        vg_record("red.png", hold, hold_false, relation_name="holding"),   # right
        vg_record("green.png", nxt, nxt_false, relation_name="next to"),   # green: 0 < 1, wrong (but symmetric)
        vg_record("green.png", nxt, nxt_false, relation_name="next to"),   # wrong (symmetric)
    ]
    write_relation(vg_root, records)
    result = evaluate(FakeEncoder(RELATION_TEXTS), vg_root, ["vg_relation"])
    # "on": 2/3, "holding": 1/1, "next to" left out → macro (2/3 + 1) / 2 = 5/6.
    # (Micro over kept cases would be 3/4; with "next to" kept the macro would be (2/3 + 1 + 0) / 3 = 5/9.)
    assert result["vg_relation"] == pytest.approx(100 * 5 / 6)
    assert result["average"] == pytest.approx(100 * 5 / 6)


def test_symmetric_list_matches_the_release():
    # spot checks against the `symmetric` list of the release's replication notebook (157 relations)
    assert len(SYMMETRIC_RELATIONS) == 157
    listed = {"adjusting", "attached to", "between", "next to", "near", "with", "of", "by", "around"}
    assert listed <= SYMMETRIC_RELATIONS
    assert not {"on", "holding", "behind", "in front of", "above", "under", "wearing"} & SYMMETRIC_RELATIONS


def test_vg_crop_box_is_applied(vg_root):
    # boxed.png is 48 red pixels and 16 green ones; the box (4, 4, 4, 4) is all green.
    # Cropped: green image, "green thing" (GREEN) beats "red thing" (RED) → right → 100.
    # Box ignored: mean colour (48, 16, 0)/64·255, closer to RED → wrong → 0.
    write_relation(vg_root, [vg_record("boxed.png", "green thing", "red thing", box=(4, 4, 4, 4), relation_name="on")])
    encoder = FakeEncoder({"green thing": GREEN, "red thing": RED})
    assert evaluate(encoder, vg_root, ["vg_relation"])["vg_relation"] == 100.0
    ref = ImageRef(vg_root / "images/boxed.png", (4, 4, 4, 4))
    assert torch.allclose(encoder.images([ref]), torch.tensor([GREEN]))  # the fake sees the crop


def test_vg_attribution_macro_over_pairs_with_min_count(vg_root):
    right = ("the white dog and the black cat", "the black dog and the white cat")
    texts = {right[0]: RED, right[1]: GREEN}

    def cases(image, n, pair):
        return [vg_record(image, *right, attributes=list(pair)) for _ in range(n)]

    records = (cases("red.png", 20, ("white", "black")) + cases("green.png", 5, ("white", "black"))  # 20/25
               + cases("red.png", 15, ("small", "big")) + cases("green.png", 15, ("small", "big"))    # 15/30
               + cases("green.png", 24, ("black", "white")))  # 0/24: under 25 cases, left out
    (vg_root / "visual_genome_attribution.json").write_text(json.dumps(records))
    result = evaluate(FakeEncoder(texts), vg_root, ["vg_attribution"])
    # macro over the kept pairs: (20/25 + 15/30) / 2 = (0.8 + 0.5) / 2 = 0.65.
    # (Micro: 35/55 = 63.6; small pair kept: (0.8 + 0.5 + 0)/3 = 43.3; pair key sorted, so "black_white" merged
    # into "white_black": (20/49 + 0.5)/2 = 45.4.)
    assert result["vg_attribution"] == pytest.approx(65.0)


def test_macro_accuracy_by_hand():
    correct = torch.tensor([True, True, False, True, False, False, True])
    groups = ["a", "a", "a", "b", "c", "c", "c"]
    assert macro_accuracy(correct, groups) == pytest.approx(100 * (2 / 3 + 1 + 1 / 3) / 3)  # 66.67, micro 57.1
    assert macro_accuracy(correct, groups, exclude=frozenset({"b"})) == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert macro_accuracy(correct, groups, min_count=3) == pytest.approx(50.0)  # "b" has 1 case
    with pytest.raises(ValueError):
        macro_accuracy(correct, groups, exclude=frozenset("abc"))


# ------------------------------------------------------------------------------------------ order perturbations

NOUNS = ["dog", "cat", "man", "woman", "table", "chair", "street", "car", "tree", "house", "dogs", "cats"]
ADJS = ["red", "big", "small", "old", "young", "green", "tall", "wooden", "white", "happy"]


def penn_tagger(text):
    """A stand-in for spaCy: words and single punctuation marks, nouns NN, adjectives JJ, else DT or '.'."""
    return [(tok, "NN" if tok.lower() in NOUNS else "JJ" if tok.lower() in ADJS else "DT" if tok.isalnum() else ".")
            for tok in re.findall(r"\w+|[^\w\s]", text)]


def word_tokenize(text):
    """A stand-in for NLTK (its own test is below): words, and apostrophe suffixes and marks split off."""
    return re.findall(r"'\w+|\w+|[^\w\s]", text)


def blip_pre_caption(caption, max_words):
    """salesforce/BLIP data/utils.py pre_caption, written out as it reads there."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


def official_order_options(records, tagger, tokenize, seed):
    """The release's COCO_Order.__init__ with its TextShuffler, written out as they read: the noun/adjective
    shuffles draw from numpy's global generator, the trigram ones from Python's, both seeded by seed_all."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)

    def shuffle_nouns_and_adj(ex):
        doc = tagger(ex)
        text = np.array([token for token, _ in doc])
        noun_idx = [i for i, (_, tag) in enumerate(doc) if tag in ["NN", "NNS", "NNP", "NNPS"]]
        adjective_idx = [i for i, (_, tag) in enumerate(doc) if tag in ["JJ", "JJR", "JJS"]]
        text[noun_idx] = np.random.permutation(text[noun_idx])
        text[adjective_idx] = np.random.permutation(text[adjective_idx])
        return " ".join(text)

    def shuffle_allbut_nouns_and_adj(ex):
        doc = tagger(ex)
        text = np.array([token for token, _ in doc])
        noun_adj_idx = [i for i, (_, tag) in enumerate(doc) if tag in ["NN", "NNS", "NNP", "NNPS", "JJ", "JJR", "JJS"]]
        else_idx = np.ones(text.shape[0])
        else_idx[noun_adj_idx] = 0
        else_idx = else_idx.astype(bool)
        text[else_idx] = np.random.permutation(text[else_idx])
        return " ".join(text)

    def get_trigrams(sentence):
        trigrams, trigram = [], []
        for i in range(len(sentence)):
            trigram.append(sentence[i])
            if i % 3 == 2:
                trigrams.append(trigram[:])
                trigram = []
        if trigram:
            trigrams.append(trigram)
        return trigrams

    def shuffle_within_trigrams(ex):
        trigrams = get_trigrams(tokenize(ex))
        for trigram in trigrams:
            random.shuffle(trigram)
        return " ".join([" ".join(trigram) for trigram in trigrams])

    def shuffle_trigrams(ex):
        trigrams = get_trigrams(tokenize(ex))
        random.shuffle(trigrams)
        return " ".join([" ".join(trigram) for trigram in trigrams])

    functions = [shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams, shuffle_trigrams]
    try:
        return [[blip_pre_caption(caption, 30)] + [blip_pre_caption(fn(caption), 30) for fn in functions]
                for ann in records for caption in ann["caption"]]
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


LONG = ("A big red dog is on the old table near the small cat, and a happy young man with a tall green tree "
        "stands by the white wooden house on the street while two cats watch a woman in a car")  # 37 words
COCO = [{"image": "val2014/COCO_val2014_000000000001.jpg", "id": 0,
         "caption": ["A dog.", "A big red dog on the table.", LONG, "Dogs", "The man's \"tall\" hat!"]},
        {"image": "val2014/COCO_val2014_000000000002.jpg", "id": 1,
         "caption": ["Two cats.", "A cat", "The old man and the young woman by a car.", "Cats!", "A red car."]},
        {"image": "val2014/COCO_val2014_000000000003.jpg", "id": 2,
         "caption": ["A happy dog.", "Trees", "A tall tree near the house.", "The dog", "A green chair."]}]
FLICKR = [{"image": "flickr30k-images/1000092795.jpg", "caption": ["A dog.", "Two young men by a tree.", "Dogs"]},
          {"image": "flickr30k-images/10002456.jpg", "caption": ["A man", "Cats", "A big dog and a small cat."]}]
COLOURS = {"COCO_val2014_000000000001.jpg": (255, 0, 0), "COCO_val2014_000000000002.jpg": (0, 255, 0),
           "COCO_val2014_000000000003.jpg": (255, 0, 0), "1000092795.jpg": (0, 255, 0), "10002456.jpg": (255, 0, 0)}
OFF = (1.0, 1.0, 0.0)  # any text that is not a true caption: cos 0.71 with red and with green


def write_order(folder, records):
    (folder / ("coco_karpathy_test.json" if "val2014" in records[0]["image"] else "flickr30k_test.json")).write_text(
        json.dumps(records))
    for record in records:
        save_image(folder / record["image"], COLOURS[record["image"].split("/")[-1]])


@pytest.fixture
def order_root(tmp_path):
    """ARO's layout: each Karpathy json beside its image folder (COCO_ROOT/val2014, FLICKR_ROOT/flickr30k-images)."""
    (tmp_path / "coco").mkdir()
    (tmp_path / "flickr30k").mkdir()
    write_order(tmp_path / "coco", COCO)
    write_order(tmp_path / "flickr30k", FLICKR)
    return tmp_path


def precision_at_1(records, options, strict=False):
    """Second implementation of the scoring: a true caption embeds RED, any other text OFF; the image is its
    colour; correct when np.argmax over the options is 0 (the release) or, for `strict`, when the caption beats
    every perturbation (our old rule)."""
    truths = {blip_pre_caption(c, 30) for r in records for c in r["caption"]}
    colours = [COLOURS[r["image"].split("/")[-1]] for r in records for _ in r["caption"]]
    correct = []
    for colour, case in zip(colours, options):
        img = np.array(colour, dtype=np.float32) / np.linalg.norm(colour)
        sims = [float(img @ (np.array(RED if text in truths else OFF) / np.linalg.norm(RED if text in truths else OFF)))
                for text in case]
        correct.append(sims[0] > max(sims[1:]) if strict else int(np.argmax(sims)) == 0)
    return 100.0 * sum(correct) / len(correct)


def test_order_options_are_drawn_as_the_release_draws_them(order_root):
    suite = prepare_aro(order_root, AroEvalConfig(subsets=["coco_order", "flickr30k_order"]), penn_tagger, word_tokenize)
    for name, records in (("coco_order", COCO), ("flickr30k_order", FLICKR)):
        assert suite.subsets[name].options == official_order_options(records, penn_tagger, word_tokenize, seed=1)
    other_seed = prepare_aro(order_root, AroEvalConfig(subsets=["coco_order"], seed=7), penn_tagger, word_tokenize)
    assert other_seed.subsets["coco_order"].options == official_order_options(COCO, penn_tagger, word_tokenize, 7)
    assert other_seed.subsets["coco_order"].options != suite.subsets["coco_order"].options
    long_options = suite.subsets["coco_order"].options[2]
    assert all(len(option.split(" ")) == 30 for option in long_options)  # 37 words cut to 30


def test_order_precision_at_1_counts_an_unchanged_shuffle_as_correct(order_root):
    text_vecs = {blip_pre_caption(c, 30): RED for r in COCO + FLICKR for c in r["caption"]}
    encoder = FakeEncoder(text_vecs, default=OFF)
    result = evaluate(encoder, order_root, ["coco_order", "flickr30k_order"], penn_tagger, word_tokenize)
    for name, records in (("coco_order", COCO), ("flickr30k_order", FLICKR)):
        options = official_order_options(records, penn_tagger, word_tokenize, seed=1)
        official, strict = precision_at_1(records, options), precision_at_1(records, options, strict=True)
        assert result[name] == pytest.approx(official)
        assert official > strict  # the fixture separates the rules: ties with an unchanged shuffle exist
    # By hand for Flickr30k: the red image's three captions beat every changed option (1 > 0.71) → 3 right;
    # on the green image "Dogs" (one token) is unchanged by every shuffle → a 4-way tie at 0 → right; "A dog."
    # and the 5-word caption each have a changed option at 0.71 → wrong. 4 of 6.
    assert result["flickr30k_order"] == pytest.approx(100 * 4 / 6)
    assert result["average"] == pytest.approx((result["coco_order"] + result["flickr30k_order"]) / 2)
    assert result.averaged_over["average"] == ["coco_order", "flickr30k_order"]


def test_order_correct_is_argmax_zero():
    img = torch.tensor([[1.0, 0.0]] * 3)
    low, high = [0.6, 0.8], [0.8, 0.6]
    options = torch.tensor([
        [[1.0, 0.0], low, low, low, low],           # 1 > 0.6: right
        [[0.8, 0.6], low, low, low, [1.0, 0.0]],    # loses to the last (1.0): wrong
        [[0.8, 0.6], low, high, low, low],          # 0.8 == 0.8: argmax takes the first, the caption: right
    ])
    assert order_correct(img, options).tolist() == [True, False, True]


def test_order_perturbations_move_what_the_release_moves():
    caption = "A big red dog is on the old table near the small cat"
    words = caption.split()
    rng = OrderRandom.seeded(3)
    nouns_adj, allbut, within, across = (option.split() for option in
                                         order_perturbations(caption, penn_tagger, word_tokenize, rng))
    fixed = [i for i, w in enumerate(words) if w.lower() not in NOUNS + ADJS]
    assert [nouns_adj[i] for i in fixed] == [words[i] for i in fixed]
    content = [i for i in range(len(words)) if i not in fixed]
    assert [allbut[i] for i in content] == [words[i] for i in content]
    assert all(sorted(within[i:i + 3]) == sorted(words[i:i + 3]) for i in range(0, len(words), 3))
    assert sorted(across) == sorted(words)


def test_pre_caption_as_blip_writes_it():
    cases = ['A "Dog"  (brown); runs!~', "One, two.", "a\tdog", "a \t dog", "dog.\n", "  Two  cats  ",
             " ".join(["w"] * 31), LONG + ".", "¿Qué? #tag*"]
    assert [pre_caption(c, 30) for c in cases] == [blip_pre_caption(c, 30) for c in cases]
    assert pre_caption('A "Dog"  (brown); runs!~', 30) == "a dog brown runs"  # by hand
    assert pre_caption("One, two.", 30) == "one, two"  # commas stay
    assert pre_caption("a\tdog", 30) == "a\tdog"  # a lone tab is not a run of two
    assert pre_caption(" ".join(["w"] * 31), 30) == " ".join(["w"] * 30)


# --------------------------------------------------------------------------------------------- layouts, errors

def test_all_four_with_order_roots_elsewhere(vg_root, tmp_path_factory):
    write_relation(vg_root, [vg_record("red.png", "the cup is on the table", "the table is on the cup",
                                       relation_name="on")])  # right → 100
    attribution = [vg_record("green.png", "a white dog", "a black dog", attributes=["white", "black"])] * 25  # 0
    (vg_root / "visual_genome_attribution.json").write_text(json.dumps(attribution))
    coco_root, flickr_root = tmp_path_factory.mktemp("coco"), tmp_path_factory.mktemp("flickr")
    write_order(coco_root, COCO)
    write_order(flickr_root, FLICKR)
    texts = {"the cup is on the table": RED, "the table is on the cup": GREEN, "a white dog": RED,
             "a black dog": GREEN, **{blip_pre_caption(c, 30): RED for r in COCO + FLICKR for c in r["caption"]}}
    result = evaluate(FakeEncoder(texts, default=OFF), vg_root, aro.SUBSETS, penn_tagger, word_tokenize,
                      coco_root=str(coco_root), flickr30k_root=str(flickr_root))
    assert list(result) == ["vg_relation", "vg_attribution", "coco_order", "flickr30k_order", "average"]
    assert result["vg_relation"] == 100.0 and result["vg_attribution"] == 0.0
    assert result["flickr30k_order"] == pytest.approx(100 * 4 / 6)
    assert result["average"] == pytest.approx((100 + 0 + result["coco_order"] + 100 * 4 / 6) / 4)


def test_missing_files_fail_before_any_embedding(vg_root, order_root):
    encoder = FakeEncoder({}, default=RED)
    write_relation(vg_root, [vg_record("red.png", "x", "y", relation_name="on")])
    # a requested subset whose file is absent is an error, not skipped, even if another subset is fine
    with pytest.raises(EvalDataError, match=re.escape(str(vg_root / "visual_genome_attribution.json"))):
        evaluate(encoder, vg_root, ["vg_relation", "vg_attribution"])
    (order_root / "flickr30k/flickr30k_test.json").unlink()
    with pytest.raises(EvalDataError, match=re.escape(str(order_root / "flickr30k/flickr30k_test.json"))
                       + ".*evaluation.aro.flickr30k_root"):
        evaluate(encoder, order_root, ["coco_order", "flickr30k_order"], penn_tagger, word_tokenize)
    (order_root / "coco/val2014/COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(EvalDataError, match="COCO_val2014_000000000002.jpg"):
        evaluate(encoder, order_root, ["coco_order"], penn_tagger, word_tokenize)
    write_relation(vg_root, [vg_record("absent.png", "x", "y", relation_name="on")])
    with pytest.raises(EvalDataError, match="absent.png"):
        evaluate(encoder, vg_root, ["vg_relation"])
    write_relation(vg_root, [{"image_path": "red.png", "true_caption": "x", "false_caption": "y"}])
    with pytest.raises(EvalDataError, match="bbox_x"):
        evaluate(encoder, vg_root, ["vg_relation"])
    assert encoder.calls == 0
    with pytest.raises(ValueError, match="coco"):
        evaluate(encoder, vg_root, ["coco"])


def test_missing_spacy_or_nltk_is_one_line_naming_the_extra(order_root, monkeypatch, tmp_path):
    aro._spacy_pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` now raises ImportError
    with pytest.raises(EvalDependencyError, match=re.escape("pip install '.[aro]'")):
        prepare_aro(order_root, AroEvalConfig(subsets=["coco_order"]), tokenize=word_tokenize)

    def no_model(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=no_model))
    with pytest.raises(EvalDependencyError, match="en_core_web_sm.*python -m spacy download en_core_web_sm"):
        prepare_aro(order_root, AroEvalConfig(subsets=["coco_order"]), tokenize=word_tokenize)
    aro._spacy_pipeline.cache_clear()
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "empty"))
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    with pytest.raises(EvalDependencyError, match="punkt_tab.*python -m nltk.downloader punkt_tab"):
        prepare_aro(order_root, AroEvalConfig(subsets=["coco_order"]), tagger=penn_tagger)
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(EvalDependencyError, match="NLTK"):
        prepare_aro(order_root, AroEvalConfig(subsets=["coco_order"]), tagger=penn_tagger)


def test_trigram_tokens_are_nltk_word_tokenize(monkeypatch, tmp_path):
    """The default tokeniser is NLTK's word_tokenize (a sentence model with no learned parameters is enough
    here): quotes become `` and '', contractions split as the Penn Treebank does, which spaCy does not."""
    import nltk
    punkt = tmp_path / "tokenizers/punkt_tab/english"
    punkt.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).touch()
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    tokenize = aro.nltk_tokenizer()
    assert tokenize('The man\'s "tall" hat. Dogs can\'t run.') == \
        ["The", "man", "'s", "``", "tall", "''", "hat", ".", "Dogs", "ca", "n't", "run", "."]


def test_spacy_tagger_gives_penn_tags(monkeypatch):
    """A stand-in spaCy: the default tagger hands on its tokens' Penn tags (token.tag_), which the release reads."""
    token = types.SimpleNamespace
    doc = [token(text="Paris", tag_="NNP"), token(text="pre", tag_="AFX"), token(text="is", tag_="VBZ"),
           token(text="big", tag_="JJ")]

    class NLP:
        pipe_names = ["tok2vec", "tagger", "parser", "attribute_ruler", "ner"]

        def select_pipes(self, disable):
            self.disabled = disable

        def __call__(self, text):
            return doc

    nlp = NLP()
    aro._spacy_pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=lambda name: nlp))
    assert aro.spacy_tagger()("Paris pre is big") == [("Paris", "NNP"), ("pre", "AFX"), ("is", "VBZ"), ("big", "JJ")]
    assert nlp.disabled == ["parser", "ner"]
    aro._spacy_pipeline.cache_clear()
