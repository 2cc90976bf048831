"""VALSE (Parcalabescu et al., ACL 2022): is the image closer to its caption than to a *foil*, the same caption with
one linguistic phenomenon changed (existence, number, counts, spatial relations, actions, coreference, nouns)?

Data: the eleven JSON files of github.com/Heidelberg-NLP/VALSE (`data/`), unchanged. Images are not redistributed;
each file points into one original dataset (its `dataset` field), so each gets its own image folder, flat, exactly as
that dataset ships it (a download can be symlinked in place, or named through `evaluation.valse.image_dirs`,
e.g. `evaluation.valse.image_dirs.visual7w=/data/visual7w/images`):

    root/
      data/existence.json              data/plurals.json              data/counting-hard.json
      data/counting-small-quant.json   data/counting-adversarial.json data/relations.json
      data/action-replacement.json     data/actant-swap.json          data/coreference-standard.json
      data/coreference-hard.json       data/foil-it.json
      images/visual7w/                 Visual7W images, v7w_<id>.jpg          existence, counting-*
      images/coco/val2017/             COCO 2017 val, 000000xxxxxx.jpg        plurals, relations
      images/swig/                     SWiG (imSitu) images, <verb>_<n>.jpg   action-replacement, actant-swap
      images/coco/train2014/           COCO 2014 train, COCO_train2014_*.jpg  coreference-standard
      images/coco/val2014/             COCO 2014 val, COCO_val2014_*.jpg      coreference-standard, foil-it
      images/visdial/                  VisDial v1.0 val, VisualDialog_val2018_*.jpg   coreference-hard

coreference-standard is drawn from VisDial v1.0 *train*, whose images are COCO train2014 and val2014 both; the
`COCO_train2014_` / `COCO_val2014_` prefix of `image_file` picks the folder. Only the images of kept samples must exist.

Record fields read: `image_file`, `caption`, `foil` (strings) and `mturk` = {"caption": n, "foil": n, "other": n},
the votes of three annotators. The files hold validated and rejected foils alike; the VALSE README defines the valid
set as `mturk["caption"] >= 2` ("at least two of three annotators chose the caption, but not the foil, as the text
that describes the image"), which is `keep`. A record without `mturk` was never validated and is dropped too.

Score: pairwise accuracy per file, the percent of kept samples with cos(image, caption) > cos(image, foil), strictly
(a tie is wrong), as the release's `lxmert_valse_eval.py` computes its pairwise accuracy acc_r (caption score >
foil score, over samples with mturk caption >= 2). Columns, as the paper's table groups the files: Existence, Plurality, Counting (mean of its three
files), Spatial relations, Actions (mean of action replacement and actant swap), Coreference (mean of standard and
hard), Foil-it; a column appears only when all its files were evaluated. "average" is the
unweighted mean over the evaluated *files* (not over columns, not weighted by sample count): the paper's Avg. column.

Naming: the paper calls the six phenomena (columns) "pieces" and the files "instruments"; here, as in the rest of
this package's API, a "piece" is one released file, named by its file stem.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from degla_scale.config import ValseEvalConfig
from degla_scale.eval.common import Encoder, EvalDataError, ImageRef, Scores, pairwise_correct, require

# Image folders under root, and the name the error message gives a user who must download them.
IMAGE_SOURCES: dict[str, tuple[str, str]] = {
    "visual7w": ("images/visual7w", "Visual7W"),
    "coco_val2017": ("images/coco/val2017", "COCO 2017 val"),
    "swig": ("images/swig", "SWiG"),
    "coco_train2014": ("images/coco/train2014", "COCO 2014 train"),
    "coco_val2014": ("images/coco/val2014", "COCO 2014 val"),
    "visdial_val2018": ("images/visdial", "VisDial v1.0 val"),
}

# Piece (file stem) → the image folders it draws on, in the paper's table order.
# Of two folders, the prefix of `image_file` picks one.
PIECE_SOURCES: dict[str, tuple[str, ...]] = {
    "existence": ("visual7w",),
    "plurals": ("coco_val2017",),
    "counting-hard": ("visual7w",),
    "counting-small-quant": ("visual7w",),
    "counting-adversarial": ("visual7w",),
    "relations": ("coco_val2017",),
    "action-replacement": ("swig",),
    "actant-swap": ("swig",),
    "coreference-standard": ("coco_train2014", "coco_val2014"),
    "coreference-hard": ("visdial_val2018",),
    "foil-it": ("coco_val2014",),
}
_PREFIXES = {"coco_train2014": "COCO_train2014_", "coco_val2014": "COCO_val2014_"}

ALL_PIECES: tuple[str, ...] = tuple(PIECE_SOURCES)

COLUMNS: dict[str, tuple[str, ...]] = {
    "Existence": ("existence",),
    "Plurality": ("plurals",),
    "Counting": ("counting-hard", "counting-small-quant", "counting-adversarial"),
    "Spatial relations": ("relations",),
    "Actions": ("action-replacement", "actant-swap"),
    "Coreference": ("coreference-standard", "coreference-hard"),
    "Foil-it": ("foil-it",),
}

MIN_CAPTION_VOTES = 2  # of 3 annotators (VALSE README: valid samples have mturk["caption"] >= 2)


def keep(record: Mapping) -> bool:
    """In VALSE's valid set: at least two of the three annotators chose the caption and not the foil."""
    mturk = record.get("mturk")
    return isinstance(mturk, Mapping) and (mturk.get("caption") or 0) >= MIN_CAPTION_VOTES


