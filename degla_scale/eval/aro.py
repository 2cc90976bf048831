"""ARO (Attribution, Relation, Order; Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words", ICLR 2023; github.com/mertyg/vision-language-models-are-bows), scored from an `Encoder`.

Four subsets, each reported in percent:

* ``vg_relation``: each case is a Visual Genome image cropped to the box around a relation, a true caption and
  the same caption with subject and object swapped. Correct iff cos(img, true) > cos(img, false) strictly (a
  tie is wrong). Macro accuracy over ``relation_name``, leaving out the relations the benchmark's release
  excludes as symmetric (`SYMMETRIC_RELATIONS`, copied from its replication notebook), because swapping the
  arguments of "next to" does not make the caption false.
* ``vg_attribution``: the same with the two attributes swapped. Macro accuracy over attribute pairs, keyed as
  the release does (``f"{attributes[0]}_{attributes[1]}"``, order kept) and, as it does, leaving out pairs with
  fewer than `ATTRIBUTION_MIN_COUNT` (25) cases.
* ``coco_order`` / ``flickr30k_order``: every (image, caption) of the Karpathy test split against four
  word-order perturbations of that caption that this module generates (`order_perturbations`, seeded).
  Precision@1: correct iff the true caption's similarity is strictly greater than all four perturbations'. As
  in the release, every option goes through `normalise_caption` (lower case, punctuation dropped, 30 words).

Layout under `root` (file names as the benchmark and BLIP release them)::

    root/visual_genome_relation.json     VG-Relation: [{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
                                           "true_caption", "false_caption", "relation_name", ...}, ...]
    root/visual_genome_attribution.json  VG-Attribution: the same fields with "attributes": [a, b] instead
                                           of "relation_name"
    root/images/                         the VG (GQA subset) images both files name in "image_path"
    root/coco_karpathy_test.json         [{"image": "val2014/COCO_val2014_....jpg", "caption": [...]}, ...]
    root/coco/                           COCO 2014 image root: root/coco/val2014/COCO_val2014_....jpg
    root/flickr30k_test.json             [{"image": "flickr30k-images/....jpg", "caption": [...]}, ...]
    root/flickr30k/                      Flickr30k image root: root/flickr30k/flickr30k-images/....jpg

Every file a requested subset needs is checked before anything is embedded; a missing one is an
`EvalDataError` naming it (no requested subset is skipped).

The order perturbations need part-of-speech tags. `tagger` is any callable text -> [(token, universal POS)];
the default is spaCy's ``en_core_web_sm`` (what the benchmark uses), loaded only when an order subset is asked
for. All four perturbations shuffle the tagger's tokens (the release tokenises the trigram ones with NLTK).
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from degla_scale.eval.common import (
    Encoder,
    EvalDataError,
    ImageRef,
    pairwise_correct,
    read_json,
    require,
    require_images,
)

SUBSETS = ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")

# Relations the benchmark leaves out of VG-Relation's macro accuracy: the `symmetric` list of the release's
# notebooks/"Replicate ARO! VG-Relation, VG-Attribution.ipynb".
SYMMETRIC_RELATIONS = frozenset([
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing", "chewing", "cleaning",
    "climbing", "close to", "coming from", "coming out of", "contain", "crossing", "dragging", "draped over",
    "drinking", "drinking from", "driving", "driving down", "driving on", "eating from", "eating in", "enclosing",
    "exiting", "facing", "filled with", "floating in", "floating on", "flying", "flying above", "flying in",
    "flying over", "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off", "hanging over",
    "higher than", "holding onto", "hugging", "in between", "jumping off", "jumping on", "jumping over", "kept in",
    "larger than", "leading", "leaning over", "leaving", "licking", "longer than", "looking in", "looking into",
    "looking out", "looking over", "looking through", "lying next to", "lying on top of", "making", "mixed with",
    "mounted on", "moving", "on the back of", "on the edge of", "on the front of", "on the other side of",
    "opening", "painted on", "parked at", "parked beside", "parked by", "parked in", "parked in front of",
    "parked near", "parked next to", "perched on", "petting", "piled on", "playing", "playing in", "playing on",
    "playing with", "pouring", "reaching for", "reading", "reflected on", "riding on", "running in", "running on",
    "running through", "seen through", "sitting behind", "sitting beside", "sitting by", "sitting in front of",
    "sitting near", "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against", "standing around",
    "standing behind", "standing beside", "standing in front of", "standing near", "standing next to",
    "staring at", "stuck in", "surrounding", "swimming in", "swinging", "talking to", "topped with", "touching",
    "traveling down", "traveling on", "tying", "typing on", "underneath", "wading in", "waiting for",
    "walking across", "walking by", "walking down", "walking next to", "walking through", "working in",
    "working on", "worn on", "wrapped around", "wrapped in", "by", "of", "near", "next to", "with", "beside",
    "on the side of", "around",
])
ATTRIBUTION_MIN_COUNT = 25  # the release's VG_Attribution.evaluate_scores drops attribute pairs with fewer cases
MAX_WORDS = 30  # the release truncates every order option to 30 words

# Universal tags the noun/adjective perturbations move: the release selects Penn tags NN, NNS, NNP, NNPS
# (nouns, proper nouns included) and JJ, JJR, JJS (adjectives).
NOUN_TAGS = frozenset({"NOUN", "PROPN"})
ADJ_TAGS = frozenset({"ADJ"})
PERTURBATIONS = ("shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj", "shuffle_within_trigrams",
                 "shuffle_trigrams")  # the order `order_perturbations` returns them in (the release's order)

Tagger = Callable[[str], Sequence[tuple[str, str]]]

SPACY_FIX = "pip install spacy && python -m spacy download en_core_web_sm"


class TaggerUnavailableError(ImportError):
    """The default part-of-speech tagger (spaCy en_core_web_sm) cannot be loaded; the message names the fix."""


# ---------------------------------------------------------------------------------------------------- scoring

def macro_accuracy(correct_N: torch.Tensor, groups: Sequence[str], exclude: frozenset[str] = frozenset(),
                   min_count: int = 1) -> float:
    """Percent: the mean over groups of each group's accuracy, so a rare relation weighs as much as "on" (ARO
    reports macro, not micro, accuracy). Groups in `exclude` or with fewer than `min_count` cases are dropped."""
    if len(groups) != correct_N.shape[0]:
        raise ValueError(f"{correct_N.shape[0]} results but {len(groups)} group labels")
    per_group: dict[str, list[bool]] = defaultdict(list)
    for ok, group in zip(correct_N.tolist(), groups):
        per_group[group].append(bool(ok))
    kept = [sum(oks) / len(oks) for group, oks in per_group.items() if group not in exclude and len(oks) >= min_count]
    if not kept:
        raise ValueError(f"no group left to average ({len(per_group)} groups, all excluded or under {min_count} cases)")
    return 100.0 * sum(kept) / len(kept)


def order_correct(img_ND: torch.Tensor, opt_NKD: torch.Tensor) -> torch.Tensor:
    """[N] bool: option 0 (the true caption) is strictly more similar to the image than every other option,
    so a perturbation that ties it (e.g. a shuffle that happened to change nothing) makes the case wrong."""
    sim_NK = torch.einsum("nd,nkd->nk", img_ND, opt_NKD)
    return sim_NK[:, 0] > sim_NK[:, 1:].amax(dim=1)


# ------------------------------------------------------------------------------------------ order perturbations

def normalise_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """The release's caption clean-up (BLIP's `pre_caption`): lower case, . ! " ( ) * # : ; ~ become spaces,
    runs of whitespace collapse, ends are stripped, and at most `max_words` words are kept."""
    text = caption.lower()
    for char in '.!"()*#:;~':
        text = text.replace(char, " ")
    text = " ".join(text.split())
    return " ".join(text.split(" ")[:max_words])


def _shuffled_at(words: list[str], positions: list[int], rng: random.Random) -> list[str]:
    """A copy of `words` whose words at `positions` are permuted among those positions; the rest stay put."""
    moved = [words[i] for i in positions]
    rng.shuffle(moved)
    out = list(words)
    for i, word in zip(positions, moved):
        out[i] = word
    return out


def _trigrams(words: list[str]) -> list[list[str]]:
    """Consecutive groups of three words (the last may be shorter)."""
    return [words[i:i + 3] for i in range(0, len(words), 3)]


def order_perturbations(caption: str, tagger: Tagger, rng: random.Random) -> list[str]:
    """The benchmark's four word-order perturbations of `caption`, in `PERTURBATIONS` order, each the
    space-joined tokens of the tagger (not yet normalised):

    1. nouns permuted among noun positions and adjectives among adjective positions, all else in place;
    2. every other token permuted among the remaining positions, nouns and adjectives in place;
    3. the tokens inside each consecutive trigram permuted, trigrams in place;
    4. the trigrams permuted as wholes.

    Deterministic given the state of `rng` (the evaluator seeds one per subset)."""
    tagged = list(tagger(caption))
    words = [word for word, _ in tagged]
    nouns = [i for i, (_, tag) in enumerate(tagged) if tag in NOUN_TAGS]
    adjectives = [i for i, (_, tag) in enumerate(tagged) if tag in ADJ_TAGS]
    content = set(nouns) | set(adjectives)
    others = [i for i in range(len(words)) if i not in content]

    nouns_and_adj = _shuffled_at(_shuffled_at(words, nouns, rng), adjectives, rng)
    allbut = _shuffled_at(words, others, rng)
    within = []
    for trigram in _trigrams(words):
        rng.shuffle(trigram)
        within += trigram
    trigrams = _trigrams(words)
    rng.shuffle(trigrams)
    across = [word for trigram in trigrams for word in trigram]
    return [" ".join(option) for option in (nouns_and_adj, allbut, within, across)]


def order_options(caption: str, tagger: Tagger, rng: random.Random) -> list[str]:
    """[true, 4 perturbations], normalised as the release feeds them to the model."""
    return [normalise_caption(text) for text in [caption, *order_perturbations(caption, tagger, rng)]]


def ptb_to_universal(tag: str, pos: str) -> str:
    """The universal tag that makes the perturbations move exactly the tokens the release moves (Penn NN*/JJ*
    tags): Penn nouns/adjectives map to NOUN/PROPN/ADJ, and a token spaCy calls NOUN/PROPN/ADJ with another
    Penn tag (e.g. AFX) becomes X so that it stays put."""
    if tag in ("NN", "NNS"):
        return "NOUN"
    if tag in ("NNP", "NNPS"):
        return "PROPN"
    if tag in ("JJ", "JJR", "JJS"):
        return "ADJ"
    return "X" if pos in NOUN_TAGS | ADJ_TAGS else pos


@lru_cache(maxsize=1)
def _spacy_pipeline():
    """spaCy's en_core_web_sm, loaded once; only the tagger is needed, so parser/NER/lemmatiser are disabled."""
    try:
        import spacy
    except ImportError:
        raise TaggerUnavailableError(f"ARO order subsets need spaCy to tag nouns/adjectives: {SPACY_FIX} "
                                     "(or pass tagger=...)") from None
    try:
        nlp = spacy.load("en_core_web_sm")
    except OSError:
        raise TaggerUnavailableError(f"spaCy model en_core_web_sm is not installed: {SPACY_FIX} "
                                     "(or pass tagger=...)") from None
    nlp.select_pipes(disable=[name for name in ("parser", "ner", "lemmatizer") if name in nlp.pipe_names])
    return nlp


