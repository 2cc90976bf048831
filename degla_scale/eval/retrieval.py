"""Image-text retrieval recall@{1, 5, 10}, both directions, on the Karpathy test splits as BLIP released them.

Files (BLIP's annotation json, also what ARO's `dataset_zoo/retrieval.py` downloads):
  - coco:      `coco_karpathy_test.json`  — 5,000 images, ~25k captions; "image": "val2014/COCO_val2014_....jpg"
  - flickr30k: `flickr30k_test.json`      — 1,000 images, 5k captions;   "image": "flickr30k-images/<id>.jpg"
    (`flickr30k_test_karpathy.json` is accepted as another name for it)
Each is a JSON list of {"image": <path relative to the image root>, "caption": [captions], ...}; other
fields are ignored, "caption" may also be one string, and entries naming the same image are merged.
Captions are used as written: the CLIP tokenizer lowercases, and BLIP's `pre_caption` clean-up is a
BLIP-side convention, not part of the split.

Layout: the annotation file sits at `root/<dataset>/<file>` or `root/<file>`, and image paths are resolved
against the folder holding it (ARO's convention: one folder with the json, `val2014/` or
`flickr30k-images/`), unless `image_roots[<dataset>]` names another folder.

Rules. Image→text: an image is correct at k if ANY of its captions ranks in the top k among all captions.
Text→image: a caption is correct at k if its own image ranks in the top k among all images.
Ties count against the model: a query's rank is the number of wrong candidates scoring at least as high as
its best right one, and it is correct at k when that rank is below k (so a collapsed model scores ~0, not
chance, and results do not depend on a sort's tie order).

Memory: similarities are computed in row blocks (`chunk_size` queries × all candidates), never as the full
[5k, 25k] matrix.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from degla_scale.eval.common import Encoder, EvalDataError, ImageRef, read_json, require, require_images

ANNOTATION_FILES: dict[str, tuple[str, ...]] = {
    "coco": ("coco_karpathy_test.json",),
    "flickr30k": ("flickr30k_test.json", "flickr30k_test_karpathy.json"),
}
KS = (1, 5, 10)
FORMAT = 'a JSON list of {"image": "<path under the image root>", "caption": ["...", ...]} (BLIP\'s Karpathy split)'


@dataclass(frozen=True)
class RetrievalSplit:
    """Distinct images, all captions, and which image each caption describes."""

    images: list[ImageRef]
    captions: list[str]
    caption_image_T: torch.Tensor  # [T] long: index into `images`


def find_annotation(root: Path, dataset: str) -> Path:
    """The dataset's annotation file under root/<dataset>/ or root/, first known file name first."""
    if dataset not in ANNOTATION_FILES:
        raise ValueError(f"unknown retrieval dataset {dataset!r}: choose from {sorted(ANNOTATION_FILES)}")
    for folder in (root / dataset, root):
        for filename in ANNOTATION_FILES[dataset]:
            if (folder / filename).is_file():
                return folder / filename
    return require(root / dataset / ANNOTATION_FILES[dataset][0], f"{dataset} retrieval annotation "
                   f"(or {root / ANNOTATION_FILES[dataset][0]}; BLIP's Karpathy test split)")


