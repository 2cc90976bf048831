"""Weights out of a run, in open_clip's own layout: from a DeepSpeed checkpoint of any ZeRO stage (student
or EMA teacher), or from a final `.pt`, to a dict, a safetensors file that
`open_clip.create_model_and_transforms(name, pretrained=PATH)` loads, or a directory (config JSON +
safetensors) that plain open_clip loads by itself with `create_model_and_transforms("local-dir:PATH")`,
custom architectures included.

The student comes from the fp32 master weights where ZeRO keeps them (stages 1-3, merged from every rank's
optimizer partition by DeepSpeed's own `zero_to_fp32`), else from the module weights (stage 0). The
teacher comes from `teacher.pt`, the whole fp32 EMA that every checkpoint holds.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from degla_scale import accelerator
from degla_scale.models import open_clip_layout

accelerator.configure()  # before deepspeed is imported (its zero_to_fp32 below), else it warns on every CPU machine

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The path is not a checkpoint this module can read; the message names it and the fix."""


def resolve_tag_dir(path: str | Path) -> Path:
    """A run directory, its `checkpoints/` folder (→ the `latest` tag) or one tag folder → the tag folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not any(path.glob("*mp_rank_00_model_states.pt")):
        raise ExportError(f"{path} holds no DeepSpeed checkpoint (no *mp_rank_00_model_states.pt): pass a run "
                          "directory, its checkpoints/ folder or a checkpoints/stepNNNNNNNN folder")
    return path


def run_model_section(path: str | Path) -> dict | None:
    """The `model` section of the config.json of the run that `path` (a file or folder in it) belongs to."""
    path = Path(path).resolve()
    for folder in (path, *path.parents[:4]):
        config = folder / "config.json"
        if config.is_file():
            return json.loads(config.read_text())["model"]
    return None


def _is_zero_partitioned(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))


def checkpoint_state_dict(path: str | Path, which: str = "student") -> dict[str, torch.Tensor]:
    """fp32 weights of the student or teacher in open_clip's layout, from a checkpoint (any ZeRO stage)
    or from a `.pt` state dict already in that layout (a run's `final/student.pt`)."""
    path = Path(path)
    if path.is_file():
        return {k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    tag_dir = resolve_tag_dir(path)
    if which == "teacher":
        teacher_file = tag_dir / "teacher.pt"
        if not teacher_file.is_file():
            raise ExportError(f"{tag_dir} has no teacher.pt: the run had no EMA teacher, export the student")
        state = torch.load(teacher_file, map_location="cpu", weights_only=True)["module"]
    elif which != "student":
        raise ExportError(f"which={which!r}: choose student or teacher")
    elif _is_zero_partitioned(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in open_clip_layout(state).items()}


def export_safetensors(state: dict[str, torch.Tensor], out: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` as safetensors (written beside, then renamed, so a crash leaves no half file)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: open_clip recognises safetensors files by the .safetensors suffix; rename it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial),
              metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()})
    partial.replace(out)
    return out


def engine_state_dict(engine) -> dict[str, torch.Tensor]:
    """The live engine's weights in open_clip's layout, fp32, on CPU. Collective: every rank must call it.

    ZeRO keeps full weights nowhere (stage 3 partitions the module itself), so each parameter is assembled
    from its fp32 master partitions; stage 0 has no masters and gives the module weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (full if full is not None else param.detach()).float().cpu()
    saved = module.state_dict().keys()
    state.update({name: b.detach().float().cpu() for name, b in module.named_buffers() if name in saved})
    return open_clip_layout(state)


def export_dir(state: dict[str, torch.Tensor], out: str | Path, model, metadata: dict[str, str] | None = None) -> Path:
    """Write `out/open_clip_config.json` (the architecture, its QuickGELU variant and preprocessing, so no
    registry is needed to load it) and `out/open_clip_model.safetensors`. `model`: the run's ModelConfig."""
    import open_clip

    from degla_scale.models import preprocess_cfg, uses_quick_gelu

    model_cfg = open_clip.get_model_config(model.name)
    if model_cfg is None:
        raise ExportError(f"model {model.name!r} is not an open_clip architecture here: pass the run's model name")
    if uses_quick_gelu(model.name, model.pretrained):
        model_cfg["quick_gelu"] = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    export_safetensors(state, out / "open_clip_model.safetensors", metadata)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model)}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return out
