"""Zero-shot classification as CLIP_benchmark scores it: metrics on an imbalanced set (by hand), ties and a
3-class dataset (by `official_metrics`, a literal transcription of clip_benchmark's `accuracy` and
scikit-learn's balanced accuracy, written here independently of the module), prompts and class names read
from open_clip and clip-benchmark, the layouts and files CLIP_benchmark uses, and one-line errors.

The fake encoder's embeddings make the ranking of classes for each image known in advance."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from degla_scale.config import ZeroShotEvalConfig
from degla_scale.eval import zeroshot
from degla_scale.eval.common import EvalDataError, EvalDependencyError
from degla_scale.eval.zeroshot import evaluate_zeroshot

OPENAI_PROMPTS = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]  # 80

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


def official_metrics(img_ND: torch.Tensor, prompts_CTD: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's zero_shot_classifier + run_classification + accuracy, and balanced_accuracy_score written
    out as scikit-learn defines it (per-class recall over the classes in y_true ∪ y_pred, NaN rows dropped), in %."""
    weights_DC = torch.stack([F.normalize(p_TD, dim=-1).mean(0) / F.normalize(p_TD, dim=-1).mean(0).norm()
                              for p_TD in prompts_CTD], dim=1)
    logits = 100.0 * F.normalize(img_ND, dim=-1) @ weights_DC
    topk = (1, 5) if prompts_CTD.shape[0] >= 5 else (1,)
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(labels_N.view(1, -1).expand_as(pred))
    accs = [correct[:k].reshape(-1).float().sum().item() / len(labels_N) for k in topk]
    y_true, y_pred = labels_N.tolist(), logits.argmax(axis=1).tolist()
    recalls = []
    for c in sorted(set(y_true) | set(y_pred)):
        support = sum(t == c for t in y_true)
        if support:
            recalls.append(sum(t == c and p == c for t, p in zip(y_true, y_pred)) / support)
    out = {"acc1": 100 * accs[0], "mean_per_class_recall": 100 * sum(recalls) / len(recalls)}
    if len(topk) == 2:
        out["acc5"] = 100 * accs[1]
    return out


def test_imbalanced_metrics_from_folder_names(tmp_path):
    _write_toyset(tmp_path / "toyset")
    enc = FakeEncoder(_one_hot_by_name(NAMES), COLOUR_VECS)
    result = evaluate_zeroshot(enc, tmp_path)
    _close(result, EXPECTED, "toyset/")
    assert set(result) == {f"toyset/{m}" for m in EXPECTED}  # one dataset: no average keys
    # class names from folder names ('_' → ' '); an unknown dataset takes OpenAI's 80 ImageNet prompts
    assert enc.prompts == [t.format(c=n) for n in NAMES for t in OPENAI_PROMPTS]
    _close(evaluate_zeroshot(enc, tmp_path / "toyset"), EXPECTED)  # root is itself the dataset: bare keys


def test_three_classes_report_no_top5_and_the_average_says_over_what(tmp_path):
    # 3 classes: CLIP_benchmark reports acc5 only from 5 classes (the old k = min(5, C) read 100 %).
    # trio: RED → (1,0,0) class a, BLUE → (0,0,1) class c, GREEN → (0.6,0.8,0) → class b (0.8 > 0.6)
    for sub, colour in (("a", RED), ("b", GREEN), ("c", BLUE), ("c", RED)):
        _save(tmp_path / "trio" / sub / f"{len(list((tmp_path / 'trio').glob(f'{sub}/*')))}.png", colour)
    _write_toyset(tmp_path / "toyset")
    trio_vecs = {"a": [1, 0, 0, 0, 0, 0], "b": [0, 1, 0, 0, 0, 0], "c": [0, 0, 1, 0, 0, 0]}
    toy_text = _one_hot_by_name(NAMES)

    def text_fn(prompt):
        name = prompt.removeprefix("a photo of a ").removesuffix(".")
        return trio_vecs[name] if name in trio_vecs else toy_text(prompt)

    colours = {**COLOUR_VECS, GREEN: [1, 2, 6, 3, 4, 5]}
    enc = FakeEncoder(text_fn, {RED: [1, 0, 0, 0, 0, 0], BLUE: [0, 0, 1, 0, 0, 0], GREEN: [0.6, 0.8, 0, 0, 0, 0]})
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"imagenet1k": ["a photo of a {c}."]}))  # one prompt, for both datasets
    result = evaluate_zeroshot(enc, tmp_path, ZeroShotEvalConfig(datasets=["trio"], templates_file=str(templates)))
    # a: 1/1, b: 1/1, c: BLUE right, RED → a wrong → acc1 3/4; recall (1 + 1 + 1/2)/3
    assert result == {"trio/acc1": 75.0, "trio/mean_per_class_recall": pytest.approx(100 * 2.5 / 3)}
    enc.colour_vecs = colours
    both = evaluate_zeroshot(enc, tmp_path, ZeroShotEvalConfig(templates_file=str(templates)))
    assert "trio/acc5" not in both and both["toyset/acc5"] == 90.0
    assert both["average/acc5"] == 90.0 and both.averaged_over["average/acc5"] == ["toyset/acc5"]
    assert both.averaged_over["average/acc1"] == ["toyset/acc1", "trio/acc1"]


