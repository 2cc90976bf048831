"""SugarCrepe (Hsieh et al., NeurIPS 2023 Datasets and Benchmarks; github.com/RAIVNLab/sugar-crepe), scored
from an `Encoder`: accuracy = cos(img, pos) > cos(img, neg), strictly (a tie counts as wrong).

Layout under `root`::

    root/<subset>.json   {id: {"filename": "000000397133.jpg", "caption": ..., "negative_caption": ...}}
    root/images/         the images the files name (SugarCrepe's point into COCO val2017)

The released subsets are `SUBSETS`; their group averages (replace / swap / add) are reported too. Any other
file stems in this format can be evaluated (the synthetic data writes one per DeGLA negative type); a
stem's group is its prefix when that is one of `GROUPS` (so "swap_noun" joins "swap").
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from degla_scale.eval.common import Encoder, EvalDataError, ImageRef, pairwise_correct, read_json, require_images

SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
GROUPS = ("replace", "swap", "add")


def read_subset(root: Path, name: str) -> list[dict]:
    path = root / f"{name}.json"
    records = list(read_json(path, f"SugarCrepe subset {name!r}", dict).values())
    for r in records:
        if not all(isinstance(r.get(k), str) for k in ("filename", "caption", "negative_caption")):
            raise EvalDataError(f"{path}: a record lacks filename/caption/negative_caption strings: {r}")
    return records


def group_averages(results: dict[str, float]) -> dict[str, float]:
    """Mean accuracy per group (unweighted over its subsets), for the groups any subset belongs to."""
    out = {}
    for group in GROUPS:
        members = [v for k, v in results.items() if k.split("_")[0] == group]
        if members:
            out[group] = sum(members) / len(members)
    return out


def evaluate_sugarcrepe(encoder: Encoder, root: str | Path, subsets: Sequence[str] = SUBSETS) -> dict[str, float]:
    """{subset: %, ..., group: %, "average": mean over subsets}. All files and images are checked first."""
    root = Path(root)
    image_dir = root / "images"
    records = {name: read_subset(root, name) for name in subsets}
    for name, rows in records.items():
        require_images([image_dir / r["filename"] for r in rows], f"SugarCrepe {name!r}",
                       f"put COCO val2017 (or the files' own images) in {image_dir}")
    rows = [r for name in records for r in records[name]]  # one pass: the subsets share their COCO images
    img_ND = encoder.images([ImageRef(image_dir / r["filename"]) for r in rows], desc="SugarCrepe images")
    pos_ND = encoder.texts([r["caption"] for r in rows], desc="SugarCrepe captions")
    neg_ND = encoder.texts([r["negative_caption"] for r in rows], desc="SugarCrepe negatives")
    correct_N = pairwise_correct(img_ND, pos_ND, neg_ND)
    results, start = {}, 0
    for name in records:
        stop = start + len(records[name])
        results[name] = 100.0 * correct_N[start:stop].float().mean().item()
        start = stop
    averages = group_averages(results)
    results["average"] = sum(results.values()) / len(results)
    results.update(averages)
    return results
