"""Shared evaluation plumbing: what an evaluator asks of a model (an `Encoder`), image references, and one
clear error for missing benchmark files.

Every evaluator takes an `Encoder` and a data root, so its scoring rules can be tested with a fake encoder
whose embeddings make the right answer known. Shapes: embeddings [N, D], L2-normalised, float32, CPU.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
from PIL import Image
from tqdm import tqdm


class EvalDataError(FileNotFoundError):
    """A benchmark file or image is missing or malformed; the message names the path and the fix."""


class EvalDependencyError(ImportError):
    """An optional package or its data that a requested suite needs is missing; the message names the install."""


def require(path: Path, what: str, fix: str = "check evaluation.data_root (see the evaluator's docstring for the "
                                                  "layout)") -> Path:
    """`path` if it exists, else one line naming it, what it is, and the fix."""
    if not path.exists():
        raise EvalDataError(f"{what} not found at {path}: {fix}")
    return path


def read_json(path: Path, what: str, expect: type = list):
    """The non-empty JSON list (or dict) at `path`, or an `EvalDataError` naming it and what was expected."""
    require(path, what)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{what} at {path} is not valid JSON ({err})") from None
    if not isinstance(data, expect) or not data:
        raise EvalDataError(f"{what} at {path} should be a non-empty JSON {expect.__name__}: is it the released file?")
    return data


def require_images(paths: Sequence[Path], what: str, fix: str = "check evaluation.data_root (see the evaluator's docstring "
                                                                 "for the layout)") -> None:
    """Fail before embedding anything if an image is missing, naming the first one: finding it after
    embedding thousands would waste the run."""
    missing = [p for p in dict.fromkeys(paths) if not p.is_file()]
    if missing:
        raise EvalDataError(f"{len(missing)} of {len(set(paths))} {what} images missing, e.g. {missing[0]}: {fix}")


@dataclass(frozen=True)
class ImageRef:
    """An image on disk, optionally cropped to a box (x, y, w, h) in pixels, as ARO's relation/attribute sets do."""

    path: Path
    box: tuple[float, float, float, float] | None = None

    def load(self) -> Image.Image:
        try:
            with Image.open(self.path) as im:
                rgb = im.convert("RGB")
        except FileNotFoundError:
            raise EvalDataError(f"image {self.path} not found: check evaluation.data_root and the benchmark's image folder") from None
        if self.box is None:
            return rgb
        x, y, w, h = self.box
        return rgb.crop((x, y, x + w, y + h))


class Scores(dict):
    """One suite's {metric: percent}, plus `averaged_over`: for each average it reports, the metrics (or the
    datasets) it is the unweighted mean of, so that a table can say what an average means."""

    def __init__(self, values=(), averaged_over: dict[str, list[str]] | None = None):
        super().__init__(values)
        self.averaged_over = dict(averaged_over or {})

    def add_average(self, key: str, members: Sequence[str], values: Sequence[float] | None = None) -> None:
        """self[key] = the mean of `values` (default: of self[m] for m in members), recorded as over `members`."""
        values = [self[m] for m in members] if values is None else list(values)
        self[key] = sum(values) / len(values)
        self.averaged_over[key] = list(members)


class Suite(Protocol):
    """A benchmark read and checked once (files, images, perturbations); `score` embeds with one model."""

    def score(self, encoder: "Encoder") -> Scores:
        ...


class Encoder(Protocol):
    def images(self, refs: Sequence[ImageRef], desc: str = "images") -> torch.Tensor:
        """[N, D] L2-normalised image embeddings, in the order of `refs`."""

    def texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor:
        """[N, D] L2-normalised text embeddings, in the order of `texts`."""


def _unique(items: Sequence) -> tuple[list, torch.Tensor]:
    """Distinct items in first-seen order and, per input item, its index among them."""
    index: dict = {}
    where = [index.setdefault(item, len(index)) for item in items]
    return list(index), torch.tensor(where, dtype=torch.long)


