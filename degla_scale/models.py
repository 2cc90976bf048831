"""open_clip models behind one root forward that DeepSpeed (and ZeRO-3's parameter hooks) can see.

Shapes: images [b, 3, H, W]; tokens [N, L] with N = b·(1+K) captions; embeddings [b, D] and [N, D].
"""
from __future__ import annotations

import logging
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


def is_custom_architecture(name: str) -> bool:
    """An architecture of this project (degla_scale/model_configs), unknown to plain open_clip."""
    return (_MODEL_CONFIG_DIR / f"{name}.json").is_file()


def open_clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `DeGLAModel` state dict ("clip."-prefixed, 1-dim logit_scale) in open_clip's own layout."""
    out = {k.removeprefix("clip."): v.detach().clone() for k, v in state.items()}
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def check_model(name: str, pretrained: str | None) -> None:
    """The architecture exists and `pretrained` is a file or one of its open_clip tags: checked before any
    download or process group, so a typo costs one line, not a traceback."""
    import difflib

    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3, cutoff=0.5)
        raise ConfigError(f"model.name={name!r} is not an open_clip model: did you mean {' or '.join(close or ['ViT-B-32'])}? "
                          "(open_clip.list_models() lists them)")
    if not pretrained or Path(pretrained).is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return
    if "/" in pretrained or Path(pretrained).suffix:  # meant as a file
        raise ConfigError(f"model.pretrained={pretrained!r}: no such file: give an existing checkpoint (e.g. a run's "
                          f"final/student.pt) or an open_clip tag of {name} ({_listing(tags)})")
    close = difflib.get_close_matches(pretrained, tags, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"model.pretrained={pretrained!r} is not an open_clip tag of {name}: {hint}"
                      f"its tags: {_listing(tags)}")


def _listing(tags: list[str]) -> str:
    if not tags:
        return "none: give a local checkpoint file"
    return ", ".join(tags[:4]) + (f", … ({len(tags)} in all, open_clip.list_pretrained_tags_by_model)" if len(tags) > 4 else "")


def _offline_message(name: str, tag: str) -> str:
    return (f"could not download the {tag!r} weights of {name} (is this machine offline?): copy the checkpoint here and "
            f"set model.pretrained=/path/to/file, or download it once on a machine with internet (open_clip caches it "
            f"under $HF_HOME, default ~/.cache/huggingface) and copy that cache here")


def _reachable(host: str = "huggingface.co", port: int = 443, timeout_s: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _cached(name: str, tag: str) -> bool:
    """Whether the tag's weights are already in the Hugging Face cache (so no network is needed)."""
    repo = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo.rstrip("/"), f), str)
               for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """OpenAI's weights were trained with QuickGELU; open_clip's plain `ViT-B-32` config uses GELU, so a model
    for such a tag must be built with QuickGELU (also when its weights come from elsewhere later)."""
    if not pretrained or Path(pretrained).is_file():
        return False
    return bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))


def create_clip(name: str, pretrained: str | None, load_weights: bool = True, **kwargs) -> nn.Module:
    """`open_clip.create_model` with one-line errors: a bad name or tag before anything runs, a failed
    download naming the offline fixes. `pretrained` fixes the architecture variant (QuickGELU for OpenAI's
    tags) and, with `load_weights`, the weights; without, the caller loads weights itself, so open_clip's
    "initialized randomly" warning would be untrue and is dropped."""
    check_model(name, pretrained if load_weights else None)
    kwargs.setdefault("force_quick_gelu", uses_quick_gelu(name, pretrained))
    weights = pretrained if load_weights else None
    is_tag = bool(weights) and not Path(weights).is_file()
    if is_tag and not _cached(name, weights) and not _reachable():
        raise ConfigError(_offline_message(name, weights))
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    if not load_weights:
        root.addFilter(quiet)
    try:
        return open_clip.create_model(name, pretrained=weights, **kwargs)
    except RuntimeError as exc:
        if is_tag and "download" in str(exc).lower():
            raise ConfigError(_offline_message(name, weights)) from None
        raise
    finally:
        root.removeFilter(quiet)


def build_clip(cfg: ModelConfig, load_weights: bool = True, device: str = "cpu") -> nn.Module:
    """The bare open_clip model; `pretrained` may be an open_clip tag or a local file. `load_weights=False`:
    the architecture only (the caller loads the weights)."""
    clip = create_clip(cfg.name, cfg.pretrained, load_weights, device=device, nonscalar_logit_scale=True)
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return clip


def build_model(cfg: ModelConfig, load_weights: bool = True, device: str = "cpu") -> DeGLAModel:
    return DeGLAModel(build_clip(cfg, load_weights=load_weights, device=device))


def compile_blocks(module: nn.Module) -> nn.Module:
    """Regional compilation: `torch.compile` each transformer block of both towers in place, so parameter
    names and state dicts stay as they are and every block of one shape reuses one graph (dynamo inlines
    nn.Module parameters as graph inputs), which keeps compile time to a few graphs however deep the model."""
    from open_clip.transformer import ResidualAttentionBlock

    for block in module.modules():
        if isinstance(block, ResidualAttentionBlock):
            block.compile()
    return module


def count_parameters_meta(cfg: ModelConfig) -> int:
    """Parameter count of the architecture, built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        model = build_model(cfg, load_weights=False, device="meta")
    return sum(p.numel() for p in model.parameters())


def preprocess_cfg(cfg: ModelConfig) -> dict:
    """open_clip's preprocessing of this architecture and pretrained tag (size, mean, std, interpolation, resize)."""
    model_cfg = open_clip.get_model_config(cfg.name)
    pp = dict(model_cfg.get("preprocess_cfg", {}))
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
        pp.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    pp["size"] = model_cfg["vision_cfg"]["image_size"]
    return pp


def image_transform(cfg: ModelConfig):
    """open_clip's evaluation preprocess for this architecture and pretrained tag (resize, crop, normalise)."""
    return image_transform_v2(PreprocessCfg(**preprocess_cfg(cfg)), is_train=False)


def train_image_transform(cfg: ModelConfig):
    """The same resize and crop as `image_transform`, output uint8 [3, S, S]; normalised on the device."""
    from degla_scale.data.images import TrainImageTransform

    pp = PreprocessCfg(**preprocess_cfg(cfg))  # its defaults fill in what the model config leaves out
    size = pp.size if isinstance(pp.size, int) else min(pp.size)
    return TrainImageTransform(image_transform_v2(pp, is_train=False), size, pp.mean, pp.std)


def tokenizer(cfg: ModelConfig):
    return open_clip.get_tokenizer(cfg.name)
