"""ARO evaluator on fabricated files in the released format: strict ties, macro averaging, the symmetric
relations and small attribute pairs left out, crop boxes applied, the four order perturbations, precision@1,
missing files and a missing spaCy. Every expected number is worked out by hand in the comments."""
from __future__ import annotations

import itertools
import json
import random
import re
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from degla_scale.eval import aro
from degla_scale.eval.aro import (
    SYMMETRIC_RELATIONS,
    TaggerUnavailableError,
    evaluate_aro,
    macro_accuracy,
    normalise_caption,
    order_correct,
    order_perturbations,
    ptb_to_universal,
)
from degla_scale.eval.common import EvalDataError, ImageRef

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
    result = evaluate_aro(FakeEncoder(RELATION_TEXTS), vg_root, subsets=["vg_relation"])
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
    assert evaluate_aro(encoder, vg_root, subsets=["vg_relation"])["vg_relation"] == 100.0
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
    result = evaluate_aro(FakeEncoder(texts), vg_root, subsets=["vg_attribution"])
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

NOUNS = ["dog", "cat", "man", "woman", "table", "chair", "street", "car", "tree", "house"]
ADJS = ["red", "big", "small", "old", "young", "green", "tall", "wooden", "white", "happy"]
OTHERS = ["a", "the", "on", "with", "is", "and", "of", "by", "under", "near"]
TAGS = {**{w: "NOUN" for w in NOUNS}, **{w: "ADJ" for w in ADJS}, **{w: "DET" for w in OTHERS}}


def dict_tagger(text):
    """Tokens are words and single punctuation marks; tags from TAGS (punctuation PUNCT, unknown X)."""
    return [(tok, TAGS.get(tok.lower(), "PUNCT" if not tok.isalnum() else "X"))
            for tok in re.findall(r"\w+|[^\w\s]", text)]


# 30 distinct words: adjective, noun, other, ten times over; capitalised and with a full stop
LONG = " ".join(w for triple in zip(ADJS, NOUNS, OTHERS) for w in triple).capitalize() + "."
LONG_NORMALISED = " ".join(w for triple in zip(ADJS, NOUNS, OTHERS) for w in triple)  # lower case, no "."


def test_perturbations_by_construction():
    caption = "A big red dog is on the old table near the small cat"
    words = caption.split()
    noun_pos = [i for i, w in enumerate(words) if w in NOUNS]      # dog, table, cat
    adj_pos = [i for i, w in enumerate(words) if w in ADJS]        # big, red, old, small
    other_pos = [i for i in range(len(words)) if i not in noun_pos + adj_pos]
    seen = set()
    for seed in range(20):
        options = order_perturbations(caption, dict_tagger, random.Random(seed))
        assert len(options) == 4
        nouns_adj, allbut, within, across = (option.split() for option in options)
        seen.add(tuple(options))
        for option in (nouns_adj, allbut, within, across):
            assert Counter(option) == Counter(words)  # only the order changes
        # 1: nouns stay on noun positions, adjectives on adjective positions, everything else in place
        assert Counter(nouns_adj[i] for i in noun_pos) == Counter(words[i] for i in noun_pos)
        assert Counter(nouns_adj[i] for i in adj_pos) == Counter(words[i] for i in adj_pos)
        assert [nouns_adj[i] for i in other_pos] == [words[i] for i in other_pos]
        # 2: nouns and adjectives in place, the rest among the rest's positions
        assert [allbut[i] for i in noun_pos + adj_pos] == [words[i] for i in noun_pos + adj_pos]
        # 3: each trigram (A big red | dog is on | the old table | near the small | cat) keeps its words
        for start in range(0, len(words), 3):
            assert Counter(within[start:start + 3]) == Counter(words[start:start + 3])
        # 4: a concatenation of the same five trigrams, each intact, in some order
        trigrams = [words[i:i + 3] for i in range(0, len(words), 3)]
        assert any(list(itertools.chain(*order)) == across for order in itertools.permutations(trigrams))
    assert len(seen) > 1  # the seed matters
    for seed in (0, 7):  # ... and fixes the result
        assert (order_perturbations(caption, dict_tagger, random.Random(seed))
                == order_perturbations(caption, dict_tagger, random.Random(seed)))


