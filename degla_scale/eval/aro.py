"""ARO (Attribution, Relation, Order; Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words", ICLR 2023; github.com/mertyg/vision-language-models-are-bows), scored from an `Encoder` as the
release's `dataset_zoo/aro_datasets.py` scores it (`VG_Relation`, `VG_Attribution`, `COCO_Order`,
`Flickr30k_Order` and their `evaluate_scores`; perturbations from `dataset_zoo/perturbations.py` `TextShuffler`).

Four subsets, each reported in percent:

* ``vg_relation``: each case is a Visual Genome image cropped to the box around a relation, a true caption and
  the same caption with subject and object swapped. Correct iff argmax over [false, true] is the true one, so a
  tie is wrong (``evaluate_scores``: ``preds == 1``). Macro accuracy over ``relation_name``, leaving out the
  relations the release excludes as symmetric (`SYMMETRIC_RELATIONS`, from its replication notebook), because
  swapping the arguments of "next to" does not make the caption false.
* ``vg_attribution``: the same with the two attributes swapped. Macro accuracy over attribute pairs, keyed as
  the release does (``f"{attributes[0]}_{attributes[1]}"``, order kept) and, as it does, leaving out pairs with
  fewer than `ATTRIBUTION_MIN_COUNT` (25) cases.
* ``coco_order`` / ``flickr30k_order``: every (image, caption) of the Karpathy test split against four
  word-order perturbations of that caption (`order_perturbations`, as `TextShuffler` makes them). Precision@1:
  correct iff argmax over [caption, 4 perturbations] is 0 (``evaluate_scores``: ``preds == 0``), so a
  perturbation that left the caption unchanged ties it and resolves to the caption: correct. Every option goes
  through BLIP's `pre_caption` with 30 words, as the release does.

Layout, as the release reads it (``ARO_ROOT``, ``COCO_ROOT``, ``FLICKR_ROOT`` in its constants.py)::

    root/visual_genome_relation.json     VG-Relation: [{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
                                           "true_caption", "false_caption", "relation_name", ...}, ...]
    root/visual_genome_attribution.json  VG-Attribution: the same fields with "attributes": [a, b] instead
                                           of "relation_name"
    root/images/                         the VG (GQA subset) images both files name in "image_path"
    coco_root/coco_karpathy_test.json    [{"image": "val2014/COCO_val2014_....jpg", "caption": [...]}, ...]
    coco_root/val2014/                   COCO 2014 val images (image paths are coco_root/<"image">)
    flickr30k_root/flickr30k_test.json   [{"image": "flickr30k-images/....jpg", "caption": [...]}, ...]
    flickr30k_root/flickr30k-images/     Flickr30k images

``coco_root`` and ``flickr30k_root`` default to root/coco and root/flickr30k (``evaluation.aro.*``). Every file
a requested subset needs is checked before anything is embedded; a missing one is an `EvalDataError` naming it.

The order perturbations need spaCy's ``en_core_web_sm`` (Penn tags of nouns and adjectives) and NLTK's
``word_tokenize`` (the trigram ones), the optional extra ``pip install .[aro]`` plus their data; both are
checked when the subsets are prepared, before any model loads (`prepare_aro`). The random draws follow the
release too: numpy's global generator for the two noun/adjective shuffles and Python's for the trigram ones,
both seeded with ``seed`` (main_aro.py's ``seed_all(args.seed)``, default 1) before the first caption, one
subset per run, so the same spaCy and NLTK versions give the same perturbations.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from degla_scale.config import AroEvalConfig
from degla_scale.eval.common import (
    Encoder,
    EvalDataError,
    EvalDependencyError,
    ImageRef,
    Scores,
    pairwise_correct,
    pre_caption,
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
MAX_WORDS = 30  # COCO_Order / Flickr30k_Order's max_words: every option is pre_caption'ed to 30 words

# Penn Treebank tags (spaCy's token.tag_) the release's TextShuffler moves as nouns and as adjectives.
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
ADJ_TAGS = frozenset({"JJ", "JJR", "JJS"})
PERTURBATIONS = ("shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj", "shuffle_within_trigrams",
                 "shuffle_trigrams")  # the order `order_perturbations` returns them in (the release's order)

Tagger = Callable[[str], Sequence[tuple[str, str]]]  # text -> [(token, Penn tag)], as spaCy's tokens give them
Tokenizer = Callable[[str], list[str]]  # text -> tokens, as nltk.word_tokenize gives them

ARO_FIX = ("pip install '.[aro]' && python -m spacy download en_core_web_sm && python -m nltk.downloader punkt_tab "
           "(or leave coco_order and flickr30k_order out of evaluation.aro.subsets)")


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
    """[N] bool: option 0 (the caption) is the argmax of the image's similarities to [caption, perturbations],
    numpy's argmax taking the first of equal maxima, as the release's `evaluate_scores` does: a perturbation
    identical to the caption (a shuffle that changed nothing) ties it, and the case counts as correct."""
    sim_NK = torch.einsum("nd,nkd->nk", img_ND.float(), opt_NKD.float()).numpy()
    return torch.from_numpy(np.argmax(sim_NK, axis=-1) == 0)


# ------------------------------------------------------------------------------------------ order perturbations

@dataclass(frozen=True)
class OrderRandom:
    """The release's two random streams: numpy's global generator (the noun/adjective shuffles) and Python's
    (the trigram ones), each seeded by main_aro.py's `seed_all(seed)`; kept as objects so that one subset's
    draws do not depend on another's."""

    numpy: np.random.RandomState
    python: random.Random

    @classmethod
    def seeded(cls, seed: int) -> "OrderRandom":
        return cls(np.random.RandomState(seed), random.Random(seed))