def test_ties_resolve_as_topk_and_argmax_do(tmp_path):
    # A collapsed model: every image at the same point, so all classes score alike. The old rule counted every
    # tie as wrong (0 %); CLIP_benchmark takes torch's topk order for acc1/acc5 and argmax for the recall.
    for i, sub in enumerate(["a", "a", "b", "c", "d", "e", "f"]):
        _save(tmp_path / "flat" / sub / f"{i}.png", RED)
    names = ["a", "b", "c", "d", "e", "f"]
    enc = FakeEncoder(lambda t: [1.0, 1.0], {RED: [1.0, 1.0]})
    result = evaluate_zeroshot(enc, tmp_path / "flat")
    img_ND = _unit([[1.0, 1.0]] * 7)
    prompts_CTD = _unit([[1.0, 1.0]] * (6 * 80)).reshape(6, 80, 2)
    labels_N = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    assert result == pytest.approx(official_metrics(img_ND, prompts_CTD, labels_N))
    # argmax takes the first of equal maxima: every image is predicted "a", so only class a's recall is 1
    assert result["mean_per_class_recall"] == pytest.approx(100 / 6)
    assert set(enc.prompts) == {t.format(c=n) for n in names for t in OPENAI_PROMPTS}


def test_random_scores_agree_with_the_official_rule(tmp_path):
    # Random embeddings with many near-equal logits, 7 classes (acc5 reported), checked against the transcription.
    gen = torch.Generator().manual_seed(0)
    classes = [f"k{i}" for i in range(7)]
    img_vecs = {c: (torch.randn(3, generator=gen).round(decimals=1)).tolist() for c in classes}
    text_vecs = {c: torch.randn(2, 3, generator=gen).round(decimals=1) for c in classes}
    templates = ["one {c}.", "two {}."]
    folder = tmp_path / "rand"
    for c in classes:
        _save(folder / c / "0.png", RED)
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")

    def text_fn(prompt):
        word, name = prompt.rstrip(".").split()
        return text_vecs[name][0 if word == "one" else 1].tolist()

    enc = FakeEncoder(text_fn, folder_fn=img_vecs.__getitem__)
    result = evaluate_zeroshot(enc, folder)
    expected = official_metrics(_unit([img_vecs[c] for c in classes]), torch.stack([text_vecs[c] for c in classes]),
                                torch.arange(7))
    assert set(result) == {"acc1", "acc5", "mean_per_class_recall"}
    assert result == pytest.approx(expected)


def test_prompt_ensemble_is_averaged_and_renormalised(tmp_path):
    # Two templates. Text vectors (3-d):   "A cat." (0.2, +0.98, 0)   "B cat." (0.2, -0.98, 0)
    #                                      "A dog." (0.3, 0, 0.954)   "B dog." (0.3, 0, 0.954)
    # Images: cat = RED → (1,0,0); dog = BLUE → (0,0,1).
    # Averaged + renormalised: cat class (1,0,0), dog class (0.3,0,0.954).
    #   cat image: cat 1.0 > dog 0.3 → right; dog image: cat 0 < dog 0.954 → right → acc1 100.
    # First template only: cat image scores cat 0.2 < dog 0.3 → wrong → acc1 50.
    folder = tmp_path / "pets_ensemble"
    meta = {"classes": ["cat", "dog"], "folders": ["cat_dir", "dog_dir"], "templates": ["A {c}.", "B {c}."]}
    folder.mkdir()
    (folder / "classes.json").write_text(json.dumps(meta))
    _save(folder / "cat_dir" / "0.png", RED)
    _save(folder / "dog_dir" / "0.png", BLUE)
    s, d = math.sqrt(1 - 0.2 ** 2), math.sqrt(1 - 0.3 ** 2)
    vecs = {"A cat.": [0.2, s, 0.0], "B cat.": [0.2, -s, 0.0], "A dog.": [0.3, 0.0, d], "B dog.": [0.3, 0.0, d]}
    enc = FakeEncoder(vecs.__getitem__, {RED: [1, 0, 0], BLUE: [0, 0, 1]})
    assert evaluate_zeroshot(enc, folder)["acc1"] == 100.0
    own = tmp_path / "own.json"  # a templates file overrides the folder's own (CLIP_benchmark's precedence)
    own.write_text(json.dumps({"pets_ensemble": ["A {c}."], "imagenet1k": ["B {c}."]}))
    assert evaluate_zeroshot(enc, folder, ZeroShotEvalConfig(templates_file=str(own)))["acc1"] == 50.0