def test_normalise_caption():
    assert normalise_caption('A "Dog"  (brown); runs!~') == "a dog brown runs"
    assert normalise_caption("One, two.") == "one, two"  # commas are kept, as in the release
    assert normalise_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
    assert normalise_caption(LONG) == LONG_NORMALISED


def test_order_correct_needs_to_beat_all_four():
    img = torch.tensor([[1.0, 0.0]] * 3)
    low, high, same = [0.6, 0.8], [0.8, 0.6], [1.0, 0.0]
    options = torch.tensor([
        [[1.0, 0.0], low, low, low, low],    # 1 > 0.6 (all): right
        [[0.8, 0.6], low, low, low, same],   # 0.8 beats three, loses to the last (1.0): wrong
        [[0.8, 0.6], low, high, low, low],   # 0.8 == 0.8: tie, wrong
    ])
    assert order_correct(img, options).tolist() == [True, False, False]


def test_ptb_to_universal_moves_what_the_release_moves():
    assert [ptb_to_universal(t, p) for t, p in [("NN", "NOUN"), ("NNPS", "PROPN"), ("JJR", "ADJ"), ("AFX", "ADJ"),
                                                 ("VBZ", "VERB"), ("DT", "DET")]] == \
        ["NOUN", "PROPN", "ADJ", "X", "VERB", "DET"]


@pytest.fixture
def order_root(tmp_path):
    """Karpathy-format COCO and Flickr30k test files with one red and one green image each."""
    for folder, image_dir in (("coco", "val2014"), ("flickr30k", "flickr30k-images")):
        save_image(tmp_path / folder / image_dir / "red.jpg", (255, 0, 0))
        save_image(tmp_path / folder / image_dir / "green.jpg", (0, 255, 0))
    nouns_and_adj_only = " ".join(ADJS + NOUNS)  # no other word: perturbation 2 changes nothing
    coco = [{"image": "val2014/red.jpg", "caption": [LONG, nouns_and_adj_only]},
            {"image": "val2014/green.jpg", "caption": [LONG]}]
    flickr = [{"image": "flickr30k-images/red.jpg", "caption": [LONG]}]
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(coco))
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(flickr))
    return tmp_path


def test_order_precision_at_1(order_root):
    # The true LONG caption (normalised) embeds as RED; every other text (a perturbation) as (1, 1, 0)/√2.
    # coco: red + LONG: 1 > 0.71 → right. red + nouns/adjectives only: that caption is RED too, but its
    # second perturbation is the caption itself → tie → wrong. green + LONG: 0 < 0.71 → wrong. → 1/3.
    # flickr: red + LONG → right → 1/1. (LONG has 30 distinct words: a shuffle leaving it unchanged has
    # probability ≤ 6^-10, and the seed is fixed.)
    texts = {LONG_NORMALISED: RED, " ".join(ADJS + NOUNS): RED}
    encoder = FakeEncoder(texts, default=(1.0, 1.0, 0.0))
    result = evaluate_aro(encoder, order_root, subsets=("coco_order", "flickr30k_order"), tagger=dict_tagger)
    assert result == pytest.approx({"coco_order": 100 / 3, "flickr30k_order": 100.0, "average": (100 / 3 + 100) / 2})
    again = evaluate_aro(encoder, order_root, subsets=("coco_order", "flickr30k_order"), tagger=dict_tagger, seed=0)
    assert again == result


def test_all_four_and_their_average(vg_root, order_root):
    # vg_root and order_root are the same tmp_path: one suite root holding all four subsets
    write_relation(vg_root, [vg_record("red.png", "the cup is on the table", "the table is on the cup",
                                       relation_name="on")])  # right → 100
    attribution = [vg_record("green.png", "a white dog", "a black dog", attributes=["white", "black"])] * 25  # 0
    (vg_root / "visual_genome_attribution.json").write_text(json.dumps(attribution))
    texts = {"the cup is on the table": RED, "the table is on the cup": GREEN, "a white dog": RED,
             "a black dog": GREEN, LONG_NORMALISED: RED, " ".join(ADJS + NOUNS): RED}
    result = evaluate_aro(FakeEncoder(texts, default=(1.0, 1.0, 0.0)), vg_root, tagger=dict_tagger)
    # (100 + 0 + 100/3 + 100) / 4
    assert list(result) == ["vg_relation", "vg_attribution", "coco_order", "flickr30k_order", "average"]
    assert result["average"] == pytest.approx((100 + 0 + 100 / 3 + 100) / 4)


