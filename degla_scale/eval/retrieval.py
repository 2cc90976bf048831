"""Image-text retrieval recall@{1, 5, 10}, both directions, on the Karpathy test splits as salesforce/BLIP
released and scores them (`train_retrieval.py` `itm_eval`; `data/coco_karpathy_dataset.py` and
`data/flickr30k_dataset.py` `*_retrieval_eval`; `data/utils.py` `pre_caption`):

- every caption goes through `pre_caption(caption, max_words)` (BLIP's retrieval configs: 30 words);
- each annotation entry is one image with its own captions, in file order (an image listed twice is two);
- a query's candidates are ordered by `np.argsort(scores)[::-1]` over its float32 similarity row (numpy's
  default sort, so equal scores fall as that sort leaves them); image→text takes the best position of any of
  the image's captions, text→image the position of its own image; R@k = share of queries placed below k;
- mean_recall = BLIP's r_mean, the mean of the six recalls.

Files (BLIP's annotation JSON, also what ARO's `dataset_zoo/retrieval.py` downloads):
  - coco:      `coco_karpathy_test.json`  — 5,000 images, 25,010 captions; "image": "val2014/COCO_val2014_....jpg"
  - flickr30k: `flickr30k_test.json`      — 1,000 images, 5,000 captions;  "image": "flickr30k-images/<id>.jpg"
    (`flickr30k_test_karpathy.json` is accepted as another name for it)
Each is a JSON list of {"image": <path under the image root>, "caption": [captions], ...}; other fields are
ignored and a single caption string is read as a list of one.

Layout: the annotation file sits at `root/<file>` or `root/<dataset>/<file>` (BLIP's ann_root); image paths
resolve against `evaluation.retrieval.<dataset>_image_root` (BLIP's image_root), by default the folder holding
the file. The [images, captions] similarity matrix is held in float32 (COCO: 0.5 GB); it is sorted in row blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from degla_scale.config import RetrievalEvalConfig
from degla_scale.eval.common import (
    Encoder,
    EvalDataError,
    ImageRef,
    Scores,
    finite,
    pre_caption,
    read_json,
    require,
    require_images,
)

ANNOTATION_FILES: dict[str, tuple[str, ...]] = {
    "coco": ("coco_karpathy_test.json",),
    "flickr30k": ("flickr30k_test.json", "flickr30k_test_karpathy.json"),
}
KS = (1, 5, 10)
FORMAT = 'a JSON list of {"image": "<path under the image root>", "caption": ["...", ...]} (BLIP\'s Karpathy split)'
_ROWS = 256  # query rows argsorted at once: 256 × 25k int64 positions stay small


@dataclass(frozen=True)
class RetrievalSplit:
    """One image per annotation entry, every cleaned caption, and which image each caption describes."""

    name: str
    images: list[ImageRef]
    captions: list[str]
    caption_image_T: np.ndarray  # [T] int64: index into `images`


def find_annotation(root: Path, dataset: str) -> Path:
    """The dataset's annotation file under root/ or root/<dataset>/, first known file name first."""
    if dataset not in ANNOTATION_FILES:
        raise EvalDataError(f"unknown retrieval dataset {dataset!r}: set evaluation.retrieval.datasets to some of "
                            f"{sorted(ANNOTATION_FILES)}")
    for folder in (root, root / dataset):
        for filename in ANNOTATION_FILES[dataset]:
            if (folder / filename).is_file():
                return folder / filename
    return require(root / ANNOTATION_FILES[dataset][0], f"{dataset} retrieval annotation (BLIP's Karpathy test "
                   f"split; also looked for in {root / dataset})", "set evaluation.retrieval.root to the folder of "
                   "the annotation files")