def _trigrams(tokens: list[str]) -> list[list[str]]:
    """Consecutive groups of three tokens, the last possibly shorter (the release's `get_trigrams`)."""
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def order_perturbations(caption: str, tagger: Tagger, tokenize: Tokenizer, rng: OrderRandom) -> list[str]:
    """The release's four word-order perturbations of `caption`, in `PERTURBATIONS` order (not yet
    pre_caption'ed), drawing from `rng` in the release's order:

    1. the tagger's nouns permuted among noun positions, then its adjectives among adjective positions;
    2. every token that is neither permuted among the remaining positions;
    3. `tokenize`'s tokens permuted inside each consecutive trigram;
    4. those trigrams permuted as wholes."""
    tagged = list(tagger(caption))
    tokens_T = np.array([token for token, _ in tagged])
    nouns = [i for i, (_, tag) in enumerate(tagged) if tag in NOUN_TAGS]
    adjectives = [i for i, (_, tag) in enumerate(tagged) if tag in ADJ_TAGS]
    nouns_and_adj = tokens_T.copy()
    nouns_and_adj[nouns] = rng.numpy.permutation(nouns_and_adj[nouns])
    nouns_and_adj[adjectives] = rng.numpy.permutation(nouns_and_adj[adjectives])
    others_T = np.ones(len(tagged), dtype=bool)
    others_T[nouns + adjectives] = False
    allbut = tokens_T.copy()
    allbut[others_T] = rng.numpy.permutation(allbut[others_T])

    within = _trigrams(tokenize(caption))
    for trigram in within:
        rng.python.shuffle(trigram)
    across = _trigrams(tokenize(caption))
    rng.python.shuffle(across)
    return [" ".join(nouns_and_adj), " ".join(allbut),
            " ".join(" ".join(trigram) for trigram in within), " ".join(" ".join(trigram) for trigram in across)]


def order_options(caption: str, tagger: Tagger, tokenize: Tokenizer, rng: OrderRandom) -> list[str]:
    """[caption, 4 perturbations], each through `pre_caption(.., 30)` as the release feeds them to the model."""
    perturbed = order_perturbations(caption, tagger, tokenize, rng)
    return [pre_caption(text, MAX_WORDS) for text in [caption, *perturbed]]


