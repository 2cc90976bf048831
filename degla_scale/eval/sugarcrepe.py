"""SugarCrepe-format compositional evaluation: accuracy = cos(img, pos) > cos(img, neg), strictly.

File format (one per subset): {id: {"filename": ..., "caption": ..., "negative_caption": ...}},
images under `image_dir` (SugarCrepe's own files point into COCO val2017).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from degla_scale.eval.common import embed_images, embed_texts


def read_subset(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"SugarCrepe file {path} not found: check evaluation.sugarcrepe_dir and subsets")
    return list(json.loads(path.read_text()).values())


def pairwise_accuracy(img_BD: torch.Tensor, pos_BD: torch.Tensor, neg_BD: torch.Tensor) -> float:
    """Percent of rows whose image is strictly closer to the positive than to the negative (ties are wrong)."""
    correct = (img_BD * pos_BD).sum(-1) > (img_BD * neg_BD).sum(-1)
    return 100.0 * correct.float().mean().item()


def evaluate_sugarcrepe(model, transform, tokenize, root: str | Path, subsets: list[str], batch_size: int,
                        device, image_dir: str | Path | None = None) -> dict[str, float]:
    root = Path(root)
    image_dir = Path(image_dir) if image_dir else root / "images"
    results = {}
    for name in subsets:
        records = read_subset(root / f"{name}.json")
        missing = [r["filename"] for r in records if not (image_dir / r["filename"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {name} missing from {image_dir}, e.g. {missing[0]}")
        img_BD = embed_images(model, [image_dir / r["filename"] for r in records], transform, batch_size, device, name)
        pos_BD = embed_texts(model, tokenize, [r["caption"] for r in records], batch_size, device)
        neg_BD = embed_texts(model, tokenize, [r["negative_caption"] for r in records], batch_size, device)
        results[name] = pairwise_accuracy(img_BD, pos_BD, neg_BD)
    return results