def spacy_tagger() -> Tagger:
    """The benchmark's tagger, spaCy en_core_web_sm, as a `Tagger`; raises `TaggerUnavailableError` (with the
    install command) at once if spaCy or the model is missing, rather than midway through an evaluation."""
    nlp = _spacy_pipeline()
    return lambda text: [(token.text, ptb_to_universal(token.tag_, token.pos_)) for token in nlp(text)]


# ---------------------------------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class VGCases:
    """A VG subset: per case the cropped image, the two captions, and the group the macro average is over."""

    refs: list[ImageRef]
    true: list[str]
    false: list[str]
    groups: list[str]


@dataclass(frozen=True)
class OrderCases:
    """An order subset: the distinct images, and per (image, caption) case the image's index and the caption."""

    images: list[ImageRef]
    image_index: list[int]
    captions: list[str]


def attribute_pair(record: dict) -> str:
    """VG-Attribution's group key, formed as the release forms it (order kept: "white_black" != "black_white")."""
    first, second = record["attributes"]
    return f"{first}_{second}"


_VG_FILES = {"vg_relation": ("visual_genome_relation.json", "relation_name"),
             "vg_attribution": ("visual_genome_attribution.json", "attributes")}
_ORDER_FILES = {"coco_order": ("coco_karpathy_test.json", "coco"),
                "flickr30k_order": ("flickr30k_test.json", "flickr30k")}
