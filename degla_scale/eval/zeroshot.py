"""Zero-shot classification over torchvision-style image folders: top-1, top-k and mean per-class recall.

Layout. A *dataset folder* is an ImageFolder split: one sub-folder per class, images anywhere below it
(torchvision's rules: class folders in sorted order, extensions `IMG_EXTENSIONS`, walked recursively).
Class names and prompts come from, in order:
  - `classes.json` in the dataset folder: {"classes": [...], "folders": [...], "templates": [...]}
    ("folders" defaults to the sorted class folders, "templates" to the registry); the synthetic
    split (`degla_scale.data.synthetic.write_zeroshot`) writes this form;
  - else `classnames.txt` (one name per line, in sorted-folder order, e.g. ImageNet's wnid folders);
  - else the folder names with '_' read as ' '.
Templates without `classes.json` come from `degla_scale.eval.templates`, keyed by the folder's name.

`evaluate_zeroshot(encoder, root)` accepts either a dataset folder or a folder of dataset folders
(root/<dataset>/<class>/...); see `find_datasets` for how it tells them apart. Keys are always
"<dataset>/<metric>" plus "average/<metric>" over datasets, so one or many datasets read alike; a single
dataset folder is named after itself (the synthetic split gives "zeroshot/acc1").

Ties. A model's scores can tie (a collapsed model scores every class alike), and `torch.topk` leaves the
order of equal scores unspecified. So an image's rank is the number of *other* classes scoring at least
as high as its true class, and it is correct at k when that rank is below k: a tie counts against the
model, as in `pairwise_correct`. A collapsed model therefore scores 0 top-1, not a lucky 1/C.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from degla_scale.eval.common import Encoder, EvalDataError, ImageRef, require
from degla_scale.eval.templates import templates_for

METRICS = ("acc1", "acc5", "mean_per_class_recall")
_CHUNK = 4096  # images per similarity block: [4096, C] floats stay small even for ImageNet's 1000 classes


@dataclass(frozen=True)
class ZeroShotSplit:
    """One dataset folder, read: class names, prompt templates, images and their labels."""

    name: str
    classes: list[str]
    templates: list[str]
    refs: list[ImageRef]
    labels_N: torch.Tensor


def _has_image(folder: Path) -> bool:
    return any(f.is_file() and has_file_allowed_extension(f.name, IMG_EXTENSIONS) for f in folder.iterdir())


def _class_images(folder: Path) -> list[Path]:
    """Images under a class folder, recursively and sorted, as torchvision's `make_dataset` lists them."""
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        found += [Path(dirpath) / f for f in sorted(filenames) if has_file_allowed_extension(f, IMG_EXTENSIONS)]
    if not found:
        raise EvalDataError(f"class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}): "
                            f"remove it or fill it; every class needs at least one image")
    return found


def _class_folders(folder: Path) -> list[str]:
    """Class folder names in torchvision's order (sorted), so labels match `ImageFolder.class_to_idx`."""
    try:
        return find_classes(folder)[0]
    except FileNotFoundError:
        raise EvalDataError(f"zero-shot dataset folder {folder} holds no class folders: expected "
                            f"{folder}/<class>/<image>, or classes.json naming them") from None


def _check_templates(templates: Sequence[str], source: str, error: type[Exception] = EvalDataError) -> list[str]:
    """Each template must place the class name; one without '{}' would give every class the same prompt."""
    templates = list(templates)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise error(f"templates from {source} must be a non-empty list of strings with one '{{}}' "
                            f"for the class name, got {templates!r}")
    return templates


def _read_classes_json(folder: Path) -> tuple[list[str], list[str], list[str] | None]:
    """(class names, class folder names, templates or None) from `classes.json`."""
    path = folder / "classes.json"
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path} is not valid JSON ({err}): expected "
                            '{"classes": [...], "folders": [...], "templates": [...]}') from None
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or not classes:
        raise EvalDataError(f"{path} needs a non-empty \"classes\" list (\"folders\" and \"templates\" optional)")
    folders = meta.get("folders") or _class_folders(folder)
    if len(folders) != len(classes):
        raise EvalDataError(f"{path} names {len(classes)} classes but {len(folders)} folders: list one folder "
                            f"per class in \"folders\", in the same order")
    templates = meta.get("templates")
    return classes, folders, None if templates is None else _check_templates(templates, str(path))


def load_split(folder: str | Path, templates: Sequence[str] | None = None, name: str | None = None) -> ZeroShotSplit:
    """Read one dataset folder (layout in the module docstring). `templates`, if given, override both
    `classes.json` and the registry; `name` (default: the folder's name) picks the registry entry."""
    folder = require(Path(folder), "zero-shot dataset folder")
    name = name or folder.resolve().name
    if (folder / "classes.json").is_file():
        classes, folders, own_templates = _read_classes_json(folder)
    else:
        folders = _class_folders(folder)
        names_path = folder / "classnames.txt"
        if names_path.is_file():
            classes = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
            if len(classes) != len(folders):
                raise EvalDataError(f"{names_path} lists {len(classes)} names but {folder} has {len(folders)} "
                                    f"class folders: give one name per line, in sorted-folder order")
        else:
            classes = [f.replace("_", " ") for f in folders]
        own_templates = None
    if templates is not None:
        templates = _check_templates(templates, "the templates argument", ValueError)
    else:
        templates = own_templates or templates_for(name)
    refs, labels = [], []
    for label, sub in enumerate(folders):
        images = _class_images(require(folder / sub, f"class folder of {classes[label]!r}"))
        refs += [ImageRef(p) for p in images]
        labels += [label] * len(images)
    return ZeroShotSplit(name, list(classes), list(templates), refs, torch.tensor(labels, dtype=torch.long))


