"""Built-in synthetic compositional data: drawn scenes, captions, and hard negatives of the paper's five types.

A scene holds one or two objects, each with a shape, a colour and a size; two objects stand in a spatial
relation (left of / right of / above / below). Everything is deterministic given (seed, split, index).

Splits (written by `write_synthetic_dataset`):
- `pretrain/`: webdataset shards of loose captions for plain CLIP pre-training. Objects are named in
  random order and the relation is rarely stated, so word order says nothing about which object is
  where; in-batch contrast can then be won by a bag of words, which leaves the binding gap real CLIP has.
- `finetune/`: mostly two-object scenes with structured captions and K hard negatives, made by the
  rule backend of `negatives.py` over this world's lexicon (json: negatives, types).
- `sugarcrepe/`: held-out evaluation files in SugarCrepe's format, one per negative type.
- `zeroshot/`: single-object images in class folders (colour + shape), for zero-shot classification.
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageDraw

from degla_scale.data.negatives import TYPES as NEGATIVE_TYPES
from degla_scale.data.negatives import Lexicon, RuleBackend, negatives_for

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (35, 70, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 50, 185),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = {"small": 0.15, "large": 0.24}  # radius as a fraction of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str

    def phrase(self, with_size: bool = True) -> str:
        words = [self.size] if with_size else []
        return " ".join(["a", *words, self.colour, self.shape])


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relation: str | None  # relation of objects[0] to objects[1], e.g. "left of"
    centres: tuple[tuple[float, float], ...]  # in [0, 1] image coordinates
    background: int


def sample_scene(rng: random.Random, num_objects: int) -> Scene:
    """Two objects always differ in shape and colour, so every swap negative is false."""
    shapes = rng.sample(SHAPES, num_objects)
    colours = rng.sample(list(COLOURS), num_objects)
    objects = tuple(Obj(s, c, rng.choice(list(SIZES))) for s, c in zip(shapes, colours))
    background = rng.randint(70, 130)
    if num_objects == 1:
        return Scene(objects, None, ((rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)),), background)
    relation = rng.choice(list(RELATIONS))
    near, far = rng.uniform(0.22, 0.3), rng.uniform(0.7, 0.78)
    across = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    first, second = {
        "left of": ((near, across[0]), (far, across[1])),
        "right of": ((far, across[0]), (near, across[1])),
        "above": ((across[0], near), (across[1], far)),
        "below": ((across[0], far), (across[1], near)),
    }[relation]
    return Scene(objects, relation, (first, second), background)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(shape)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj, (x, y) in zip(scene.objects, scene.centres):
        cx, cy, r, fill = x * size, y * size, SIZES[obj.size] * size, COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif obj.shape == "cross":
            w = r * 0.35
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return image


# ---------------------------------------------------------------- captions and hard negatives


def structured_caption(a: Obj, relation: str, b: Obj) -> str:
    return f"{a.phrase()} {relation} {b.phrase()}"


def oriented(scene: Scene, rng: random.Random) -> tuple[Obj, str, Obj]:
    """(subject, relation, object) with a random subject, so neither object is always named first."""
    a, b = scene.objects
    if rng.random() < 0.5:
        return a, scene.relation, b
    return b, RELATIONS[scene.relation], a


# The rule backend with the synthetic world's own words: every rewrite is false of its scene, because two
# objects always differ in shape and colour (a replacement names an object the scene does not hold; a
# swap or reshuffle binds the attributes or the relation wrongly).
LEXICON = Lexicon(colours=tuple(COLOURS), sizes=tuple(SIZES), counts=(), objects=SHAPES, relations=tuple(RELATIONS))


def hard_negatives(seed: int, record_id: str, caption: str, num_negatives: int) -> tuple[list[str], list[str]]:
    """K negatives of distinct applicable types (repeating types only when K exceeds them) → (texts, types)."""
    accepted, _, _ = negatives_for(RuleBackend(seed, LEXICON), record_id, caption, num_negatives,
                                   NEGATIVE_TYPES, seed, rounds=8)
    if len(accepted) < num_negatives:
        raise ValueError(f"the rule backend made {len(accepted)} of {num_negatives} negatives for {caption!r}: "
                         "lower num_negatives")
    return [n for _, n in accepted], [t for t, _ in accepted]


BOUND_CAPTION_RATE = 0.15  # two-object pre-training captions that say which colour goes with which shape
RELATION_CAPTION_RATE = 0.05  # ... and of those that also state the spatial relation


def pretrain_caption(scene: Scene, rng: random.Random) -> str:
    """Loose caption. Single objects are named fully. For two objects the caption mostly lists the shapes
    and the colours separately, each in random order, so it cannot teach which colour belongs to which
    shape; a few captions bind them (objects in random order), fewer still state the relation."""
    with_size = rng.random() < 0.5
    if len(scene.objects) == 1:
        return scene.objects[0].phrase(with_size)
    subject, relation, obj = oriented(scene, rng)
    draw = rng.random()
    if draw < RELATION_CAPTION_RATE:
        return f"{subject.phrase(with_size)} {relation} {obj.phrase(with_size)}"
    if draw < BOUND_CAPTION_RATE:
        return f"{subject.phrase(with_size)} and {obj.phrase(with_size)}"
    shapes = rng.sample([o.shape for o in scene.objects], 2)
    colours = rng.sample([o.colour for o in scene.objects], 2)
    return f"a {shapes[0]} and a {shapes[1]}, {colours[0]} and {colours[1]}"


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{split}/{index}")


def pretrain_sample(seed: int, index: int) -> tuple[Image.Image, str]:
    rng = _rng(seed, "pretrain", index)
    scene = sample_scene(rng, 1 if rng.random() < 0.3 else 2)
    return render(scene), pretrain_caption(scene, rng)


SINGLE_OBJECT_RATE = 0.3  # fine-tuning scenes with one object (only the replace types apply to them)


def finetune_record(seed: int, index: int, num_negatives: int, split: str = "finetune") -> dict:
    """Scene, structured caption and K hard negatives from the rule backend.

    Most scenes hold two objects (all five types apply); some hold one, so fine-tuning keeps seeing
    the plain object captions that zero-shot prompts resemble."""
    rng = _rng(seed, split, index)
    if rng.random() < SINGLE_OBJECT_RATE:
        scene = sample_scene(rng, 1)
        caption = scene.objects[0].phrase()
    else:
        scene = sample_scene(rng, 2)
        caption = structured_caption(*oriented(scene, rng))
    negatives, types = hard_negatives(seed, f"{split}/{index}", caption, num_negatives) if num_negatives else ([], [])
    return {"scene": scene, "caption": caption, "negatives": negatives, "types": types}


def eval_record(seed: int, kind: str, index: int) -> dict:
    """A held-out two-object scene with its caption and one negative of `kind`."""
    rng = _rng(seed, f"eval-{kind}", index)
    scene = sample_scene(rng, 2)
    caption = structured_caption(*oriented(scene, rng))
    return {"scene": scene, "caption": caption, "negative_caption": RuleBackend(seed, LEXICON)(kind, caption)}


# ---------------------------------------------------------------- writers


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _records(split: str, seed: int, start: int, stop: int, num_negatives: int):
    """The samples start..stop-1 of `split` in the shard schema: key, JPEG bytes, caption, negatives, types."""
    for index in range(start, stop):
        if split == "pretrain":
            (image, caption), negatives, types = pretrain_sample(seed, index), [], []
        else:
            record = finetune_record(seed, index, num_negatives)
            image, caption, negatives, types = render(record["scene"]), record["caption"], record["negatives"], record["types"]
        yield {"key": f"{split}{index:08d}", "jpg": _jpeg(image), "caption": caption, "negatives": negatives, "types": types}


def _write_shard(job: tuple) -> int:
    path, fmt, split, seed, start, stop, num_negatives = job
    records = _records(split, seed, start, stop, num_negatives)
    if fmt == "mds":
        from degla_scale.data.mds import write_mds

        return write_mds(path, records)
    from degla_scale.data.reader import write_wds

    return write_wds(path, records)


def write_shards(out_dir: Path, split: str, seed: int, num_samples: int, num_negatives: int,
                 shard_size: int, workers: int = 2, fmt: str = "wds") -> dict:
    """Write `split` as webdataset (.tar) or MDS shards (one folder per job, merged index.json) plus a
    manifest.json (format, sample count, K and the fewest negatives a sample holds, shard names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        stop = min(start + shard_size, num_samples)
        name = f"{split}-{shard:06d}" + (".tar" if fmt == "wds" else "")
        jobs.append((out_dir / name, fmt, split, seed, start, stop, num_negatives))
    from tqdm import tqdm

    with Pool(workers) as pool:
        written = sum(tqdm(pool.imap_unordered(_write_shard, jobs), total=len(jobs), desc=f"{split} shards", leave=False))
    if fmt == "mds":
        from streaming.base.util import merge_index

        merge_index(str(out_dir), keep_local=True)
    manifest = {
        "format": fmt,
        "num_samples": written,
        "num_negatives": num_negatives,
        "min_negatives": num_negatives,  # every sample holds exactly K
        "negative_types": list(NEGATIVE_TYPES) if num_negatives else [],
        "shards": [job[0].name for job in jobs],
        "seed": seed,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def write_sugarcrepe(out_dir: Path, seed: int, per_type: int) -> dict[str, int]:
    """One SugarCrepe-format file per negative type: {id: {filename, caption, negative_caption}}."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for kind in NEGATIVE_TYPES:
        records = {}
        for i in range(per_type):
            record = eval_record(seed, kind, i)
            filename = f"{kind}_{i:06d}.jpg"
            render(record["scene"]).save(image_dir / filename, quality=95)
            records[str(i)] = {"filename": filename, "caption": record["caption"],
                               "negative_caption": record["negative_caption"]}
        (out_dir / f"{kind}.json").write_text(json.dumps(records, indent=1))
        counts[kind] = len(records)
    return counts


ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "an image of a {c}.")  # CLIP_benchmark's placeholder


def write_zeroshot(out_dir: Path, seed: int, per_class: int) -> list[str]:
    """Single-object images in torchvision ImageFolder layout; classes are colour + shape."""
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for name in classes:
        colour, shape = name.split()
        folder = out_dir / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = _rng(seed, f"zeroshot-{name}", i)
            scene = sample_scene(rng, 1)
            scene = Scene((Obj(shape, colour, scene.objects[0].size),), None, scene.centres, scene.background)
            render(scene).save(folder / f"{i:05d}.jpg", quality=95)
    meta = {"classes": classes, "folders": [c.replace(" ", "_") for c in classes], "templates": list(ZEROSHOT_TEMPLATES)}
    (out_dir / "classes.json").write_text(json.dumps(meta, indent=1))
    return classes


def write_synthetic_dataset(root: Path, seed: int = 0, pretrain_samples: int = 20000, finetune_samples: int = 8000,
                            num_negatives: int = 4, eval_per_type: int = 500, zeroshot_per_class: int = 20,
                            shard_size: int = 1000, workers: int = 2, fmt: str = "wds") -> dict:
    root = Path(root)
    report = {
        "pretrain": write_shards(root / "pretrain", "pretrain", seed, pretrain_samples, 0, shard_size, workers, fmt),
        "finetune": write_shards(root / "finetune", "finetune", seed, finetune_samples, num_negatives, shard_size, workers, fmt),
        "sugarcrepe": write_sugarcrepe(root / "sugarcrepe", seed + 1, eval_per_type),
        "zeroshot_classes": len(write_zeroshot(root / "zeroshot", seed + 2, zeroshot_per_class)),
    }
    return report
