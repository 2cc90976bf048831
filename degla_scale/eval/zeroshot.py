"""Zero-shot classification over torchvision-style image folders, scored as LAION-AI/CLIP_benchmark scores it
(`clip_benchmark/metrics/zeroshot_classification.py`: `zero_shot_classifier`, `run_classification`,
`accuracy`, `evaluate`), in percent where CLIP_benchmark reports fractions:

- a class's weight is the mean of its L2-normalised prompt embeddings, renormalised; logits = 100 · image @ class;
- acc1 and acc5 from `logits.topk(5)` (torch's order among equal logits, as there); acc5 only for datasets of
  five classes or more (CLIP_benchmark gives NaN below that; here the key is absent);
- mean_per_class_recall = scikit-learn's `balanced_accuracy_score(target, logits.argmax(1))`: the mean over
  classes that have images of the share of their images whose argmax is right.

Layout. A *dataset folder* is an ImageFolder split: one sub-folder per class, images anywhere below it
(torchvision's `make_dataset` rules). `root` is one dataset folder or a folder of them (root/<dataset>/...).
Class folders are taken in sorted order (torchvision's `ImageFolder`), or by number when every one is named
by an integer label (an export as <label>/<image>).

Class names, first found: `evaluation.zeroshot.classnames_file` (CLIP_benchmark's --custom_classname_file,
{dataset: [names]}); the folder's `classes.json` {"classes": [...], "folders": [...], "templates": [...]}
("folders" and "templates" optional; the synthetic split writes it); its `classnames.txt` (one per line, as
CLIP_benchmark's webdataset exports); the packaged names of a known dataset (ImageNet's from open_clip's
`zero_shot_metadata`, the others from clip-benchmark's `en_classnames.json`); else the folder names, '_' read
as ' '. Templates, first found: `evaluation.zeroshot.templates_file` (--custom_template_file; a dataset it
lacks takes its "imagenet1k" entry, as CLIP_benchmark does); classes.json "templates"; the folder's
`zeroshot_classification_templates.txt`; clip-benchmark's `en_zeroshot_classification_templates.json` for a
dataset it knows; else OpenAI's 80 ImageNet prompts (open_clip's, which are CLIP_benchmark's default too).
A template marks the class name by `{c}` (CLIP_benchmark) or `{}`. A dataset's packaged key is its folder
name, lower case, through `ALIASES` (imagenet → imagenet1k, oxford_pets → pets, ...).

Keys: "<dataset>/<metric>" and "average/<metric>" (over the datasets that report it) for a folder of
datasets; the bare metrics when `root` is itself the dataset (the synthetic split gives "zeroshot/acc1").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from degla_scale.config import ZeroShotEvalConfig
from degla_scale.eval.common import (
    Encoder,
    EvalDataError,
    EvalDependencyError,
    ImageRef,
    Scores,
    finite,
    read_json,
    require,
)

METRICS = ("acc1", "acc5", "mean_per_class_recall")
IMAGENET = "imagenet1k"
ALIASES = {"imagenet": IMAGENET, "imagenet-1k": IMAGENET, "imagenet_1k": IMAGENET, "ilsvrc2012": IMAGENET,
           "oxford_pets": "pets", "oxford-iiit-pet": "pets", "oxfordiiitpet": "pets", "flowers102": "flowers",
           "oxford_flowers102": "flowers", "stanford_cars": "cars", "stanfordcars": "cars",
           "fgvc-aircraft": "fgvc_aircraft", "food-101": "food101", "sun-397": "sun397"}
ZEROSHOT_FIX = "pip install '.[zeroshot]'"
_CHUNK = 4096  # images per logits block: [4096, C] floats stay small even for ImageNet's 1000 classes


@dataclass(frozen=True)
class ZeroShotSplit:
    """One dataset folder, read: class names, prompt templates, images and their labels."""

    name: str
    classes: list[str]
    templates: list[str]
    refs: list[ImageRef]
    labels_N: torch.Tensor


def packaged_key(name: str) -> str:
    return ALIASES.get(name.lower(), name.lower())


@lru_cache(maxsize=None)
def _clip_benchmark_file(filename: str) -> dict:
    """One of clip-benchmark's packaged JSON files ({dataset: list}), read from the installed package."""
    try:
        from importlib.resources import files

        return json.loads((files("clip_benchmark.datasets") / filename).read_text())
    except ModuleNotFoundError:
        raise EvalDependencyError(f"zero-shot prompts and class names of the datasets CLIP_benchmark knows come "
                                  f"from its package, which is not installed: {ZEROSHOT_FIX} (or give the dataset "
                                  "folder a classnames.txt and zeroshot_classification_templates.txt)") from None