@lru_cache(maxsize=1)
def _spacy_pipeline():
    """spaCy's en_core_web_sm, loaded once; the tags need only its tagger, so parser/NER/lemmatiser are off."""
    try:
        import spacy
    except ImportError:
        raise EvalDependencyError(f"ARO order subsets need spaCy to tag nouns and adjectives: {ARO_FIX}") from None
    try:
        nlp = spacy.load("en_core_web_sm")
    except OSError:
        raise EvalDependencyError(f"ARO order subsets need spaCy's model en_core_web_sm: {ARO_FIX}") from None
    nlp.select_pipes(disable=[name for name in ("parser", "ner", "lemmatizer") if name in nlp.pipe_names])
    return nlp


def nltk_tokenizer() -> Tokenizer:
    """`nltk.word_tokenize` (the release's trigram tokeniser), after checking that NLTK and its sentence model
    are installed, so a missing one fails before any model loads rather than at the first caption."""
    try:
        import nltk
    except ImportError:
        raise EvalDependencyError(f"ARO order subsets need NLTK to tokenise the trigram shuffles: {ARO_FIX}") from None
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        raise EvalDependencyError(f"ARO order subsets need NLTK's punkt_tab data: {ARO_FIX}") from None
    return nltk.word_tokenize


def spacy_tagger() -> Tagger:
    """The release's tagger: spaCy en_core_web_sm's tokens with their Penn tags (`token.tag_`)."""
    nlp = _spacy_pipeline()
    return lambda text: [(token.text, token.tag_) for token in nlp(text)]


# ---------------------------------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class VGCases:
    """A VG subset: per case the cropped image, the two captions, and the group the macro average is over."""

    name: str
    refs: list[ImageRef]
    true: list[str]
    false: list[str]
    groups: list[str]

    def score(self, encoder: Encoder) -> float:
        """Macro accuracy (percent), with the release's exclusions for this subset."""
        img_ND = encoder.images(self.refs, desc=f"ARO {self.name} images")
        true_ND = encoder.texts(self.true, desc=f"ARO {self.name} true captions")
        false_ND = encoder.texts(self.false, desc=f"ARO {self.name} false captions")
        correct_N = pairwise_correct(img_ND, true_ND, false_ND)  # argmax over [false, true] == 1: strict
        if self.name == "vg_relation":
            return macro_accuracy(correct_N, self.groups, exclude=SYMMETRIC_RELATIONS)
        return macro_accuracy(correct_N, self.groups, min_count=ATTRIBUTION_MIN_COUNT)


@dataclass(frozen=True)
class OrderCases:
    """An order subset: the distinct images and, per (image, caption) case, the image's index and its five
    pre_caption'ed options (caption first), drawn once when prepared."""

    name: str
    images: list[ImageRef]
    image_index: list[int]
    options: list[list[str]]

    def score(self, encoder: Encoder) -> float:
        """Precision@1 (percent): the caption is the argmax over itself and its four perturbations."""
        img_ID = encoder.images(self.images, desc=f"ARO {self.name} images")
        opt_MD = encoder.texts([text for case in self.options for text in case], desc=f"ARO {self.name} captions")
        opt_NKD = opt_MD.view(len(self.options), 1 + len(PERTURBATIONS), -1)
        img_ND = img_ID[torch.tensor(self.image_index, dtype=torch.long)]
        return 100.0 * order_correct(img_ND, opt_NKD).double().mean().item()


def attribute_pair(record: dict) -> str:
    """VG-Attribution's group key, formed as the release forms it (order kept: "white_black" != "black_white")."""
    first, second = record["attributes"]
    return f"{first}_{second}"


_VG_FILES = {"vg_relation": ("visual_genome_relation.json", "relation_name"),
             "vg_attribution": ("visual_genome_attribution.json", "attributes")}
