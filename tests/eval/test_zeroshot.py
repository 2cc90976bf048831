"""Zero-shot classification: metrics on an imbalanced set, prompt-ensemble averaging, the classes.json
(synthetic) and folder-name layouts, tie handling, and one clear error for missing data.

Every expected number is worked out by hand in the comments; the fake encoder's embeddings make the
ranking of classes for each image known in advance."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from degla_scale.eval.common import EvalDataError
from degla_scale.eval.templates import GENERIC, TEMPLATES
from degla_scale.eval.zeroshot import evaluate_zeroshot, evaluate_zeroshot_dataset

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


class FakeEncoder:
    """Images embed by their colour (nearest of a few known ones), or by their class folder; texts by a
    function of the prompt. Records every prompt it is asked to embed."""

    def __init__(self, text_fn, colour_vecs=None, folder_fn=None):
        self.text_fn, self.colour_vecs, self.folder_fn = text_fn, colour_vecs, folder_fn
        self.prompts: list[str] = []

    def images(self, refs, desc="images"):
        rows = []
        for ref in refs:
            if self.folder_fn is not None:
                rows.append(self.folder_fn(ref.path.parent.name))
                continue
            pixel = ref.load().getpixel((2, 2))
            nearest = min(self.colour_vecs, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, pixel)))
            rows.append(self.colour_vecs[nearest])
        return _unit(rows)

    def texts(self, texts, desc="texts"):
        self.prompts += list(texts)
        return _unit([self.text_fn(t) for t in texts])


def _unit(rows) -> torch.Tensor:
    v = torch.tensor(rows, dtype=torch.float32)
    return v / v.norm(dim=-1, keepdim=True)


def _save(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}[path.suffix]
    Image.new("RGB", (6, 6), colour).save(path, format=fmt)


def _one_hot_by_name(names: list[str]):
    """Text embedding: one-hot of the single class name the prompt contains."""
    def embed(prompt: str) -> list[float]:
        hits = [i for i, n in enumerate(names) if n in prompt]
        assert len(hits) == 1, f"prompt {prompt!r} should name exactly one class"
        return [float(i == hits[0]) for i in range(len(names))]
    return embed


# Six classes, imbalanced. Image score vectors over the classes (class text embeddings are one-hot):
#   RED  → [6,5,4,3,2,1]: class 0 ranks 0, class 1 rank 1, ..., class 5 rank 5
#   BLUE → [1,2,3,4,5,6]: class 5 ranks 0, class 0 rank 5
#   GREEN→ [1,2,6,3,4,5]: class 2 ranks 0
FOLDERS = ["apple_pie", "bread", "cheese_cake", "donut", "egg", "fries"]
NAMES = ["apple pie", "bread", "cheese cake", "donut", "egg", "fries"]
COLOUR_VECS = {RED: [6, 5, 4, 3, 2, 1], BLUE: [1, 2, 3, 4, 5, 6], GREEN: [1, 2, 6, 3, 4, 5]}
IMAGES = {  # class folder → colours of its images
    "apple_pie": [RED, RED, RED, BLUE],  # ranks 0,0,0,5 → top-1 3/4, top-5 3/4
    "bread": [RED],                      # rank 1      → top-1 0/1, top-5 1/1
    "cheese_cake": [GREEN],              # rank 0      → 1/1, 1/1
    "donut": [RED],                      # rank 3      → 0/1, 1/1
    "egg": [RED],                        # rank 4      → 0/1, 1/1
    "fries": [BLUE, BLUE],               # ranks 0,0   → 2/2, 2/2
}
# acc1 = (3+0+1+0+0+2)/10 = 60 %; acc5 = 9/10 = 90 %;
# mean per-class recall = (3/4 + 0 + 1 + 0 + 0 + 1) / 6 = 2.75/6 = 45.833... % (≠ acc1: the imbalance)
EXPECTED = {"acc1": 60.0, "acc5": 90.0, "mean_per_class_recall": 100 * 2.75 / 6}


def _write_toyset(folder: Path) -> None:
    suffixes = [".png", ".jpg", ".jpeg", ".png"]
    for sub, colours in IMAGES.items():
        for i, colour in enumerate(colours):
            _save(folder / sub / f"img{i}{suffixes[i]}", colour)
    (folder / "apple_pie" / "notes.txt").write_text("not an image: ImageFolder skips it")


def _close(got: dict, expected: dict, prefix: str = "") -> None:
    for key, value in expected.items():
        assert math.isclose(got[prefix + key], value, abs_tol=1e-4), (prefix + key, got[prefix + key], value)


def test_imbalanced_metrics_from_folder_names(tmp_path):
    _write_toyset(tmp_path / "toyset")
    enc = FakeEncoder(_one_hot_by_name(NAMES), COLOUR_VECS)
    result = evaluate_zeroshot(enc, tmp_path)
    _close(result, EXPECTED, "toyset/")
    assert set(result) == {f"toyset/{m}" for m in EXPECTED}  # one dataset: no average keys
    # class names from folder names ('_' → ' '), prompts from the generic fallback (unknown dataset name)
    assert set(enc.prompts) == {t.format(n) for n in NAMES for t in GENERIC}


def test_single_dataset_folder_and_unprefixed_form(tmp_path):
    _write_toyset(tmp_path / "toyset")
    enc = FakeEncoder(_one_hot_by_name(NAMES), COLOUR_VECS)
    _close(evaluate_zeroshot(enc, tmp_path / "toyset"), EXPECTED)  # root is itself the dataset: bare keys
    _close(evaluate_zeroshot_dataset(enc, tmp_path / "toyset"), EXPECTED)


def test_average_over_datasets(tmp_path):
    _write_toyset(tmp_path / "toyset")
    # a second dataset where every image is right: two classes, RED→class 0, BLUE→class 1
    _save(tmp_path / "easy" / "x_red" / "0.png", RED)
    _save(tmp_path / "easy" / "y_blue" / "0.png", BLUE)
    toy_text = _one_hot_by_name(NAMES)

    def text_fn(prompt):
        if "x red" in prompt:
            return [1.0, 0, 0, 0, 0, 0]
        if "y blue" in prompt:
            return [0, 0, 0, 0, 0, 1.0]
        return toy_text(prompt)

    enc = FakeEncoder(text_fn, COLOUR_VECS)
    result = evaluate_zeroshot(enc, tmp_path)
    # easy: RED [6,..,1] → class 0 (x red) first; BLUE [1,..,6] → class "y blue" (dim 5) first → 100 %
    assert result["easy/acc1"] == 100.0
    assert math.isclose(result["average/acc1"], (60.0 + 100.0) / 2)
    assert math.isclose(result["average/mean_per_class_recall"], (100 * 2.75 / 6 + 100.0) / 2, abs_tol=1e-4)
    only = evaluate_zeroshot(enc, tmp_path, datasets=["easy"])
    assert set(only) == {f"easy/{m}" for m in EXPECTED}  # one dataset: no average keys


def test_prompt_ensemble_is_averaged_and_renormalised(tmp_path):
    # Two templates. Text vectors (3-d):   "A cat." (0.2, +0.98, 0)   "B cat." (0.2, -0.98, 0)
    #                                      "A dog." (0.3, 0, 0.954)   "B dog." (0.3, 0, 0.954)
    # Images: cat = RED → (1,0,0); dog = BLUE → (0,0,1).
    # Averaged + renormalised: cat class (1,0,0), dog class (0.3,0,0.954).
    #   cat image: cat 1.0 > dog 0.3 → right; dog image: cat 0 < dog 0.954 → right → acc1 100.
    # First template only (or last only): cat image scores cat 0.2 < dog 0.3 → wrong → acc1 50.
    # Mean without renormalising: cat class (0.2,0,0) scores 0.2 < 0.3 → also wrong → 50.
    folder = tmp_path / "pets_ensemble"
    meta = {"classes": ["cat", "dog"], "folders": ["cat_dir", "dog_dir"], "templates": ["A {}.", "B {}."]}
    folder.mkdir()
    (folder / "classes.json").write_text(json.dumps(meta))
    _save(folder / "cat_dir" / "0.png", RED)
    _save(folder / "dog_dir" / "0.png", BLUE)
    s = math.sqrt(1 - 0.2 ** 2)
    d = math.sqrt(1 - 0.3 ** 2)
    vecs = {"A cat.": [0.2, s, 0.0], "B cat.": [0.2, -s, 0.0], "A dog.": [0.3, 0.0, d], "B dog.": [0.3, 0.0, d]}
    enc = FakeEncoder(vecs.__getitem__, {RED: [1, 0, 0], BLUE: [0, 0, 1]})
    assert evaluate_zeroshot_dataset(enc, folder)["acc1"] == 100.0
    assert evaluate_zeroshot_dataset(enc, folder, templates=["A {}."])["acc1"] == 50.0  # override argument
    assert evaluate_zeroshot_dataset(enc, folder, templates=["B {}."])["acc1"] == 50.0


def test_synthetic_split_with_classes_json(tmp_path):
    from degla_scale.data.synthetic import write_zeroshot

    classes = write_zeroshot(tmp_path / "zeroshot", seed=0, per_class=1)
    meta = json.loads((tmp_path / "zeroshot" / "classes.json").read_text())
    by_folder = dict(zip(meta["folders"], meta["classes"]))
    index = {c: i for i, c in enumerate(classes)}

    def one_hot(i: int) -> list[float]:
        return [float(j == i) for j in range(len(classes))]

    def text_fn(prompt):  # every synthetic template ends " {}."
        hits = [c for c in classes if prompt.endswith(f" {c}.")]
        assert len(hits) == 1, prompt
        return one_hot(index[hits[0]])

    right = FakeEncoder(text_fn, folder_fn=lambda f: one_hot(index[by_folder[f]]))
    result = evaluate_zeroshot(right, tmp_path / "zeroshot")
    assert result["acc1"] == 100.0 and result["mean_per_class_recall"] == 100.0
    assert set(right.prompts) == {t.format(c) for c in classes for t in meta["templates"]}
    # Each image embedded as the NEXT class: its true class scores 0 like all but one other → rank C-1 → 0 %.
    wrong = FakeEncoder(text_fn, folder_fn=lambda f: one_hot((index[by_folder[f]] + 1) % len(classes)))
    result = evaluate_zeroshot(wrong, tmp_path / "zeroshot")
    assert result["acc1"] == 0.0 and result["acc5"] == 0.0


def test_classnames_txt_and_registry_templates(tmp_path):
    folder = tmp_path / "imagenet"
    _save(folder / "n01443537" / "0.png", RED)
    _save(folder / "n01491361" / "0.png", BLUE)
    (folder / "classnames.txt").write_text("goldfish\ntiger shark\n")
    enc = FakeEncoder(_one_hot_by_name(["goldfish", "tiger shark"]), {RED: [1, 0], BLUE: [0, 1]})
    result = evaluate_zeroshot(enc, tmp_path)
    assert result["imagenet/acc1"] == 100.0
    assert set(enc.prompts) == {t.format(n) for n in ("goldfish", "tiger shark") for t in TEMPLATES["imagenet"]}
    assert not any("n014" in p for p in enc.prompts)


def test_ties_count_against_the_model(tmp_path):
    # Two classes, every image embedded at (1,1)/√2: both classes score 0.707 for every image.
    # Rank of the true class = other classes scoring >= it = 1 → top-1 wrong for all; k = min(5, 2) = 2 → right.
    _save(tmp_path / "d" / "a" / "0.png", RED)
    _save(tmp_path / "d" / "a" / "1.png", RED)
    _save(tmp_path / "d" / "b" / "0.png", BLUE)
    enc = FakeEncoder(lambda t: [1.0, 0.0] if t == "a photo of a." else [0.0, 1.0], {RED: [1, 1], BLUE: [1, 1]})
    result = evaluate_zeroshot_dataset(enc, tmp_path / "d", templates=["a photo of {}."])
    assert result == {"acc1": 0.0, "acc5": 100.0, "mean_per_class_recall": 0.0}


def test_missing_root_empty_class_and_bad_classes_json(tmp_path):
    enc = FakeEncoder(lambda t: [1.0], {RED: [1]})
    with pytest.raises(EvalDataError, match="nowhere"):
        evaluate_zeroshot(enc, tmp_path / "nowhere")

    _save(tmp_path / "ds" / "full" / "0.png", RED)
    (tmp_path / "ds" / "empty").mkdir()
    (tmp_path / "ds" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(EvalDataError, match=r"ds[/\\]empty holds no images") as err:
        evaluate_zeroshot(enc, tmp_path / "ds")
    assert "\n" not in str(err.value)

    with pytest.raises(EvalDataError, match="missing_one"):
        evaluate_zeroshot(enc, tmp_path, datasets=["missing_one"])

    bad = tmp_path / "bad"
    _save(bad / "a" / "0.png", RED)
    (bad / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "folders": ["a", "b"]}))
    with pytest.raises(EvalDataError, match=r"bad[/\\]b"):
        evaluate_zeroshot_dataset(enc, bad)

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(EvalDataError, match="no dataset folders"):
        evaluate_zeroshot(enc, nothing)


def test_template_registry_covers_the_clip_suite(tmp_path):
    from degla_scale.eval.templates import templates_for

    suite = ["imagenet", "cifar10", "cifar100", "food101", "flowers102", "stanford_cars", "fgvc_aircraft", "dtd",
             "eurosat", "oxford_pets", "sun397", "caltech101"]
    for name in suite:
        assert len(TEMPLATES[name]) >= 3 and all(t.count("{}") == 1 for t in TEMPLATES[name]), name
    assert templates_for("Oxford-Pets") == list(TEMPLATES["oxford_pets"])
    assert templates_for("pets") == list(TEMPLATES["oxford_pets"])
    assert templates_for("my_own_set") == list(GENERIC)
    _save(tmp_path / "d" / "a" / "0.png", RED)
    with pytest.raises(ValueError, match="templates argument"):  # every class would get the same prompt
        evaluate_zeroshot_dataset(FakeEncoder(lambda t: [1.0], {RED: [1]}), tmp_path / "d", templates=["a photo."])
