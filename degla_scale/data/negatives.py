"""Hard negatives for a caption, of the five DeGLA rewrite types, from an LLM or from rules.

- `validate(kind, positive, negative)`: the checks every answer must pass: it differs from the positive;
  reshuffle and swap types keep the same multiset of words; replace types change exactly one content word.
- `RuleBackend`: offline and deterministic, for simple captions (a built-in lexicon of colours, sizes,
  counts, common objects and spatial relations); what the synthetic data and the tests use.
- `LLMBackend`: an OpenAI-compatible chat endpoint (vLLM, llama.cpp server, hosted APIs), prompted with
  the type's rule and in-context examples; the `openai` client retries with back-off, answers are cached
  in a JSONL file so an interrupted run does not ask again, and the API key is never logged.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

TYPES = ("reshuffle", "swap_noun", "swap_adj", "replace_adj", "replace_noun")



@dataclass(frozen=True)
class Lexicon:
    """The words the rule backend knows. Adjectives (colours, sizes, counts) are only swapped or replaced
    within their group (a colour with a colour), so a rewrite never yields "a red small car"."""

    colours: tuple[str, ...]
    sizes: tuple[str, ...]
    counts: tuple[str, ...]
    objects: tuple[str, ...]
    relations: tuple[str, ...]  # phrases "A <relation> B" that a reshuffle turns into "B <relation> A"

    @property
    def adjective_groups(self) -> tuple[tuple[str, ...], ...]:
        return self.colours, self.sizes, self.counts


LEXICON = Lexicon(
    colours=("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "grey"),
    sizes=("small", "large", "big", "tiny", "little", "huge", "tall", "short"),
    counts=("two", "three", "four", "five", "six", "seven", "eight", "many", "several"),
    objects=("man", "woman", "child", "boy", "girl", "dog", "cat", "horse", "bird", "car", "bus", "truck", "bike",
             "bicycle", "train", "boat", "plane", "table", "chair", "bench", "bed", "couch", "cup", "bottle", "plate",
             "bowl", "pizza", "cake", "apple", "banana", "ball", "kite", "umbrella", "bag", "hat", "shirt", "tree",
             "flower", "building", "clock", "phone", "laptop", "book", "sign", "window", "door", "street", "field",
             "circle", "square", "triangle", "diamond", "cross", "star", "cube", "box", "sheep", "cow", "elephant"),
    relations=("left of", "right of", "above", "below", "on top of", "under", "next to", "behind", "in front of", "near"),
)
STOPWORDS = frozenset("a an the of on in at to and with is are its it this that from by for near".split())

RULES = {
    "reshuffle": "Reorder the words or phrases of the caption so that its meaning changes. Use exactly the same "
                 "words, each as often as in the caption.",
    "swap_noun": "Swap two nouns (objects) of the caption so that the roles change. Use exactly the same words.",
    "swap_adj": "Swap two adjectives (attributes) of the caption between their objects. Use exactly the same words.",
    "replace_adj": "Replace exactly one adjective (attribute) with a different one so that the caption no longer "
                   "matches the scene. Change no other word.",
    "replace_noun": "Replace exactly one noun (object) with a different one so that the caption no longer matches "
                    "the scene. Change no other word.",
}
EXAMPLES = {
    "reshuffle": [("a dog chasing a cat on the grass", "a cat chasing a dog on the grass"),
                  ("a man riding a horse near a fence", "a horse riding a man near a fence")],
    "swap_noun": [("a cup on a plate next to a laptop", "a plate on a cup next to a laptop"),
                  ("a boy holding a kite", "a kite holding a boy")],
    "swap_adj": [("a red car beside a white truck", "a white car beside a red truck"),
                 ("a small dog and a large cat", "a large dog and a small cat")],
    "replace_adj": [("a red car parked on the street", "a blue car parked on the street"),
                    ("a tall man with an umbrella", "a short man with an umbrella")],
    "replace_noun": [("a cat sleeping on a couch", "a cat sleeping on a bed"),
                     ("a woman eating a pizza", "a woman eating a cake")],
}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def validate(kind: str, positive: str, negative: str) -> str | None:
    """None if `negative` is a valid `kind` rewrite of `positive`, else the reason it is not."""
    pos, neg = words(positive), words(negative)
    if not neg:
        return "empty"
    if pos == neg:
        return "same_as_positive"
    if kind in ("reshuffle", "swap_noun", "swap_adj"):
        return None if Counter(pos) == Counter(neg) else "words_differ"
    if kind in ("replace_adj", "replace_noun"):
        if len(pos) != len(neg):
            return "not_one_word_replaced"
        changed = [(a, b) for a, b in zip(pos, neg) if a != b]
        if len(changed) != 1:
            return "not_one_word_replaced"
        return None if not (set(changed[0]) & STOPWORDS) else "function_word_replaced"
    raise ValueError(f"negative type {kind!r} is not one of {TYPES}")


class RuleBackend:
    """Lexicon rules: swaps and replacements of known colours, sizes and objects; phrase reshuffles around
    a known spatial relation. Returns None where a type does not apply to a caption. `attempt` > 0 draws
    another rewrite of the same type (a replace may pick another word)."""

    def __init__(self, seed: int = 0, lexicon: Lexicon = LEXICON):
        self.seed, self.lexicon = seed, lexicon

    def __call__(self, kind: str, caption: str, attempt: int = 0) -> str | None:
        rng = random.Random(f"{self.seed}/{kind}/{caption}" + (f"/{attempt}" if attempt else ""))
        tokens = caption.split()
        low = [t.lower().strip(".,") for t in tokens]
        groups = self.lexicon.adjective_groups
        nouns = [i for i, t in enumerate(low) if t in self.lexicon.objects]
        adjectives = [i for i, t in enumerate(low) if any(t in g for g in groups)]
        if kind == "swap_noun":
            return _swap(tokens, low, [nouns], rng)
        if kind == "swap_adj":
            return _swap(tokens, low, [[i for i in adjectives if low[i] in g] for g in groups], rng)
        if kind == "replace_noun" and nouns:
            i = rng.choice(nouns)
            return _replace(tokens, i, rng.choice([o for o in self.lexicon.objects if o != low[i]]))
        if kind == "replace_adj" and adjectives:
            i = rng.choice(adjectives)
            group = next(g for g in groups if low[i] in g)
            return _replace(tokens, i, rng.choice([w for w in group if w != low[i]]))
        if kind == "reshuffle":
            text = " ".join(tokens)
            for relation in self.lexicon.relations:  # "A <relation> B" → "B <relation> A"
                m = re.search(rf"^(.*?)\s+{relation}\s+(.*)$", text, flags=re.IGNORECASE)
                if m and m.group(1).lower() != m.group(2).lower():
                    return f"{m.group(2)} {relation} {m.group(1)}"
        return None


def _swap(tokens: list[str], low: list[str], groups: list[list[int]], rng: random.Random) -> str | None:
    """Exchange two different words at positions of the same group."""
    pairs = [(i, j) for positions in groups for i in positions for j in positions if i < j and low[i] != low[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    out = list(tokens)
    out[i], out[j] = tokens[j], tokens[i]
    return " ".join(out)


def _replace(tokens: list[str], i: int, word: str) -> str:
    out = list(tokens)
    out[i] = word
    return " ".join(out)


def prompt(kind: str, caption: str) -> list[dict]:
    """Chat messages: the type's rule, its in-context examples, then the caption."""
    shots = "\n".join(f"Caption: {c}\nRewrite: {r}" for c, r in EXAMPLES[kind])
    return [{"role": "system", "content": "You write hard negative captions for vision-language training. "
                                          f"{RULES[kind]} Answer with the rewritten caption only."},
            {"role": "user", "content": f"{shots}\nCaption: {caption}\nRewrite:"}]


