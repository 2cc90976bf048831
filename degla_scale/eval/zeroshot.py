"""Zero-shot classification over an ImageFolder split with `classes.json` (names, folders, templates)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from degla_scale.eval.common import embed_images, embed_texts


def class_embeddings(model, tokenize, classnames: list[str], templates: list[str], batch_size: int, device) -> torch.Tensor:
    """Mean of the normalised template embeddings per class, renormalised: [C, D]."""
    prompts = [t.format(c) for c in classnames for t in templates]
    txt_CTD = embed_texts(model, tokenize, prompts, batch_size, device).reshape(len(classnames), len(templates), -1)
    cls_CD = txt_CTD.mean(1)
    return cls_CD / cls_CD.norm(dim=-1, keepdim=True)


def evaluate_zeroshot(model, transform, tokenize, root: str | Path, batch_size: int, device) -> dict[str, float]:
    root = Path(root)
    meta_path = root / "classes.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: the zero-shot folder needs classes.json (classes, folders, templates)")
    meta = json.loads(meta_path.read_text())
    paths, labels = [], []
    for label, folder in enumerate(meta["folders"]):
        files = sorted((root / folder).glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"class folder {root / folder} holds no .jpg images")
        paths += files
        labels += [label] * len(files)
    img_BD = embed_images(model, paths, transform, batch_size, device, "zero-shot")
    cls_CD = class_embeddings(model, tokenize, meta["classes"], meta["templates"], batch_size, device)
    logits_BC = img_BD @ cls_CD.T
    labels_B = torch.tensor(labels, device=logits_BC.device)
    top5 = logits_BC.topk(min(5, logits_BC.shape[1]), dim=1).indices
    return {
        "acc1": 100.0 * (top5[:, 0] == labels_B).float().mean().item(),
        "acc5": 100.0 * (top5 == labels_B[:, None]).any(1).float().mean().item(),
    }
