"""SugarCrepe (Hsieh et al., NeurIPS 2023 Datasets and Benchmarks; github.com/RAIVNLab/sugar-crepe), scored
from an `Encoder` as the release's `main_eval.py` (`text_retrieval`, `evaluate`) scores it: a case is correct iff
cos(img, pos) > cos(img, neg), strictly (a tie counts as wrong); accuracy per subset file.

Layout (the release's --data_root and --coco_image_root; `evaluation.sugarcrepe.root` / `.image_root`)::

    root/<subset>.json   {id: {"filename": "000000397133.jpg", "caption": ..., "negative_caption": ...}}
    image_root/          the images the files name (SugarCrepe's: COCO val2017); default root/images

The released subsets are `SUBSETS`; their group averages (replace / swap / add) are reported too. Any other
file stems in this format can be evaluated (the synthetic data writes one per DeGLA negative type); a
stem's group is its prefix when that is one of `GROUPS` (so "swap_noun" joins "swap").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from degla_scale.config import SugarCrepeEvalConfig
from degla_scale.eval.common import (
    Encoder,
    EvalDataError,
    ImageRef,
    Scores,
    pairwise_correct,
    read_json,
    require_images,
)

SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
GROUPS = ("replace", "swap", "add")


def read_subset(root: Path, name: str) -> list[dict]:
    path = root / f"{name}.json"
    records = list(read_json(path, f"SugarCrepe subset {name!r}", dict).values())
    for r in records:
        if not all(isinstance(r.get(k), str) for k in ("filename", "caption", "negative_caption")):
            raise EvalDataError(f"{path}: a record lacks filename/caption/negative_caption strings: {r}")
    return records


@dataclass(frozen=True)
class SugarCrepeSuite:
    """The requested subsets' records, every image checked; `score` embeds with one model."""

    records: dict[str, list[dict]]
    image_root: Path

    def score(self, encoder: Encoder) -> Scores:
        """{subset: %, ..., "average": mean over subsets, group: mean over its subsets}."""
        rows = [r for name in self.records for r in self.records[name]]  # one pass: subsets share their images
        img_ND = encoder.images([ImageRef(self.image_root / r["filename"]) for r in rows], desc="SugarCrepe images")
        pos_ND = encoder.texts([r["caption"] for r in rows], desc="SugarCrepe captions")
        neg_ND = encoder.texts([r["negative_caption"] for r in rows], desc="SugarCrepe negatives")
        correct_N = pairwise_correct(img_ND, pos_ND, neg_ND)
        results, start = Scores(), 0
        for name, subset in self.records.items():
            results[name] = 100.0 * correct_N[start:start + len(subset)].double().mean().item()
            start += len(subset)
        names = list(self.records)
        results.add_average("average", names)
        for group in GROUPS:
            members = [name for name in names if name.split("_")[0] == group]
            if members:
                results.add_average(group, members)
        return results


def prepare_sugarcrepe(root: str | Path, cfg: SugarCrepeEvalConfig | None = None) -> SugarCrepeSuite:
    """Every file of `cfg.subsets` read and every image it names checked, before anything is embedded."""
    root, cfg = Path(root), cfg or SugarCrepeEvalConfig()
    image_root = Path(cfg.image_root) if cfg.image_root else root / "images"
    records = {name: read_subset(root, name) for name in cfg.subsets}
    for name, rows in records.items():
        require_images([image_root / r["filename"] for r in rows], f"SugarCrepe {name!r}",
                       f"put COCO val2017 (or the files' own images) in {image_root}, or set "
                       "evaluation.sugarcrepe.image_root")
    return SugarCrepeSuite(records, image_root)


def evaluate_sugarcrepe(encoder: Encoder, root: str | Path, subsets: Sequence[str] = SUBSETS) -> Scores:
    """`prepare_sugarcrepe` then `score`, for one model."""
    return prepare_sugarcrepe(root, SugarCrepeEvalConfig(subsets=list(subsets))).score(encoder)
