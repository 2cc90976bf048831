"""Weights out of a run, in open_clip's own layout: from a DeepSpeed checkpoint of any ZeRO stage (student
or EMA teacher), or from a final `.pt`, to a dict, a safetensors file that
`open_clip.create_model_and_transforms(name, pretrained=PATH)` loads, or a directory (config JSON +
safetensors) that plain open_clip loads by itself with `create_model_and_transforms("local-dir:PATH")`,
custom architectures included.

The student comes from the fp32 master weights where ZeRO keeps them (stages 1-3, merged from every rank's
optimizer partition by DeepSpeed's own `zero_to_fp32`), else from the module weights (stage 0). The
teacher comes from `teacher.pt`, the whole fp32 EMA that every checkpoint holds. Only a complete checkpoint
(degla_scale.checkpoint's manifest and checksums) is read.

Checkpoints and `.pt` files may come from anywhere: every file is unpickled weights-only (tensors, plain
containers and the few DeepSpeed record types of DEEPSPEED_SAFE_GLOBALS), DeepSpeed's own loaders included,
so a file that would run code on loading is refused with one ExportError line instead.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from degla_scale import accelerator
from degla_scale.models import open_clip_layout

accelerator.configure()  # before deepspeed is imported (its zero_to_fp32 below), else it warns on every CPU machine

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The path is not a checkpoint this module can read; the message names it and the fix."""


# What DeepSpeed (0.19) pickles beside tensors and plain containers into its checkpoint files, found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0/1/2/3 checkpoints in fp32 and bf16 and on a
# universal checkpoint: the model states need none, the optimizer states these three. Each is a plain record
# (an Enum, a dataclass, an object with attributes only) that unpickles without running code.
DEEPSPEED_SAFE_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                          ("deepspeed.utils.tensor_fragment", "fragment_address"),
                          ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"))


def deepspeed_safe_globals() -> list:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_SAFE_GLOBALS]


@contextmanager
def weights_only_loads():
    """Within it every torch.load is weights-only, also DeepSpeed's own, which pass weights_only=False
    (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that), with DEEPSPEED_SAFE_GLOBALS allowed."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def unsafe_pickle_reason(exc: pickle.UnpicklingError) -> str:
    """The object a weights-only load refused, in a few words (torch's message runs over many lines)."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error: ([^.\n]+)", text)
    return f"pickles {found.group(1)}" if found else "pickles more than tensors"


def unsafe_pickle_in(files) -> tuple[Path, list[str]] | None:
    """The first of `files` whose pickle names a global that a weights-only load refuses, and those globals;
    None when there is none. Reads each file's pickle only (torch's static scan), not its tensors: a clean
    one-line refusal before a loader (DeepSpeed's, with its progress bars) starts. The forced weights-only
    load stays the guard: the scan sees no object built on the fly."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    allowed = {f"{module}.{name}" for module, name in DEEPSPEED_SAFE_GLOBALS}
    for path in files:
        try:
            unsafe = sorted(set(get_unsafe_globals_in_checkpoint(str(path))) - allowed)
        except Exception:  # not a zip-format torch file (or unreadable): left to the weights-only load
            continue
        if unsafe:
            return Path(path), unsafe
    return None


def refuse_unsafe_pickles(path: Path, error: type[Exception] = ExportError) -> None:
    """`error` naming the first `.pt` file of folder `path` (or `path` itself, a file) whose pickle holds more
    than weights (the static scan)."""
    path = Path(path)
    unsafe = unsafe_pickle_in(sorted(path.glob("*.pt")) if path.is_dir() else [path])
    if unsafe is not None:
        raise error(refusal(unsafe[0], f"pickles {', '.join(unsafe[1][:3])}"))


def refusal(source, what: str) -> str:
    """The one line that refuses a file: `source` (a path) `what` (e.g. "pickles builtins.exec")."""
    return f"{source} {what}, not plain weights: refused, as loading it could run code; use files from a source you trust"


def refused(source, exc: pickle.UnpicklingError) -> ExportError:
    return ExportError(refusal(source, unsafe_pickle_reason(exc)))


def load_weights(path: Path):
    """torch.load of a file that may come from anywhere: weights-only (see weights_only_loads), on the CPU;
    a file that pickles anything else, or is no torch file, is an ExportError."""
    try:
        with weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refused(path, exc) from None
    except (RuntimeError, EOFError) as exc:
        raise ExportError(f"{path} is not a readable torch file ({' '.join(str(exc).split())[:200]}): is it truncated? "
                          "copy it again") from None


def resolve_tag_dir(path: str | Path) -> Path:
    """A run directory or its `checkpoints/` folder (→ its newest complete checkpoint: `latest`'s when that is
    complete) or one tag folder (which must be complete) → the tag folder."""
    from degla_scale.checkpoint import TAG, check_complete, newest_complete

    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    chosen = (path / "latest").is_file() or any(TAG.fullmatch(p.name) for p in path.glob("step*"))
    if chosen:
        tag_dir, problems = newest_complete(path)  # verified, checksums included
        if tag_dir is None:
            raise ExportError(f"{path} holds no complete checkpoint ({'; '.join(problems)}): pass a complete "
                              "checkpoints/stepNNNNNNNN folder, or copy the checkpoint again")
        if problems:
            log.warning("%s: %s: exporting %s, the newest complete checkpoint", path, "; ".join(problems), tag_dir.name)
        path = tag_dir
    if not any(path.glob("*mp_rank_00_model_states.pt")):
        raise ExportError(f"{path} holds no DeepSpeed checkpoint (no *mp_rank_00_model_states.pt): pass a run "
                          "directory, its checkpoints/ folder or a checkpoints/stepNNNNNNNN folder")
    problem = None if chosen else check_complete(path)  # a tag folder given directly
    if problem is not None:
        raise ExportError(f"{path} is not a complete checkpoint: it {problem}; export another checkpoint "
                          "(its checkpoints/ folder picks the newest complete one), or copy this one again")
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
        state = load_weights(path)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExportError(f"{path} is not a state dict of tensors (a run's final/student.pt or teacher.pt is)")
        return {k: v.float() for k, v in state.items()}
    tag_dir = resolve_tag_dir(path)
    if which == "teacher":
        teacher_file = tag_dir / "teacher.pt"
        if not teacher_file.is_file():
            raise ExportError(f"{tag_dir} has no teacher.pt: the run had no EMA teacher, export the student")
        state = load_weights(teacher_file)["module"]
    elif which != "student":
        raise ExportError(f"which={which!r}: choose student or teacher")
    elif _is_zero_partitioned(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        refuse_unsafe_pickles(tag_dir)
        try:
            with weights_only_loads():  # zero_to_fp32 passes weights_only=False to torch.load
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except pickle.UnpicklingError as exc:
            raise refused(f"a file of {tag_dir}", exc) from None
    else:
        state = load_weights(tag_dir / "mp_rank_00_model_states.pt")["module"]
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
