"""Shared evaluation plumbing: load a model from any checkpoint form, and embed in batches."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from degla_scale.config import ModelConfig
from degla_scale.models import DeGLAModel, build_model


def _latest_tag(ckpt_dir: Path) -> Path:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no 'latest' file: pass a DeepSpeed checkpoint folder or a .pt file")
    return ckpt_dir / latest.read_text().strip()


def load_for_eval(cfg: ModelConfig, checkpoint: str | None, which: str = "student") -> DeGLAModel:
    """`checkpoint` is an open_clip .pt file, a run directory, a DeepSpeed checkpoint folder, or None
    (the config's own `pretrained`)."""
    if checkpoint is None:
        return build_model(cfg).eval()
    path = Path(checkpoint)
    if path.is_file():
        return build_model(ModelConfig(cfg.name, pretrained=str(path))).eval()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist: pass a .pt file or a checkpoint folder")
    if (path / "checkpoints").is_dir():  # a run directory
        path = path / "checkpoints"
    tag_dir = _latest_tag(path) if (path / "latest").is_file() else path
    model = build_model(ModelConfig(cfg.name), load_weights=False)
    if which == "teacher":
        state = torch.load(tag_dir / "teacher.pt", map_location="cpu")["module"]
    else:
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def embed_texts(model: DeGLAModel, tokenize, texts: list[str], batch_size: int, device) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(model.clip.encode_text(tokenize(texts[i:i + batch_size]).to(device), normalize=True).float())
    return torch.cat(out)


@torch.no_grad()
def embed_images(model: DeGLAModel, images: list, transform, batch_size: int, device, desc: str) -> torch.Tensor:
    """`images` are paths or PIL images."""
    from PIL import Image

    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        pixels = []
        for item in images[i:i + batch_size]:
            if isinstance(item, (str, Path)):
                with Image.open(item) as im:
                    item = im.convert("RGB")
            pixels.append(transform(item))
        out.append(model.clip.encode_image(torch.stack(pixels).to(device), normalize=True).float())
    return torch.cat(out)