_ORDER_FILES = {"coco_order": ("coco_karpathy_test.json", "coco_root", "coco"),
                "flickr30k_order": ("flickr30k_test.json", "flickr30k_root", "flickr30k")}
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
    return VGCases(name, refs, [r["true_caption"] for r in records], [r["false_caption"] for r in records], groups)


def order_root(root: Path, cfg: AroEvalConfig, name: str) -> Path:
    """The folder holding an order subset's Karpathy json and its images (evaluation.aro.<coco|flickr30k>_root)."""
    _, key, default = _ORDER_FILES[name]
    return Path(getattr(cfg, key) or root / default)


def load_order(folder: Path, name: str, tagger: Tagger, tokenize: Tokenizer, seed: int) -> OrderCases:
    """COCO- or Flickr30k-Order cases from folder/<Karpathy test json>, images at folder/<"image">, each
    caption's options drawn in file order from a fresh `OrderRandom.seeded(seed)` (one subset per run)."""
    file_name, key, _ = _ORDER_FILES[name]
    records = _read_records(folder / file_name, f"ARO {name} Karpathy test split", ("image", "caption"))
    images = [ImageRef(folder / record["image"]) for record in records]
    require_images([ref.path for ref in images], f"ARO {name}",
                   f"put them under {folder}, the folder holding {file_name} (evaluation.aro.{key})")
    rng = OrderRandom.seeded(seed)
    image_index, options = [], []
    for i, record in enumerate(tqdm(records, desc=f"ARO {name} perturbations", leave=False)):
        captions = [record["caption"]] if isinstance(record["caption"], str) else record["caption"]
        for caption in captions:
            image_index.append(i)
            options.append(order_options(caption, tagger, tokenize, rng))
    return OrderCases(name, images, image_index, options)


# ---------------------------------------------------------------------------------------------------- evaluate

@dataclass(frozen=True)
class AroSuite:
    """The requested subsets, read, checked and (order ones) perturbed; `score` embeds with one model."""

    subsets: dict[str, VGCases | OrderCases]

    def score(self, encoder: Encoder) -> Scores:
        """{subset: percent, ..., "average": the unweighted mean of the subsets' numbers}."""
        scores = Scores({name: cases.score(encoder) for name, cases in self.subsets.items()})
        scores.add_average("average", list(self.subsets))
        return scores


def prepare_aro(root: str | Path, cfg: AroEvalConfig | None = None, tagger: Tagger | None = None,
                tokenize: Tokenizer | None = None) -> AroSuite:
    """Every requested subset of `cfg.subsets` read and checked, and the order ones perturbed, before any model
    is loaded: a missing file, image, spaCy or NLTK fails in seconds with one line. `tagger` / `tokenize`
    replace spaCy / NLTK (tests, or another tagger at one's own risk: numbers then differ from the release's)."""
    root, cfg = Path(root), cfg or AroEvalConfig()
    unknown = [name for name in cfg.subsets if name not in SUBSETS]
    if unknown or not cfg.subsets:
        raise ValueError(f"unknown or no ARO subsets {unknown or cfg.subsets}: choose from {list(SUBSETS)}")
    order = [name for name in cfg.subsets if name in _ORDER_FILES]
    for name in order:  # the cheap checks first: a missing json must not wait for spaCy to load
        file_name, key, _ = _ORDER_FILES[name]
        require(order_root(root, cfg, name) / file_name, f"ARO {name} Karpathy test split",
                f"set evaluation.aro.{key} to the folder holding {file_name} and its images")
    vg = {name: load_vg(root, name) for name in cfg.subsets if name in _VG_FILES}
    if order:
        tokenize = tokenize or nltk_tokenizer()
        tagger = tagger or spacy_tagger()
    subsets = {}
    for name in dict.fromkeys(cfg.subsets):
        subsets[name] = vg[name] if name in vg else load_order(order_root(root, cfg, name), name, tagger, tokenize,
                                                                cfg.seed)
    return AroSuite(subsets)