def test_synthetic_split_with_classes_json(tmp_path):
    from degla_scale.data.synthetic import write_zeroshot

    classes = write_zeroshot(tmp_path / "zeroshot", seed=0, per_class=1)
    meta = json.loads((tmp_path / "zeroshot" / "classes.json").read_text())
    assert all("{c}" in t for t in meta["templates"])  # CLIP_benchmark's placeholder
    by_folder = dict(zip(meta["folders"], meta["classes"]))
    index = {c: i for i, c in enumerate(classes)}

    def one_hot(i: int) -> list[float]:
        return [float(j == i) for j in range(len(classes))]

    def text_fn(prompt):  # every synthetic template ends " {c}."
        hits = [c for c in classes if prompt.endswith(f" {c}.")]
        assert len(hits) == 1, prompt
        return one_hot(index[hits[0]])

    right = FakeEncoder(text_fn, folder_fn=lambda f: one_hot(index[by_folder[f]]))
    result = evaluate_zeroshot(right, tmp_path / "zeroshot")
    assert result == {"acc1": 100.0, "acc5": 100.0, "mean_per_class_recall": 100.0}
    assert set(right.prompts) == {t.format(c=c) for c in classes for t in meta["templates"]}


def test_imagenet_takes_open_clips_classnames_and_80_prompts(tmp_path):
    # 1000 wnid-like folders in sorted order, no names given: open_clip's OpenAI class names and prompts.
    folder = tmp_path / "imagenet"
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        _save(folder / wnid / "0.png", RED)
    index = {name: i for i, name in enumerate(IMAGENET_CLASSNAMES)}
    prompt_class = {t(name): i for name, i in index.items() for t in OPENAI_IMAGENET_TEMPLATES}

    def text_fn(prompt):
        v = [0.0] * 1000
        v[prompt_class[prompt]] = 1.0
        return v

    enc = FakeEncoder(text_fn, folder_fn=lambda wnid: text_fn(OPENAI_IMAGENET_TEMPLATES[0](IMAGENET_CLASSNAMES[wnids.index(wnid)])))
    result = evaluate_zeroshot(enc, tmp_path)
    # OpenAI's list names two pairs of classes alike (missile, sunglasses): each pair shares its weight, so one of
    # its two images is right at top-1 (whichever topk puts first) and both in the top 5 → 998/1000, 100 %.
    assert result["imagenet/acc1"] == 99.8 and result["imagenet/acc5"] == 100.0
    assert len(enc.prompts) == 80_000 and set(enc.prompts) == set(prompt_class)


def test_clip_benchmark_templates_and_integer_label_folders(tmp_path):
    from importlib.resources import files

    packaged = json.loads((files("clip_benchmark.datasets") / "en_zeroshot_classification_templates.json").read_text())
    names = json.loads((files("clip_benchmark.datasets") / "en_classnames.json").read_text())
    assert zeroshot.CLIP_BENCHMARK_DATASETS >= set(packaged) - {"dummy", "voc2007_multilabel", "imagenet1k"}
    assert zeroshot.CLIP_BENCHMARK_DATASETS >= set(names) - {"caltech101_vtab", "imagenet1k"}

    cifar = tmp_path / "data" / "cifar10"  # cifar10: class names are the folder names, 18 packaged prompts
    for name in ("airplane", "automobile", "bird"):
        _save(cifar / name / "0.png", RED)
    enc = FakeEncoder(lambda t: [1.0], {RED: [1.0]})
    evaluate_zeroshot(enc, cifar)
    assert len(packaged["cifar10"]) == 18
    assert enc.prompts == [t.format(c=n) for n in ("airplane", "automobile", "bird") for t in packaged["cifar10"]]

    # gtsrb exported as <label>/<image>, 43 folders: label 10 is folder "10", not the 3rd in string order
    gtsrb = tmp_path / "data" / "gtsrb"
    for label in range(43):
        _save(gtsrb / str(label) / "0.png", RED)
    one_hot = {n: [float(i == j) for j in range(43)] for i, n in enumerate(names["gtsrb"])}
    templates = packaged["gtsrb"]

    def text_fn(prompt):
        hits = [n for n in names["gtsrb"] if any(prompt == t.format(c=n) for t in templates)]
        return one_hot[hits[0]]

    enc = FakeEncoder(text_fn, folder_fn=lambda label: one_hot[names["gtsrb"][int(label)]])
    assert evaluate_zeroshot(enc, gtsrb)["acc1"] == 100.0