_BOX_FIELDS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")


def _read_records(path: Path, what: str, fields: Sequence[str]) -> list[dict]:
    """The JSON list at `path`, every record checked for `fields`, or an `EvalDataError` naming the path."""
    records = read_json(path, what)
    for i, record in enumerate(records):
        missing = [field for field in fields if field not in record]
        if missing:
            raise EvalDataError(f"{what} at {path}: record {i} lacks {missing} (expected the released ARO format)")
    return records


def load_vg(root: Path, name: str) -> VGCases:
    """VG-Relation or VG-Attribution cases from root/<file>.json and root/images/."""
    file_name, group_field = _VG_FILES[name]
    records = _read_records(root / file_name, f"ARO {name} annotations",
                            ("image_path", *_BOX_FIELDS, "true_caption", "false_caption", group_field))
    image_dir = require(root / "images", f"ARO {name} image folder")
    refs = [ImageRef(image_dir / r["image_path"], tuple(float(r[k]) for k in _BOX_FIELDS)) for r in records]
    require_images([ref.path for ref in refs], f"ARO {name}")
    groups = [r["relation_name"] if name == "vg_relation" else attribute_pair(r) for r in records]
    return VGCases(refs, [r["true_caption"] for r in records], [r["false_caption"] for r in records], groups)