class AnswerCache:
    """JSONL of {key, answer}: what the endpoint said for (model, type, caption), appended as answers come."""

    def __init__(self, path: Path | None):
        self.path, self.lock, self.answers = path, threading.Lock(), {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry["answer"]

    @staticmethod
    def key(model: str, kind: str, caption: str, attempt: int = 0) -> str:
        return hashlib.sha256(json.dumps([model, kind, caption] + ([attempt] if attempt else [])).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, answer: str) -> None:
        with self.lock:
            self.answers[key] = answer
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "answer": answer}) + "\n")


class LLMBackend:
    """Asks an OpenAI-compatible chat endpoint; thread-safe (one client, many threads)."""

    def __init__(self, url: str, model: str, api_key: str, cache: AnswerCache, max_retries: int = 5,
                 timeout_s: float = 60.0, temperature: float = 0.7):
        from openai import OpenAI

        self.client = OpenAI(base_url=url, api_key=api_key or "none", max_retries=max_retries, timeout=timeout_s)
        self.model, self.cache, self.temperature = model, cache, temperature
        self.asked = 0

    def __call__(self, kind: str, caption: str, attempt: int = 0) -> str | None:
        key = AnswerCache.key(self.model, kind, caption, attempt)
        answer = self.cache.get(key)
        if answer is None:
            reply = self.client.chat.completions.create(model=self.model, messages=prompt(kind, caption),
                                                        temperature=self.temperature, max_tokens=96)
            self.asked += 1
            answer = _first_line(reply.choices[0].message.content or "")
            self.cache.put(key, answer)
        return answer or None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"^(rewrite:\s*)", "", line, flags=re.IGNORECASE).strip().strip('"').strip()


def negatives_for(backend, record_id: str, caption: str, num_negatives: int, types: tuple[str, ...],
                  seed: int, rounds: int = 2) -> tuple[list[tuple[str, str]], list[dict], list[str]]:
    """Up to K distinct (type, negative) pairs for one caption. Its types are tried in a seeded order, one
    answer each per round; a further round (the backend's next `attempt`) runs only while fewer than K
    were accepted, so types repeat only when K exceeds the applicable ones or answers were rejected.
    → (accepted, rejected answers, the types that did not apply)."""
    order = list(types)
    random.Random(f"{seed}/{record_id}").shuffle(order)
    accepted, rejected, not_applicable = [], [], []
    for attempt in range(rounds):
        for kind in order:
            if len(accepted) == num_negatives:
                return accepted, rejected, not_applicable
            answer = backend(kind, caption, attempt)
            if answer is None:
                if attempt == 0:
                    not_applicable.append(kind)
                continue
            reason = validate(kind, caption, answer)
            if reason is None and answer not in (n for _, n in accepted):
                accepted.append((kind, answer))
            else:
                rejected.append({"id": record_id, "type": kind, "answer": answer, "reason": reason or "duplicate"})
        if len(not_applicable) == len(order):
            break
    return accepted, rejected, not_applicable