def _finite(emb: torch.Tensor, what: str) -> torch.Tensor:
    """A NaN embedding compares false with everything, which the rank rule would count as a win."""
    if not torch.isfinite(emb).all():
        raise ValueError(f"{what} embeddings hold NaN or inf: the model has diverged or the checkpoint is broken")
    return emb


def class_embeddings(encoder: Encoder, classes: Sequence[str], templates: Sequence[str],
                     desc: str = "class prompts") -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised per-template prompt embeddings, renormalised.
    Averaging (a prompt ensemble) smooths over any one wording's quirks; renormalising keeps classes
    comparable by cosine whatever the spread of their prompts."""
    prompts = [t.format(c) for c in classes for t in templates]
    txt_CTD = encoder.texts(prompts, desc=desc).float().reshape(len(classes), len(templates), -1)
    cls_CD = txt_CTD.mean(1)
    return cls_CD / cls_CD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def true_class_rank(img_ND: torch.Tensor, cls_CD: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """[N] long: how many other classes score at least as high as the true one (0 = correct top-1).
    Ties count against the model (module docstring). Computed in row blocks to bound memory."""
    ranks = []
    for i in range(0, len(img_ND), _CHUNK):
        sim_BC = img_ND[i:i + _CHUNK] @ cls_CD.T
        true_B1 = sim_BC.gather(1, labels_N[i:i + _CHUNK, None])
        ranks.append((sim_BC >= true_B1).sum(1) - 1)  # minus the true class itself
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def classification_metrics(rank_N: torch.Tensor, labels_N: torch.Tensor, num_classes: int) -> dict[str, float]:
    """acc1, acc5 (top-k, k = min(5, C)) and mean per-class recall (the unweighted mean over classes of
    top-1 recall, so a large class cannot hide a failing small one), all in percent."""
    k = min(5, num_classes)
    correct_N = (rank_N == 0).double()  # float64 so 6 of 10 reads 60.0, not 60.0000012
    hits_C = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels_N, correct_N)
    count_C = torch.bincount(labels_N, minlength=num_classes).double()
    return {
        "acc1": 100.0 * correct_N.mean().item(),
        "acc5": 100.0 * (rank_N < k).double().mean().item(),
        "mean_per_class_recall": 100.0 * (hits_C / count_C).mean().item(),
    }


def evaluate_zeroshot_dataset(encoder: Encoder, folder: str | Path, templates: Sequence[str] | None = None,
                              name: str | None = None) -> dict[str, float]:
    """{"acc1", "acc5", "mean_per_class_recall"} in percent for one dataset folder (see `load_split`)."""
    split = load_split(folder, templates, name)
    img_ND = _finite(encoder.images(split.refs, desc=f"zero-shot {split.name}").float(), f"{split.name} image")
    cls_CD = _finite(class_embeddings(encoder, split.classes, split.templates, f"{split.name} prompts"),
                     f"{split.name} class")
    rank_N = true_class_rank(img_ND, cls_CD, split.labels_N)
    return classification_metrics(rank_N, split.labels_N, len(split.classes))


def is_dataset_folder(folder: Path) -> bool:
    """Whether `folder` is itself one dataset (rather than a folder of datasets): it holds `classes.json`,
    or — when no sub-folder carries `classes.json`/`classnames.txt` — some sub-folder holds images directly.
    A layout this misreads (class folders with images only in deeper folders) can name `datasets`."""
    if (folder / "classes.json").is_file():
        return True
    subs = [s for s in folder.iterdir() if s.is_dir() and not s.name.startswith(".")]
    if any((s / "classes.json").is_file() or (s / "classnames.txt").is_file() for s in subs):
        return False
    return any(_has_image(s) for s in subs)


def find_datasets(root: Path) -> list[Path]:
    """The dataset folders under `root`: `root` itself if it is one, else its sorted non-hidden sub-folders."""
    if is_dataset_folder(root):
        return [root]
    found = sorted(s for s in root.iterdir() if s.is_dir() and not s.name.startswith("."))
    if not found:
        raise EvalDataError(f"zero-shot root {root} holds no dataset folders: expected {root}/<dataset>/<class>/"
                            f"<image> or {root}/<class>/<image>")
    return found


def evaluate_zeroshot(encoder: Encoder, root: str | Path, datasets: list[str] | None = None) -> dict[str, float]:
    """Flat {"<dataset>/acc1", "<dataset>/acc5", "<dataset>/mean_per_class_recall", ...,
    "average/<metric>" (for two or more datasets)} in percent. `datasets` names sub-folders of `root` to
    evaluate (each must be a dataset folder); None evaluates every sub-folder, or `root` itself if it is a
    dataset folder, which gives the bare {"acc1", "acc5", "mean_per_class_recall"}."""
    root = require(Path(root), "zero-shot root")
    if datasets is None and is_dataset_folder(root):
        return evaluate_zeroshot_dataset(encoder, root)
    if datasets is None:
        named = [(folder.resolve().name, folder) for folder in find_datasets(root)]
    else:
        named = [(name, root / name) for name in datasets]
    if not named:
        raise ValueError("datasets is empty: name at least one dataset folder, or pass None for all")
    results: dict[str, float] = {}
    for name, folder in named:
        if name == "average":
            raise ValueError(f"dataset folder {folder} is named 'average', which the summary keys use: rename it")
        scores = evaluate_zeroshot_dataset(encoder, require(folder, f"zero-shot dataset {name!r}"), name=name)
        results.update({f"{name}/{metric}": value for metric, value in scores.items()})
    if len(named) > 1:
        for metric in METRICS:
            results[f"average/{metric}"] = sum(results[f"{name}/{metric}"] for name, _ in named) / len(named)
    return results