def test_missing_clip_benchmark_is_one_line(tmp_path, monkeypatch):
    _save(tmp_path / "pets" / "Abyssinian" / "0.png", RED)
    for module in ("clip_benchmark", "clip_benchmark.datasets"):  # as if never installed
        monkeypatch.setitem(sys.modules, module, None)
    zeroshot._clip_benchmark_file.cache_clear()
    try:
        with pytest.raises(EvalDependencyError, match=r"pip install '\.\[zeroshot\]'") as err:
            zeroshot.prepare_zeroshot(tmp_path / "pets")
        assert "\n" not in str(err.value)
        _save(tmp_path / "own_set" / "x" / "0.png", RED)  # a dataset clip-benchmark does not know needs no install
        assert zeroshot.prepare_zeroshot(tmp_path / "own_set").splits[0].templates == OPENAI_PROMPTS
    finally:
        zeroshot._clip_benchmark_file.cache_clear()


def test_classnames_txt_and_classnames_file(tmp_path):
    folder = tmp_path / "birds"
    _save(folder / "n01443537" / "0.png", RED)
    _save(folder / "n01491361" / "0.png", BLUE)
    (folder / "classnames.txt").write_text("goldfish\ntiger shark\n")
    enc = FakeEncoder(_one_hot_by_name(["goldfish", "tiger shark"]), {RED: [1, 0], BLUE: [0, 1]})
    assert evaluate_zeroshot(enc, tmp_path)["birds/acc1"] == 100.0
    assert not any("n014" in p for p in enc.prompts)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"birds": ["tiger shark", "goldfish"]}))  # a classnames file wins: both wrong
    assert evaluate_zeroshot(enc, tmp_path, ZeroShotEvalConfig(classnames_file=str(names)))["birds/acc1"] == 0.0
    names.write_text(json.dumps({"other": ["a", "b"]}))
    with pytest.raises(EvalDataError, match="no entry for zero-shot dataset 'birds'"):
        zeroshot.prepare_zeroshot(tmp_path, ZeroShotEvalConfig(classnames_file=str(names)))
    (folder / "classnames.txt").write_text("goldfish\n")
    with pytest.raises(EvalDataError, match="names 1 classes but .* has 2 class folders"):
        zeroshot.prepare_zeroshot(tmp_path)


def test_missing_root_empty_class_and_bad_files(tmp_path):
    with pytest.raises(EvalDataError, match="nowhere"):
        zeroshot.prepare_zeroshot(tmp_path / "nowhere")

    _save(tmp_path / "ds" / "full" / "0.png", RED)
    (tmp_path / "ds" / "empty").mkdir()
    (tmp_path / "ds" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(EvalDataError, match=r"ds[/\\]empty holds no images") as err:
        zeroshot.prepare_zeroshot(tmp_path / "ds")
    assert "\n" not in str(err.value)

    with pytest.raises(EvalDataError, match="missing_one"):
        zeroshot.prepare_zeroshot(tmp_path, ZeroShotEvalConfig(datasets=["missing_one"]))

    bad = tmp_path / "bad"
    _save(bad / "a" / "0.png", RED)
    (bad / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "folders": ["a", "b"]}))
    with pytest.raises(EvalDataError, match=r"bad[/\\]b"):
        zeroshot.prepare_zeroshot(bad)
    (bad / "classes.json").write_text(json.dumps({"classes": ["a"], "templates": ["a photo."]}))
    with pytest.raises(EvalDataError, match=r"place the class name by \{c\}"):  # every class, the same prompt
        zeroshot.prepare_zeroshot(bad)
    (bad / "classes.json").write_text("{not json")
    with pytest.raises(EvalDataError, match="not valid JSON"):
        zeroshot.prepare_zeroshot(bad)

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(EvalDataError, match="no dataset folders"):
        zeroshot.prepare_zeroshot(nothing)
