"""A run directory's record of its configs: every launch's resolved config is kept
(`config.<UTC timestamp>.json`, and `config.json` for the latest), and a resumed launch is compared with
the previous one, so that a changed hyper-parameter is named instead of silently overwritten.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from degla_scale.config import Config, ConfigError, as_dict

# Changing these mid-run would break the saved learning-rate schedule or data position, or is ignored by the
# restored optimizer state (its learning rate): refused, with the way out.
REFUSED_ON_RESUME = ("schedule.epochs", "schedule.max_steps", "schedule.warmup_steps", "optim.lr", "model.name",
                     "data.num_samples")
# Operational settings a resumed launch may change freely.
FREE = ("run_dir", "logging.", "checkpoint.", "evaluation.")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changes(previous: dict, now: dict) -> dict[str, tuple]:
    """key → (previous value, new value) for every hyper-parameter that differs."""
    old, new = flatten(previous), flatten(now)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not k.startswith(FREE)}


def check_resume(run_dir: Path, cfg: Config) -> str | None:
    """Raise for a refused change against the previous launch's config.json; → the warning line naming the
    other changes (None when there are none, or no previous config)."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        return None
    diff = changes(json.loads(saved.read_text()), as_dict(cfg))
    refused = {k: v for k, v in diff.items() if k in REFUSED_ON_RESUME}
    if refused:
        named = ", ".join(f"{k} {a} → {b}" for k, (a, b) in refused.items())
        raise ConfigError(f"{run_dir} was trained with other settings ({named}), which a resumed run cannot change: "
                          f"use a new run_dir, or checkpoint.resume=none to start over in this one")
    if not diff:
        return None
    return "resuming with changed settings: " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in diff.items())


def save(run_dir: Path, cfg: Config) -> Path:
    """This launch's resolved config, kept beside the earlier ones; config.json is the latest."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    text = json.dumps(as_dict(cfg), indent=1)
    (run_dir / f"config.{stamp}.json").write_text(text)
    (run_dir / "config.json").write_text(text)
    return run_dir / f"config.{stamp}.json"