def image_source(piece: str, image_file: str) -> str:
    """Key of `IMAGE_SOURCES` holding this record's image (the file-name prefix decides for mixed pieces)."""
    sources = PIECE_SOURCES[piece]
    if len(sources) == 1:
        return sources[0]
    for source in sources:
        if image_file.startswith(_PREFIXES[source]):
            return source
    raise EvalDataError(f"VALSE {piece} image {image_file!r} has none of the prefixes "
                        f"{[_PREFIXES[s] for s in sources]}: is data/{piece}.json the released file?")


def image_folders(root: Path, image_dirs: Mapping[str, str | Path] | None = None) -> dict[str, Path]:
    """Source → folder: the documented layout under `root`, with any of them replaced by `image_dirs`."""
    unknown = set(image_dirs or {}) - set(IMAGE_SOURCES)
    if unknown:
        raise ValueError(f"unknown VALSE image sources {sorted(unknown)}; known: {list(IMAGE_SOURCES)}")
    folders = {source: root / rel for source, (rel, _) in IMAGE_SOURCES.items()}
    folders.update({source: Path(folder) for source, folder in (image_dirs or {}).items()})
    return folders


def read_piece(root: Path, piece: str) -> dict[str, dict]:
    """The released file as {sample id: record}; a missing file is an error, never a skipped piece."""
    path = require(root / "data" / f"{piece}.json", f"VALSE {piece} file (from github.com/Heidelberg-NLP/VALSE data/)")
    records = json.loads(path.read_text())
    if not isinstance(records, dict):
        raise EvalDataError(f"{path} is not the released VALSE format ({{sample id: record}})")
    return records


def piece_samples(root: Path, piece: str, folders: Mapping[str, Path]) -> tuple[list[ImageRef], list[str], list[str]]:
    """(images, captions, foils) of the piece's kept samples, each image checked to exist."""
    kept = {key: r for key, r in read_piece(root, piece).items() if keep(r)}
    if not kept:
        raise EvalDataError(f"{root / 'data' / f'{piece}.json'} has no validated sample (mturk caption >= "
                            f"{MIN_CAPTION_VOTES}): is it the released file?")
    refs, captions, foils = [], [], []
    for key, r in kept.items():
        if not all(isinstance(r.get(field), str) for field in ("image_file", "caption", "foil")):
            raise EvalDataError(f"VALSE {piece} sample {key!r} lacks a string image_file, caption or foil")
        source = image_source(piece, r["image_file"])
        path = require(folders[source] / r["image_file"], f"VALSE {piece} image ({IMAGE_SOURCES[source][1]})")
        refs.append(ImageRef(path))
        captions.append(r["caption"])
        foils.append(r["foil"])
    return refs, captions, foils


def pairwise_accuracy(encoder: Encoder, piece: str, refs: list[ImageRef], captions: list[str],
                      foils: list[str]) -> float:
    """Percent of samples whose image is strictly closer to the caption than to the foil."""
    img_ND = encoder.images(refs, desc=f"VALSE {piece} images")
    cap_ND = encoder.texts(captions, desc=f"VALSE {piece} captions")
    foil_ND = encoder.texts(foils, desc=f"VALSE {piece} foils")
    return 100.0 * pairwise_correct(img_ND, cap_ND, foil_ND).float().mean().item()


@dataclass(frozen=True)
class ValseSuite:
    """The requested pieces' kept samples, every file and image checked; `score` embeds with one model."""

    samples: dict[str, tuple[list[ImageRef], list[str], list[str]]]

    def score(self, encoder: Encoder) -> Scores:
        """{piece: acc, column: mean of its pieces' acc, "average": mean over the pieces}, all in percent."""
        results = Scores({piece: pairwise_accuracy(encoder, piece, *triple) for piece, triple in self.samples.items()})
        for column, members in COLUMNS.items():
            if all(m in results for m in members):
                results.add_average(column, list(members))
        results.add_average("average", list(self.samples))
        return results


def prepare_valse(root: str | Path, cfg: ValseEvalConfig | None = None) -> ValseSuite:
    """Every file of `cfg.pieces` (stems from `ALL_PIECES`) read and every kept sample's image checked, before
    anything is embedded: a gap stops the run at once, not hours in. `cfg.image_dirs`: {key of `IMAGE_SOURCES`:
    folder}, downloaded image folders used in place of the layout under `root` (module docstring)."""
    root, cfg = Path(root), cfg or ValseEvalConfig()
    unknown = [p for p in cfg.pieces if p not in PIECE_SOURCES]
    if unknown or not cfg.pieces:
        raise ValueError(f"unknown VALSE pieces {unknown}; known: {list(ALL_PIECES)}")
    folders = image_folders(root, cfg.image_dirs)
    return ValseSuite({piece: piece_samples(root, piece, folders) for piece in dict.fromkeys(cfg.pieces)})


def evaluate_valse(encoder: Encoder, root: str | Path, pieces: Sequence[str] = ALL_PIECES,
                   image_dirs: Mapping[str, str | Path] | None = None) -> Scores:
    """`prepare_valse` then `score`, for one model."""
    cfg = ValseEvalConfig(pieces=list(pieces), image_dirs={k: str(v) for k, v in (image_dirs or {}).items()})
    return prepare_valse(root, cfg).score(encoder)
