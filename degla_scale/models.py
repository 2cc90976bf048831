"""open_clip models behind one root forward that DeepSpeed (and ZeRO-3's parameter hooks) can see.

Shapes: images [b, 3, H, W]; tokens [N, L] with N = b·(1+K) captions; embeddings [b, D] and [N, D].
"""
from __future__ import annotations

import math
from pathlib import Path

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
import torch
from torch import nn

from degla_scale.config import ConfigError, ModelConfig

_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_MODEL_CONFIG_DIR)  # registers the tiny test/demo architecture "degla-tiny"

MAX_LOGIT_SCALE = math.log(100.0)


class DeGLAModel(nn.Module):
    """Wraps an open_clip CLIP: encodes images and all their captions in one forward.

    The CLIP is built with a 1-dim `logit_scale` (DeepSpeed's broadcast rejects 0-dim parameters) and
    the raw parameter is clamped here, in forward, so the clamp also holds for ZeRO's fp32 master copy.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        img_BD = self.clip.encode_image(images, normalize=True)
        txt_ND = self.clip.encode_text(tokens, normalize=True)
        scale = self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return img_BD, txt_ND, scale

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in open_clip's own layout (0-dim logit_scale), loadable by `pretrained=PATH`."""
        return open_clip_layout(self.state_dict())


def open_clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `DeGLAModel` state dict ("clip."-prefixed, 1-dim logit_scale) in open_clip's own layout."""
    out = {k.removeprefix("clip."): v.detach().clone() for k, v in state.items()}
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def _check_name(name: str) -> None:
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower()[:5] in m.lower()][:5]
        raise ConfigError(f"model.name={name!r} is not an open_clip model: pick one of open_clip.list_models(), e.g. {close or ['ViT-B-32']}")


def build_clip(cfg: ModelConfig, load_weights: bool = True, device: str = "cpu") -> nn.Module:
    """The bare open_clip model; `pretrained` may be an open_clip tag or a local file."""
    _check_name(cfg.name)
    pretrained = cfg.pretrained if load_weights else None
    if pretrained and not Path(pretrained).is_file():
        tags = [tag for model, tag in open_clip.list_pretrained() if model == cfg.name]
        if pretrained not in tags:
            raise ConfigError(f"model.pretrained={pretrained!r} is neither a file nor an open_clip tag of {cfg.name}: use one of {tags or 'a local checkpoint file'}")
    clip = open_clip.create_model(cfg.name, pretrained=pretrained, device=device, nonscalar_logit_scale=True)
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return clip


def build_model(cfg: ModelConfig, load_weights: bool = True, device: str = "cpu") -> DeGLAModel:
    return DeGLAModel(build_clip(cfg, load_weights=load_weights, device=device))


def count_parameters_meta(cfg: ModelConfig) -> int:
    """Parameter count of the architecture, built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        model = build_model(cfg, load_weights=False, device="meta")
    return sum(p.numel() for p in model.parameters())


def image_transform(cfg: ModelConfig):
    """open_clip's evaluation preprocess for this architecture and pretrained tag (resize, crop, normalise)."""
    model_cfg = open_clip.get_model_config(cfg.name)
    pp = dict(model_cfg.get("preprocess_cfg", {}))
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
        pp.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    pp["size"] = model_cfg["vision_cfg"]["image_size"]
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


def tokenizer(cfg: ModelConfig):
    return open_clip.get_tokenizer(cfg.name)