class ModelEncoder:
    """Embeds with an open_clip model (`encode_image` / `encode_text`) in batches, with a progress bar.
    Each distinct image or text is embedded once (benchmarks reuse images across many captions).

    `share=(rank, world)` splits the distinct items across the ranks of the process group: each embeds one
    contiguous share (the last padded with repeats, so every rank runs the same number of batches) and every
    rank receives all embeddings (`all_gather`). Collective then: every rank must make the same calls."""

    def __init__(self, clip, transform, tokenize, batch_size: int = 64, device: torch.device | str = "cpu",
                 loader_threads: int = 8, share: tuple[int, int] = (0, 1), progress: bool = True):
        self.clip, self.transform, self.tokenize = clip.to(device).eval(), transform, tokenize
        self.batch_size, self.device, self.loader_threads = batch_size, device, loader_threads
        self.rank, self.world = share
        self.progress = progress and self.rank == 0
        param = next(clip.parameters(), None)
        self.dtype = torch.float32 if param is None else param.dtype  # pixels in the weights' dtype

    def _embed(self, items: list, embed_batch, desc: str) -> torch.Tensor:
        """[len(items), D] float32 on the CPU: this rank's share embedded, every share gathered."""
        per = -(-len(items) // self.world)
        mine = items[self.rank * per:(self.rank + 1) * per]
        mine += [items[-1]] * (per - len(mine))
        batches = range(0, per, self.batch_size)
        out = [embed_batch(mine[i:i + self.batch_size])
               for i in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not self.progress)]
        local_PD = torch.cat(out)
        if self.world > 1:
            import torch.distributed as dist

            shares = [torch.empty_like(local_PD) for _ in range(self.world)]
            dist.all_gather(shares, local_PD)
            local_PD = torch.cat(shares)
        return local_PD[:len(items)].float().cpu()

    @torch.no_grad()
    def images(self, refs: Sequence[ImageRef], desc: str = "images") -> torch.Tensor:
        distinct, where = _unique(refs)
        if not distinct:
            return torch.zeros(0, 0)
        with ThreadPoolExecutor(self.loader_threads) as pool:  # JPEG decoding releases the GIL
            def embed(batch):
                pixels = torch.stack(list(pool.map(lambda ref: self.transform(ref.load()), batch)))
                return self.clip.encode_image(pixels.to(self.device, self.dtype), normalize=True)
            return self._embed(distinct, embed, desc)[where]

    @torch.no_grad()
    def texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor:
        distinct, where = _unique(texts)
        if not distinct:
            return torch.zeros(0, 0)
        embed = lambda batch: self.clip.encode_text(self.tokenize(batch).to(self.device), normalize=True)  # noqa: E731
        return self._embed(distinct, embed, desc)[where]


def pre_caption(caption: str, max_words: int) -> str:
    """BLIP's caption clean-up (salesforce/BLIP data/utils.py `pre_caption`), which its Karpathy retrieval test
    sets and ARO's order subsets apply to every caption: lower case; each of . ! " ( ) * # : ; ~ becomes a
    space; runs of two or more whitespace characters become one space (a lone tab or newline stays); a trailing
    newline and the spaces at both ends go; then at most `max_words` space-separated words are kept."""
    caption = re.sub(r'([.!"()*#:;~])', " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def finite(emb: torch.Tensor, what: str) -> torch.Tensor:
    """`emb`, refused if it holds NaN or inf: a diverged model or a broken checkpoint would otherwise score."""
    if not torch.isfinite(emb).all():
        raise ValueError(f"{what} embeddings hold NaN or inf: the model has diverged or the checkpoint is broken")
    return emb


def pairwise_correct(img_ND: torch.Tensor, pos_ND: torch.Tensor, neg_ND: torch.Tensor) -> torch.Tensor:
    """[N] bool: the image is strictly closer to the positive than to the negative (a tie counts as wrong)."""
    return (img_ND * pos_ND).sum(-1) > (img_ND * neg_ND).sum(-1)