def load_order(root: Path, name: str) -> OrderCases:
    """COCO- or Flickr30k-Order cases from root/<karpathy test file>.json and its image root."""
    file_name, image_folder = _ORDER_FILES[name]
    records = _read_records(root / file_name, f"ARO {name} Karpathy test split", ("image", "caption"))
    image_root = require(root / image_folder, f"ARO {name} image root")
    images, image_index, captions = [], [], []
    for i, record in enumerate(records):
        images.append(ImageRef(image_root / record["image"]))
        record_captions = [record["caption"]] if isinstance(record["caption"], str) else record["caption"]
        image_index += [i] * len(record_captions)
        captions += record_captions
    require_images([ref.path for ref in images], f"ARO {name}")
    return OrderCases(images, image_index, captions)


# ---------------------------------------------------------------------------------------------------- evaluate

def score_vg(encoder: Encoder, cases: VGCases, name: str) -> float:
    """Macro accuracy (percent) of a VG subset, with the benchmark's exclusions for that subset."""
    img_ND = encoder.images(cases.refs, desc=f"ARO {name} images")
    true_ND = encoder.texts(cases.true, desc=f"ARO {name} true captions")
    false_ND = encoder.texts(cases.false, desc=f"ARO {name} false captions")
    correct_N = pairwise_correct(img_ND, true_ND, false_ND)
    if name == "vg_relation":
        return macro_accuracy(correct_N, cases.groups, exclude=SYMMETRIC_RELATIONS)
    return macro_accuracy(correct_N, cases.groups, min_count=ATTRIBUTION_MIN_COUNT)


def score_order(encoder: Encoder, cases: OrderCases, tagger: Tagger, rng: random.Random, name: str) -> float:
    """Precision@1 (percent) of an order subset: the true caption must beat all four of its perturbations."""
    options = [option for caption in tqdm(cases.captions, desc=f"ARO {name} perturbations", leave=False)
               for option in order_options(caption, tagger, rng)]
    img_ID = encoder.images(cases.images, desc=f"ARO {name} images")
    opt_MD = encoder.texts(options, desc=f"ARO {name} captions")
    opt_NKD = opt_MD.view(len(cases.captions), 1 + len(PERTURBATIONS), -1)
    img_ND = img_ID[torch.tensor(cases.image_index, dtype=torch.long)]
    return 100.0 * order_correct(img_ND, opt_NKD).float().mean().item()


def evaluate_aro(encoder: Encoder, root: str | Path, subsets: Sequence[str] = SUBSETS, tagger: Tagger | None = None,
                 seed: int = 0) -> dict[str, float]:
    """{subset: percent, ..., "average": mean of the requested subsets}. Every requested subset's files are
    read and checked first, and the default tagger loaded if an order subset needs it, so a missing file or
    spaCy fails in seconds, not after an hour of embedding. Each order subset draws its perturbations from its
    own `random.Random(seed)`, so its score does not depend on which other subsets are requested."""
    root, subsets = Path(root), list(subsets)
    unknown = [name for name in subsets if name not in SUBSETS]
    if unknown or not subsets:
        raise ValueError(f"unknown or no ARO subsets {unknown or subsets}: choose from {list(SUBSETS)}")
    cases = {name: load_vg(root, name) if name in _VG_FILES else load_order(root, name) for name in subsets}
    if tagger is None and any(name in _ORDER_FILES for name in subsets):
        tagger = spacy_tagger()
    results = {}
    for name in subsets:
        if name in _VG_FILES:
            results[name] = score_vg(encoder, cases[name], name)
        else:
            results[name] = score_order(encoder, cases[name], tagger, random.Random(seed), name)
    results["average"] = sum(results.values()) / len(results)
    return results