# ---------------------------------------------------------------------------------------------- missing things

def test_missing_files_fail_before_any_embedding(vg_root, order_root):
    encoder = FakeEncoder({}, default=RED)
    write_relation(vg_root, [vg_record("red.png", "x", "y", relation_name="on")])
    # a requested subset whose file is absent is an error, not skipped, even if another subset is fine
    with pytest.raises(EvalDataError, match=re.escape(str(vg_root / "visual_genome_attribution.json"))):
        evaluate_aro(encoder, vg_root, subsets=["vg_relation", "vg_attribution"])
    (order_root / "flickr30k_test.json").unlink()
    with pytest.raises(EvalDataError, match=re.escape(str(order_root / "flickr30k_test.json"))):
        evaluate_aro(encoder, order_root, subsets=["coco_order", "flickr30k_order"], tagger=dict_tagger)
    (order_root / "coco/val2014/green.jpg").unlink()
    with pytest.raises(EvalDataError, match="green.jpg"):
        evaluate_aro(encoder, order_root, subsets=["coco_order"], tagger=dict_tagger)
    write_relation(vg_root, [vg_record("absent.png", "x", "y", relation_name="on")])
    with pytest.raises(EvalDataError, match="absent.png"):
        evaluate_aro(encoder, vg_root, subsets=["vg_relation"])
    write_relation(vg_root, [{"image_path": "red.png", "true_caption": "x", "false_caption": "y"}])
    with pytest.raises(EvalDataError, match="bbox_x"):
        evaluate_aro(encoder, vg_root, subsets=["vg_relation"])
    assert encoder.calls == 0
    with pytest.raises(ValueError, match="coco"):
        evaluate_aro(encoder, vg_root, subsets=["coco"])


def test_missing_spacy_is_one_clear_error(order_root, monkeypatch):
    aro._spacy_pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` now raises ImportError
    encoder = FakeEncoder({}, default=RED)
    with pytest.raises(TaggerUnavailableError, match=re.escape("pip install spacy && python -m spacy download "
                                                               "en_core_web_sm")):
        evaluate_aro(encoder, order_root, subsets=["coco_order"])
    assert encoder.calls == 0

    def no_model(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=no_model))
    with pytest.raises(TaggerUnavailableError, match="en_core_web_sm"):
        evaluate_aro(encoder, order_root, subsets=["coco_order"])
    aro._spacy_pipeline.cache_clear()


def test_spacy_tagger_wiring(monkeypatch):
    """A stand-in spaCy: the default tagger turns its tokens' Penn tags into the universal tags the
    perturbations read (so proper nouns move with nouns and an AFX-tagged "ADJ" stays put)."""
    token = types.SimpleNamespace
    doc = [token(text="Paris", tag_="NNP", pos_="PROPN"), token(text="pre", tag_="AFX", pos_="ADJ"),
           token(text="is", tag_="VBZ", pos_="AUX"), token(text="big", tag_="JJ", pos_="ADJ")]

    class NLP:
        def __init__(self):
            self.pipe_names = ["tok2vec", "tagger", "parser", "attribute_ruler", "ner"]

        def select_pipes(self, disable):
            self.disabled = disable

        def __call__(self, text):
            return doc

    nlp = NLP()
    aro._spacy_pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=lambda name: nlp))
    assert aro.spacy_tagger()("Paris pre is big") == [("Paris", "PROPN"), ("pre", "X"), ("is", "AUX"), ("big", "ADJ")]
    assert nlp.disabled == ["parser", "ner"]
    aro._spacy_pipeline.cache_clear()
