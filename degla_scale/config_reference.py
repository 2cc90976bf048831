"""Every config key of the schema (`degla_scale.config.Config`), with its type, default and docstring.

Read from the dataclasses themselves (field docstrings from their source), so `train.py --help` and the
"did you mean" suggestions can never list a key the schema lacks or miss one it has.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Key:
    name: str  # dotted, e.g. optim.lr
    type: str
    default: object
    doc: str


def _field_docs(cls) -> dict[str, str]:
    """Field name → the string literal written right below it in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} | null" if len(args) == 1 else " | ".join(map(_type_name, args))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


@lru_cache(maxsize=None)
def keys(cls=None) -> tuple[Key, ...]:
    """Every leaf key of `cls` (default: the whole Config), depth first, in declaration order."""
    from degla_scale.config import Config

    return tuple(_keys(cls or Config, ""))


def _keys(cls, prefix: str):
    hints, docs, instance = typing.get_type_hints(cls), _field_docs(cls), cls()
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            yield from _keys(tp, f"{prefix}{f.name}.")
        else:
            yield Key(prefix + f.name, _type_name(tp), value, docs.get(f.name, ""))


def names() -> list[str]:
    return [k.name for k in keys()]


def is_key(name: str) -> bool:
    """A leaf key, or a section (`optim`), of the schema."""
    return any(k == name or k.startswith(name + ".") for k in names())


def closest_key(name: str) -> str | None:
    """The valid key nearest to a misspelt one: within its own section first, then by its last part
    anywhere (`lr` → `optim.lr`), then by the whole name."""
    section, _, leaf = name.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in names() if k.rpartition(".")[0] == section}
    for candidates, word, cutoff in ((siblings, leaf, 0.5),
                                     ({k.rpartition(".")[2]: k for k in names()}, leaf, 0.7),
                                     ({k: k for k in names()}, name, 0.6)):
        match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
        if match:
            return candidates[match[0]]
    return None


def unknown_key_message(name: str) -> str:
    """The one line for a key the schema lacks, with the closest valid key."""
    close = closest_key(name)
    hint = f"did you mean {close}? " if close else ""
    return f"unknown config key '{name}': {hint}(`python launch/train.py --help` lists every key)"


def reference_text(width: int = 100) -> str:
    """The --help listing: one entry per key, grouped by section."""
    from omegaconf import OmegaConf

    lines, section = [], None
    for k in keys():
        head = k.name.rpartition(".")[0] or "(top level)"
        if head != section:
            section = head
            lines.append(f"\n{section}:")
        default = OmegaConf.to_yaml({"v": k.default}).strip()[3:] if isinstance(k.default, (list, dict)) else k.default
        default = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        lines.append(f"  {k.name} ({k.type}, default {default})")
        if k.doc:
            lines.extend(textwrap.wrap(k.doc, width, initial_indent="      ", subsequent_indent="      ",
                                       break_on_hyphens=False))
    return "\n".join(lines).lstrip("\n")
