"""SugarCrepe: strict inequality (ties are wrong), group averages over the 7 released subsets, missing files;
and `ModelEncoder`'s batching and de-duplication, on a model whose embeddings are known."""
import json

import pytest
import torch
from PIL import Image

from degla_scale.eval.common import EvalDataError, ImageRef, ModelEncoder, pairwise_correct
from degla_scale.eval.sugarcrepe import SUBSETS, evaluate_sugarcrepe


def test_pairwise_correct_is_strict():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    # row 0: 1 > 0 right; row 1: tie → wrong; row 2: right; row 3: 0 < 1 wrong
    assert pairwise_correct(img, pos, neg).tolist() == [True, False, True, False]


class ColourClip(torch.nn.Module):
    """Embeds an image by its mean red/green and a caption by the colour words it contains; counts calls."""

    def __init__(self):
        super().__init__()
        self.image_rows = 0

    def encode_image(self, pixels, normalize=True):
        self.image_rows += len(pixels)
        v = torch.stack([pixels[:, 0].mean((1, 2)), pixels[:, 1].mean((1, 2))], 1)
        return v / v.norm(dim=-1, keepdim=True)

    def encode_text(self, tokens, normalize=True):
        return tokens / tokens.norm(dim=-1, keepdim=True)


def tokenize(texts):
    return torch.tensor([[float("red" in t) + 1e-3, float("green" in t) + 1e-3] for t in texts])


def to_tensor(image):
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image).float() / 255


RIGHT_RED = {"filename": "red.png", "caption": "a red one", "negative_caption": "a green one"}
WRONG = {"filename": "green.png", "caption": "a red one", "negative_caption": "a green one"}
TIE = {"filename": "green.png", "caption": "a green one", "negative_caption": "the green one"}
RIGHT_GREEN = {"filename": "green.png", "caption": "a green one", "negative_caption": "a red one"}


def write_subsets(root, rows_per_subset):
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "images/red.png")
    Image.new("RGB", (4, 4), (0, 255, 0)).save(root / "images/green.png")
    for name, rows in rows_per_subset.items():
        (root / f"{name}.json").write_text(json.dumps({str(i): r for i, r in enumerate(rows)}))


def test_sugarcrepe_subsets_groups_and_ties(tmp_path):
    rows = {  # accuracy by hand: 50, 100, 0 | 25, 75 | 100, 50
        "replace_obj": [RIGHT_RED, WRONG], "replace_att": [RIGHT_GREEN], "replace_rel": [TIE, WRONG],
        "swap_obj": [RIGHT_RED, WRONG, TIE, WRONG], "swap_att": [RIGHT_RED, RIGHT_GREEN, TIE, RIGHT_RED],
        "add_obj": [RIGHT_GREEN], "add_att": [TIE, RIGHT_RED],
    }
    write_subsets(tmp_path, rows)
    clip = ColourClip()
    result = evaluate_sugarcrepe(ModelEncoder(clip, to_tensor, tokenize, batch_size=3), tmp_path)
    want = {"replace_obj": 50.0, "replace_att": 100.0, "replace_rel": 0.0, "swap_obj": 25.0, "swap_att": 75.0,
            "add_obj": 100.0, "add_att": 50.0}
    assert {k: result[k] for k in SUBSETS} == pytest.approx(want)
    assert result["replace"] == pytest.approx(50.0) and result["swap"] == pytest.approx(50.0)
    assert result["add"] == pytest.approx(75.0) and result["average"] == pytest.approx(400 / 7)
    assert clip.image_rows == 2, "each distinct image is embedded once"


def test_sugarcrepe_missing_files_name_the_path(tmp_path):
    write_subsets(tmp_path, {"swap_att": [RIGHT_RED]})
    with pytest.raises(EvalDataError, match="replace_obj.json"):
        evaluate_sugarcrepe(ModelEncoder(ColourClip(), to_tensor, tokenize), tmp_path, ["swap_att", "replace_obj"])
    (tmp_path / "images/red.png").unlink()
    with pytest.raises(EvalDataError, match="red.png"):
        evaluate_sugarcrepe(ModelEncoder(ColourClip(), to_tensor, tokenize), tmp_path, ["swap_att"])


def test_image_ref_crops_to_its_box(tmp_path):
    image = Image.new("RGB", (10, 10), (0, 0, 0))
    image.paste((255, 0, 0), (6, 2, 9, 5))
    image.save(tmp_path / "x.png")
    crop = ImageRef(tmp_path / "x.png", box=(6, 2, 3, 3)).load()
    assert crop.size == (3, 3) and crop.getcolors() == [(9, (255, 0, 0))]


def test_model_encoder_embeds_only_its_share_and_gathers_the_rest(monkeypatch):
    # 5 distinct texts over 2 ranks: shares of ceil(5/2) = 3, rank 1 embedding texts 3, 4 and 4 again (its pad);
    # the all_gather is played by a stand-in that fills rank 0's share as rank 0 would have embedded it.
    import torch.distributed as dist

    texts = ["red 0", "green 1", "red 2", "green 3", "red 4", "red 0"]
    distinct = texts[:5]
    seen = []

    class RecordingClip(ColourClip):
        def encode_text(self, tokens, normalize=True):
            seen.append(tokens.clone())
            return super().encode_text(tokens)

    def all_gather(shares, local):
        shares[0].copy_(ColourClip().encode_text(tokenize(distinct[:3])))
        shares[1].copy_(local)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    enc = ModelEncoder(RecordingClip(), to_tensor, tokenize, batch_size=2, share=(1, 2))
    out = enc.texts(texts)
    assert torch.equal(torch.cat(seen), tokenize(["green 3", "red 4", "red 4"]))  # its share only, in 2 batches
    assert len(seen) == 2
    assert torch.allclose(out, ColourClip().encode_text(tokenize(texts)))  # every text, in the input order