def load_split(annotation: str | Path, image_root: str | Path | None = None) -> RetrievalSplit:
    """Read a BLIP-format annotation file; images resolve against `image_root` (default: the file's folder).
    Every image must exist: finding a missing one after embedding thousands would waste the run."""
    path = Path(annotation)
    entries = read_json(path, "retrieval annotation file")
    image_root = Path(image_root) if image_root is not None else path.parent
    index: dict[str, int] = {}
    captions: list[str] = []
    owners: list[int] = []
    for n, entry in enumerate(entries):
        caps = entry.get("caption") if isinstance(entry, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not caps \
                or not all(isinstance(c, str) for c in caps):
            raise EvalDataError(f"{path} entry {n} is malformed ({str(entry)[:120]}): expected {FORMAT}")
        owner = index.setdefault(entry["image"], len(index))
        captions += [c.strip() for c in caps]
        owners += [owner] * len(caps)
    paths = [image_root / name for name in index]
    require_images(paths, path.name, f"put them under {image_root}, or pass the folder the json's \"image\" paths "
                                     "start from (image_roots)")
    return RetrievalSplit([ImageRef(p) for p in paths], captions, torch.tensor(owners, dtype=torch.long))


def retrieval_ranks(img_ID: torch.Tensor, txt_TD: torch.Tensor, caption_image_T: torch.Tensor,
                    chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """([I] image→text ranks, [T] text→image ranks): wrong candidates scoring >= the best right one.
    Each direction is computed in blocks of `chunk_size` query rows, so peak memory is
    chunk_size × (number of candidates) scores plus two masks of that size."""
    num_images = len(img_ID)
    i2t = []
    for i in range(0, num_images, chunk_size):
        sim_BT = img_ID[i:i + chunk_size] @ txt_TD.T
        own_BT = caption_image_T[None, :] == torch.arange(i, i + len(sim_BT))[:, None]
        best_B1 = sim_BT.masked_fill(~own_BT, float("-inf")).max(1, keepdim=True).values
        i2t.append(((sim_BT >= best_B1) & ~own_BT).sum(1))
    t2i = []
    for i in range(0, len(txt_TD), chunk_size):
        sim_BI = txt_TD[i:i + chunk_size] @ img_ID.T
        own_B1 = sim_BI.gather(1, caption_image_T[i:i + chunk_size, None])
        t2i.append((sim_BI >= own_B1).sum(1) - 1)  # minus its own image
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(i2t) if i2t else empty), (torch.cat(t2i) if t2i else empty)


def recall_metrics(i2t_rank_I: torch.Tensor, t2i_rank_T: torch.Tensor) -> dict[str, float]:
    """{"image_to_text_R@k", "text_to_image_R@k" for k in KS, "mean_recall"} in percent; mean_recall is
    the mean of those six numbers (the usual 'RSUM / 6')."""
    out = {}
    for direction, rank in (("image_to_text", i2t_rank_I), ("text_to_image", t2i_rank_T)):
        for k in KS:
            out[f"{direction}_R@{k}"] = 100.0 * (rank < k).double().mean().item()  # float64: exact-looking %
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _finite(emb: torch.Tensor, what: str) -> torch.Tensor:
    """A NaN embedding compares false with everything, which the rank rule would count as a win."""
    if not torch.isfinite(emb).all():
        raise ValueError(f"{what} embeddings hold NaN or inf: the model has diverged or the checkpoint is broken")
    return emb


def evaluate_retrieval_split(encoder: Encoder, annotation: str | Path, image_root: str | Path | None = None,
                             chunk_size: int = 512, name: str = "retrieval") -> dict[str, float]:
    """Recall metrics (see `recall_metrics`) for one annotation file, unprefixed."""
    split = load_split(annotation, image_root)
    img_ID = _finite(encoder.images(split.images, desc=f"{name} images").float(), f"{name} image")
    txt_TD = _finite(encoder.texts(split.captions, desc=f"{name} captions").float(), f"{name} caption")
    return recall_metrics(*retrieval_ranks(img_ID, txt_TD, split.caption_image_T, chunk_size))


def evaluate_retrieval(encoder: Encoder, root: str | Path, datasets: Sequence[str] = ("coco", "flickr30k"),
                       image_roots: Mapping[str, str | Path] | None = None,
                       chunk_size: int = 512) -> dict[str, float]:
    """Flat {"<dataset>/image_to_text_R@1", ..., "<dataset>/text_to_image_R@10", "<dataset>/mean_recall"}
    in percent, for each of `datasets` (keys of `ANNOTATION_FILES`); layout in the module docstring."""
    root = require(Path(root), "retrieval root")
    image_roots = dict(image_roots or {})
    results: dict[str, float] = {}
    for dataset in datasets:
        annotation = find_annotation(root, dataset)
        scores = evaluate_retrieval_split(encoder, annotation, image_roots.get(dataset), chunk_size, dataset)
        results.update({f"{dataset}/{metric}": value for metric, value in scores.items()})
    return results
