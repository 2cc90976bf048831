"""What `launch/eval.py --model` names, turned into an `Encoder`.

A model spec is `[LABEL=]SOURCE`:
- `openclip:NAME/TAG`: any open_clip model and pretrained tag or file, for baselines (`openclip:ViT-B-32/openai`);
- a path: a run directory, its checkpoints/ folder, one checkpoint tag folder (any ZeRO stage), a `.pt` state
  dict in open_clip's layout (a run's final/student.pt) or an exported `.safetensors`; append `#teacher` for
  the EMA teacher of a checkpoint, or a directory written by launch/export.py. The architecture and its preprocessing come from the run's config.json,
  else from the config given to launch/eval.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip

from degla_scale.config import ModelConfig
from degla_scale.eval.common import ModelEncoder
from degla_scale.export import checkpoint_state_dict, refuse_unsafe_pickles, run_model_section
from degla_scale.models import build_clip, check_model, create_clip, image_transform, tokenizer, uses_quick_gelu


@dataclass(frozen=True)
class ModelSpec:
    label: str
    source: str
    which: str = "student"

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        label, _, source = text.rpartition("=") if "=" in text else (text, "", text)
        source, _, which = source.partition("#")
        if which not in ("", "student", "teacher"):
            raise ValueError(f"--model {text!r}: the part after '#' must be student or teacher")
        if not source.startswith("openclip:") and not Path(source).exists():
            raise ValueError(f"--model {text!r}: {source} does not exist; give a run directory, checkpoint, .pt or "
                             ".safetensors file, or openclip:NAME/TAG")
        return cls(label or source, source, which or "student")

    def check(self) -> None:
        """Checked before any benchmark is read or model loaded: an `openclip:NAME/TAG` names a known architecture
        and tag (a `ConfigError` line otherwise); a `.pt` file, or a folder's own `.pt` files, pickle nothing but
        weights (torch's static scan; an `ExportError` refusal line otherwise)."""
        if self.source.startswith("openclip:"):
            name, _, tag = self.source.removeprefix("openclip:").partition("/")
            check_model(name, tag or None)
        else:
            refuse_unsafe_pickles(Path(self.source))


def load_encoder(spec: ModelSpec, default: ModelConfig, batch_size: int, device) -> ModelEncoder:
    if spec.source.startswith("openclip:"):
        name, _, tag = spec.source.removeprefix("openclip:").partition("/")
        cfg = ModelConfig(name, pretrained=tag or None)
        return ModelEncoder(create_clip(name, cfg.pretrained), image_transform(cfg), tokenizer(cfg), batch_size, device)
    if (Path(spec.source) / "open_clip_config.json").is_file():  # an exported directory: open_clip reads it whole
        clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{spec.source}")
        return ModelEncoder(clip, preprocess, open_clip.get_tokenizer(f"local-dir:{spec.source}"), batch_size, device)
    section = run_model_section(spec.source)
    cfg = ModelConfig(section["name"], pretrained=section.get("pretrained")) if section else default
    if spec.source.endswith(".safetensors"):
        clip = create_clip(cfg.name, spec.source, force_quick_gelu=uses_quick_gelu(cfg.name, cfg.pretrained))
    else:
        clip = load_state(build_clip(cfg, load_weights=False), checkpoint_state_dict(spec.source, spec.which))
    return ModelEncoder(clip, image_transform(cfg), tokenizer(cfg), batch_size, device)


def load_state(clip, state: dict):
    """`clip` holding `state` (open_clip's layout; the built model's logit_scale is 1-dim, the layout's a scalar)."""
    shapes = clip.state_dict()
    clip.load_state_dict({k: v.reshape(shapes[k].shape) for k, v in state.items()})
    return clip