def load_split(annotation: Path, image_root: Path | None, max_words: int, name: str = "retrieval") -> RetrievalSplit:
    """Read a BLIP-format annotation file as BLIP's `*_retrieval_eval` datasets do; every image must exist."""
    entries = read_json(annotation, f"{name} retrieval annotation file")
    image_root = image_root or annotation.parent
    images, captions, owners = [], [], []
    for n, entry in enumerate(entries):
        caps = entry.get("caption") if isinstance(entry, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not caps \
                or not all(isinstance(c, str) for c in caps):
            raise EvalDataError(f"{annotation} entry {n} is malformed ({str(entry)[:120]}): expected {FORMAT}")
        captions += [pre_caption(c, max_words) for c in caps]
        owners += [len(images)] * len(caps)
        images.append(ImageRef(image_root / entry["image"]))
    require_images([ref.path for ref in images], annotation.name,
                   f"set evaluation.retrieval.{name}_image_root to the folder its \"image\" paths start from")
    return RetrievalSplit(name, images, captions, np.asarray(owners, dtype=np.int64))


def _positions(scores_BC: np.ndarray) -> np.ndarray:
    """[B, C]: each candidate's place in its row's `np.argsort(row)[::-1]` (itm_eval's order; 0 = first)."""
    order_BC = np.argsort(scores_BC, axis=1)[:, ::-1]
    place_BC = np.empty_like(order_BC)
    np.put_along_axis(place_BC, order_BC, np.arange(scores_BC.shape[1])[None, :], axis=1)
    return place_BC


def retrieval_ranks(sim_IT: np.ndarray, caption_image_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([I] image→text ranks, [T] text→image ranks) as `itm_eval` computes them from scores_i2t = sim_IT and
    scores_t2i = sim_IT.T: the best place of an image's own captions, and the place of a caption's own image."""
    num_images, num_texts = sim_IT.shape
    i2t = np.empty(num_images, dtype=np.int64)
    for i in range(0, num_images, _ROWS):
        place_BT = _positions(sim_IT[i:i + _ROWS])
        own_BT = caption_image_T[None, :] == np.arange(i, i + len(place_BT))[:, None]
        i2t[i:i + _ROWS] = np.where(own_BT, place_BT, num_texts).min(1)
    sim_TI = np.ascontiguousarray(sim_IT.T)
    t2i = np.empty(num_texts, dtype=np.int64)
    for j in range(0, num_texts, _ROWS):
        place_BI = _positions(sim_TI[j:j + _ROWS])
        t2i[j:j + _ROWS] = np.take_along_axis(place_BI, caption_image_T[j:j + _ROWS, None], 1)[:, 0]
    return i2t, t2i


def recall_metrics(i2t_rank_I: np.ndarray, t2i_rank_T: np.ndarray) -> Scores:
    """{"image_to_text_R@k" (BLIP's txt_r), "text_to_image_R@k" (img_r) for k in KS, "mean_recall" (r_mean)}, %."""
    out = Scores()
    for direction, rank in (("image_to_text", i2t_rank_I), ("text_to_image", t2i_rank_T)):
        for k in KS:
            out[f"{direction}_R@{k}"] = 100.0 * int((rank < k).sum()) / len(rank)
    out.add_average("mean_recall", list(out))
    return out


@dataclass(frozen=True)
class RetrievalSuite:
    splits: list[RetrievalSplit]

    def score(self, encoder: Encoder) -> Scores:
        """{"<dataset>/<metric>"} for every split (metrics in `recall_metrics`)."""
        results = Scores()
        for split in self.splits:
            img_ID = finite(encoder.images(split.images, desc=f"{split.name} images").float(), f"{split.name} image")
            txt_TD = finite(encoder.texts(split.captions, desc=f"{split.name} captions").float(),
                            f"{split.name} caption")
            sim_IT = (img_ID @ txt_TD.T).numpy()
            scores = recall_metrics(*retrieval_ranks(sim_IT, split.caption_image_T))
            results.update({f"{split.name}/{m}": v for m, v in scores.items()})
            results.averaged_over[f"{split.name}/mean_recall"] = [f"{split.name}/{m}" for m in
                                                                  scores.averaged_over["mean_recall"]]
        return results


def prepare_retrieval(root: str | Path, cfg: RetrievalEvalConfig | None = None) -> RetrievalSuite:
    """Every split of `cfg.datasets` read, its captions cleaned and its images checked."""
    root, cfg = require(Path(root), "retrieval root"), cfg or RetrievalEvalConfig()
    image_roots = {"coco": cfg.coco_image_root, "flickr30k": cfg.flickr30k_image_root}
    splits = []
    for dataset in cfg.datasets:
        image_root = image_roots.get(dataset)
        splits.append(load_split(find_annotation(root, dataset), Path(image_root) if image_root else None,
                                 cfg.max_words, dataset))
    return RetrievalSuite(splits)


def evaluate_retrieval(encoder: Encoder, root: str | Path, cfg: RetrievalEvalConfig | None = None) -> Scores:
    """`prepare_retrieval` then `score`, for one model."""
    return prepare_retrieval(root, cfg).score(encoder)