# The dataset keys of clip-benchmark 1.6.2's en_*.json files (a test checks them against the installed package):
# only a dataset among them needs the package, so an own dataset evaluates without it.
CLIP_BENCHMARK_DATASETS = frozenset((
    "caltech101", "cars", "cifar10", "cifar100", "clevr_closest_object_distance", "clevr_count_all", "country211",
    "diabetic_retinopathy", "dmlab", "dsprites_label_orientation", "dsprites_label_x_position", "dtd", "eurosat",
    "fer2013", "fgvc_aircraft", "flowers", "food101", "gtsrb", "kitti_closest_vehicle_distance", "mnist", "pcam",
    "pets", "renderedsst2", "resisc45", "smallnorb_label_azimuth", "smallnorb_label_elevation", "stl10", "sun397",
    "svhn", "voc2007"))


def _known_to_clip_benchmark(key: str, filename: str) -> list | None:
    """clip-benchmark's entry for `key` in `filename`, or None."""
    return _clip_benchmark_file(filename).get(key) if key in CLIP_BENCHMARK_DATASETS else None


def _openai_imagenet() -> tuple[list[str], list[str]]:
    """OpenAI's ImageNet class names and 80 prompts, as open_clip ships them (prompts as '{c}' templates)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def fill(template: str, classname: str) -> str:
    return template.format(c=classname) if "{c}" in template else template.format(classname)


def _check_templates(templates, source: str) -> list[str]:
    """A non-empty list of strings each placing the class name once by {c} or {}: a template without it would
    give every class the same prompt."""
    ok = isinstance(templates, list) and templates and all(isinstance(t, str) for t in templates)
    for t in templates if ok else ():
        try:
            ok = ok and fill(t, "\0") != fill(t, "\1")
        except (IndexError, KeyError, ValueError):
            ok = False
    if not ok:
        raise EvalDataError(f"templates from {source} must be a non-empty list of strings that each place the class "
                            f"name by {{c}} (or {{}}), got {str(templates)[:200]}")
    return list(templates)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _class_folders(folder: Path) -> list[str]:
    """Class folders in label order: sorted (torchvision's ImageFolder), or by number if all are integer labels."""
    names = [entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")]
    if not names:
        raise EvalDataError(f"zero-shot dataset folder {folder} holds no class folders: expected "
                            f"{folder}/<class>/<image>, or classes.json naming them")
    return sorted(names, key=int) if all(n.isdigit() for n in names) else sorted(names)


def _class_images(folder: Path) -> list[Path]:
    """Images under a class folder, recursively and sorted, as torchvision's `make_dataset` lists them."""
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        found += [Path(dirpath) / f for f in sorted(filenames) if has_file_allowed_extension(f, IMG_EXTENSIONS)]
    if not found:
        raise EvalDataError(f"class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}): "
                            f"remove it or fill it; every class needs at least one image")
    return found


def _custom(path: str | None, what: str) -> dict | None:
    """A CLIP_benchmark custom file: JSON {dataset: list}."""
    return None if path is None else read_json(Path(path), f"zero-shot {what} file", dict)


def _own_classes_json(folder: Path) -> tuple[list | None, list | None, list | None]:
    """(class names, class folders, templates) from the folder's classes.json, each None where not given."""
    path = folder / "classes.json"
    if not path.is_file():
        return None, None, None
    meta = read_json(path, "zero-shot classes.json", dict)
    if not isinstance(meta.get("classes"), list) or not meta["classes"]:
        raise EvalDataError(f"{path} needs a non-empty \"classes\" list (\"folders\" and \"templates\" optional)")
    return meta["classes"], meta.get("folders"), meta.get("templates")


def _class_names(folder: Path, name: str, folders: list[str], custom: dict | None, own: list | None) -> list[str]:
    key = packaged_key(name)
    if custom is not None:
        if name not in custom and key not in custom:
            raise EvalDataError(f"the classnames file has no entry for zero-shot dataset {name!r}: add one "
                                f"(keys: {', '.join(sorted(custom)[:8])}...)")
        names, source = custom.get(name, custom.get(key)), "the classnames file"
    elif own is not None:
        names, source = own, folder / "classes.json"
    elif (folder / "classnames.txt").is_file():
        names, source = _read_lines(folder / "classnames.txt"), folder / "classnames.txt"
    elif key == IMAGENET:
        names, source = _openai_imagenet()[0], "open_clip's IMAGENET_CLASSNAMES"
    elif (packaged := _known_to_clip_benchmark(key, "en_classnames.json")) is not None:
        names, source = packaged, f"clip-benchmark's en_classnames.json[{key!r}]"
    else:
        return [f.replace("_", " ") for f in folders]
    if len(names) != len(folders):
        raise EvalDataError(f"{source} names {len(names)} classes but {folder} has {len(folders)} class folders: "
                            f"give one name per folder in label order (classnames.txt, one per line)")
    return [str(n) for n in names]


def _templates(folder: Path, name: str, custom: dict | None, own: list | None) -> list[str]:
    key = packaged_key(name)
    if custom is not None:
        found = next((custom[k] for k in (name, key, IMAGENET) if k in custom), None)
        if found is None:
            raise EvalDataError(f"the templates file has neither {name!r} nor {IMAGENET!r}: add one of them")
        return _check_templates(found, f"the templates file's {name!r} entry")
    if own is not None:
        return _check_templates(own, str(folder / "classes.json"))
    if (folder / "zeroshot_classification_templates.txt").is_file():
        path = folder / "zeroshot_classification_templates.txt"
        return _check_templates(_read_lines(path), str(path))
    if key != IMAGENET and (packaged := _known_to_clip_benchmark(key, "en_zeroshot_classification_templates.json")):
        return _check_templates(packaged, f"clip-benchmark's templates for {key!r}")
    return _openai_imagenet()[1]


def load_split(folder: Path, name: str, classnames: dict | None = None, templates: dict | None = None) -> ZeroShotSplit:
    """Read one dataset folder: class names and templates as the module docstring orders them, every image listed."""
    require(folder, f"zero-shot dataset {name!r}")
    own_names, own_folders, own_templates = _own_classes_json(folder)
    folders = own_folders or _class_folders(folder)
    classes = _class_names(folder, name, folders, classnames, own_names)
    refs, labels = [], []
    for label, sub in enumerate(folders):
        images = _class_images(require(folder / sub, f"class folder of {classes[label]!r}"))
        refs += [ImageRef(p) for p in images]
        labels += [label] * len(images)
    return ZeroShotSplit(name, classes, _templates(folder, name, templates, own_templates), refs,
                         torch.tensor(labels, dtype=torch.long))


def class_weights(encoder: Encoder, classes: list[str], templates: list[str], desc: str = "class prompts") -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised prompt embeddings, renormalised (`zero_shot_classifier`)."""
    prompts = [fill(t, c) for c in classes for t in templates]
    txt_CTD = encoder.texts(prompts, desc=desc).float().reshape(len(classes), len(templates), -1)
    cls_CD = txt_CTD.mean(1)
    return cls_CD / cls_CD.norm(dim=-1, keepdim=True)


def classification_metrics(img_ND: torch.Tensor, cls_CD: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's `evaluate` for a single-label dataset, in percent (module docstring)."""
    num_classes = len(cls_CD)
    k = min(5, num_classes)
    hits_at = torch.zeros(k, dtype=torch.float64)  # hits_at[j]: images whose true class is the (j+1)-th of topk
    argmax_right = []
    for i in range(0, len(img_ND), _CHUNK):
        logits_BC = 100.0 * img_ND[i:i + _CHUNK] @ cls_CD.T
        labels_B = labels_N[i:i + _CHUNK]
        top_Bk = logits_BC.topk(k, 1, True, True).indices
        hits_at += (top_Bk == labels_B[:, None]).double().sum(0)
        argmax_right.append(logits_BC.argmax(1) == labels_B)
    n = len(labels_N)
    right_N = torch.cat(argmax_right).double()
    count_C = torch.bincount(labels_N, minlength=num_classes).double()
    recall_C = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels_N, right_N) / count_C
    out = {"acc1": 100.0 * hits_at[0].item() / n}
    if num_classes >= 5:
        out["acc5"] = 100.0 * hits_at.sum().item() / n
    out["mean_per_class_recall"] = 100.0 * recall_C[count_C > 0].mean().item()
    return out


@dataclass(frozen=True)
class ZeroShotSuite:
    """The datasets, read; `single`: root is itself the dataset, so the metrics go unprefixed."""

    splits: list[ZeroShotSplit]
    single: bool

    def score(self, encoder: Encoder) -> Scores:
        results = Scores()
        for split in self.splits:
            img_ND = finite(encoder.images(split.refs, desc=f"zero-shot {split.name}").float(), f"{split.name} image")
            cls_CD = finite(class_weights(encoder, split.classes, split.templates, f"{split.name} prompts"),
                            f"{split.name} class")
            scores = classification_metrics(img_ND, cls_CD, split.labels_N)
            results.update(scores if self.single else {f"{split.name}/{m}": v for m, v in scores.items()})
        if not self.single and len(self.splits) > 1:
            for metric in METRICS:
                members = [f"{s.name}/{metric}" for s in self.splits if f"{s.name}/{metric}" in results]
                if members:
                    results.add_average(f"average/{metric}", members)
        return results


def _has_image(folder: Path) -> bool:
    return any(f.is_file() and has_file_allowed_extension(f.name, IMG_EXTENSIONS) for f in folder.iterdir())


def is_dataset_folder(folder: Path) -> bool:
    """Whether `folder` is itself one dataset (rather than a folder of datasets): it holds classes.json,
    classnames.txt or zeroshot_classification_templates.txt, or, when no sub-folder holds one of those, some
    sub-folder holds images directly. A layout this misreads can name `evaluation.zeroshot.datasets`."""
    markers = ("classes.json", "classnames.txt", "zeroshot_classification_templates.txt")
    if any((folder / m).is_file() for m in markers):
        return True
    subs = [s for s in folder.iterdir() if s.is_dir() and not s.name.startswith(".")]
    if any((s / m).is_file() for s in subs for m in markers):
        return False
    return any(_has_image(s) for s in subs)


def prepare_zeroshot(root: str | Path, cfg: ZeroShotEvalConfig | None = None) -> ZeroShotSuite:
    """Every dataset under `root` (or `cfg.datasets` of them) read, with its class names and templates resolved."""
    root, cfg = require(Path(root), "zero-shot root"), cfg or ZeroShotEvalConfig()
    classnames, templates = _custom(cfg.classnames_file, "classnames"), _custom(cfg.templates_file, "templates")
    if cfg.datasets is not None:
        named = [(name, root / name) for name in cfg.datasets]
    elif is_dataset_folder(root):
        return ZeroShotSuite([load_split(root, root.resolve().name, classnames, templates)], single=True)
    else:
        named = [(s.name, s) for s in sorted(root.iterdir()) if s.is_dir() and not s.name.startswith(".")]
    if not named:
        raise EvalDataError(f"zero-shot root {root} holds no dataset folders: expected {root}/<dataset>/<class>/"
                            f"<image> or {root}/<class>/<image>")
    if "average" in dict(named):
        raise EvalDataError(f"zero-shot dataset folder {root / 'average'} has the name the summary keys use: rename it")
    return ZeroShotSuite([load_split(folder, name, classnames, templates) for name, folder in named], single=False)


def evaluate_zeroshot(encoder: Encoder, root: str | Path, cfg: ZeroShotEvalConfig | None = None) -> Scores:
    """`prepare_zeroshot` then `score`, for one model."""
    return prepare_zeroshot(root, cfg).score(encoder)
