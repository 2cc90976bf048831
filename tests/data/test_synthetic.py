"""Synthetic data: every negative is false for its image (checked by an independent caption reader)."""
import json
import re

import pytest

from degla_scale.data import synthetic as S

PHRASE = r"a (?:(small|large) )?(\w+) (\w+)"
RELATIONS = ("left of", "right of", "above", "below")


def parse(caption):
    """'a small red circle left of a large blue square' → [(size, colour, shape), ...], relation."""
    for rel in RELATIONS:
        m = re.fullmatch(f"{PHRASE} {rel} {PHRASE}", caption)
        if m:
            g = m.groups()
            return [g[:3], g[3:]], rel
    m = re.fullmatch(PHRASE, caption)
    assert m, caption
    return [m.groups()], None


def holds(caption, scene):
    """Is the caption true of the scene? Objects must exist with those attributes, in that relation."""
    phrases, rel = parse(caption)
    found = []
    for size, colour, shape in phrases:
        match = [i for i, o in enumerate(scene.objects)
                 if o.colour == colour and o.shape == shape and (size is None or o.size == size)]
        if not match:
            return False
        found.append(match[0])
    if rel is None:
        return True
    (xa, ya), (xb, yb) = scene.centres[found[0]], scene.centres[found[1]]
    return {"left of": xa < xb, "right of": xa > xb, "above": ya < yb, "below": ya > yb}[rel]


@pytest.mark.parametrize("index", range(300))
def test_finetune_negatives_false_positive_true(index):
    record = S.finetune_record(seed=5, index=index, num_negatives=4)
    scene = record["scene"]
    assert holds(record["caption"], scene)
    assert len(record["negatives"]) == len(record["types"]) == 4
    for neg, kind in zip(record["negatives"], record["types"]):
        assert neg != record["caption"] and not holds(neg, scene), (kind, record["caption"], neg)
    if len(scene.objects) == 2:
        assert len(set(record["types"])) == 4  # distinct types when all five apply


@pytest.mark.parametrize("kind", S.NEGATIVE_TYPES)
def test_eval_negatives_of_each_type(kind):
    for i in range(60):
        record = S.eval_record(1, kind, i)
        assert holds(record["caption"], record["scene"])
        assert not holds(record["negative_caption"], record["scene"])
        if kind in ("reshuffle", "swap_noun", "swap_adj"):  # same words, different binding
            assert sorted(record["negative_caption"].split()) == sorted(record["caption"].split())


def test_rendered_colours_match_scene():
    for i in range(20):
        scene = S.finetune_record(0, i, 2)["scene"]
        image = S.render(scene)
        for obj, (x, y) in zip(scene.objects, scene.centres):
            pixel = image.getpixel((int(x * S.IMAGE_SIZE), int(y * S.IMAGE_SIZE)))
            if obj.shape != "star":  # a star's centre is inside it, but keep the check to solid shapes
                assert pixel == S.COLOURS[obj.colour]


def test_deterministic_by_seed():
    a, b, c = S.finetune_record(3, 7, 4), S.finetune_record(3, 7, 4), S.finetune_record(4, 7, 4)
    assert a == b and a != c
    assert S.render(a["scene"]).tobytes() == S.render(b["scene"]).tobytes()


def test_pretrain_captions_rarely_bind():
    """Most two-object pre-training captions list shapes and colours apart (no binding to learn)."""
    captions = [S.pretrain_sample(0, i)[1] for i in range(2000)]
    unbound = [c for c in captions if "," in c]
    assert 0.55 < len(unbound) / len(captions) < 0.75


def test_written_dataset(tmp_path):
    report = S.write_synthetic_dataset(tmp_path, pretrain_samples=20, finetune_samples=12, num_negatives=3,
                                       eval_per_type=4, zeroshot_per_class=2, shard_size=5, workers=1)
    assert report["finetune"]["num_negatives"] == 3 and len(report["finetune"]["shards"]) == 3
    manifest = json.loads((tmp_path / "finetune/manifest.json").read_text())
    assert manifest["num_samples"] == 12
    for kind in S.NEGATIVE_TYPES:
        records = json.loads((tmp_path / f"sugarcrepe/{kind}.json").read_text())
        assert len(records) == 4
        assert set(records["0"]) == {"filename", "caption", "negative_caption"}
        assert (tmp_path / "sugarcrepe/images" / records["0"]["filename"]).is_file()
    classes = json.loads((tmp_path / "zeroshot/classes.json").read_text())
    assert len(classes["classes"]) == len(S.COLOURS) * len(S.SHAPES)
