"""SugarCrepe-format evaluation: strict inequality (ties are wrong), file format, missing files."""
import json

import pytest
import torch
from PIL import Image

from degla_scale.eval.sugarcrepe import evaluate_sugarcrepe, pairwise_accuracy
from degla_scale.eval.zeroshot import evaluate_zeroshot


def test_pairwise_accuracy_is_strict():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    # row 0: 1 > 0 right; row 1: tie → wrong; row 2: right; row 3: 0 < 1 wrong
    assert pairwise_accuracy(img, pos, neg) == 50.0


class ColourModel(torch.nn.Module):
    """Embeds an image by its mean red/green and a caption by the colour words it contains."""

    class Clip(torch.nn.Module):
        def encode_image(self, pixels, normalize=True):
            v = torch.stack([pixels[:, 0].mean((1, 2)), pixels[:, 1].mean((1, 2))], 1)
            return v / v.norm(dim=-1, keepdim=True)

        def encode_text(self, tokens, normalize=True):
            v = tokens.float()
            return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def __init__(self):
        super().__init__()
        self.clip = self.Clip()


def tokenize(texts):
    return torch.tensor([[float("red" in t) + 1e-3, float("green" in t) + 1e-3] for t in texts])


def to_tensor(image):
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image).float() / 255


def test_evaluate_sugarcrepe_on_fabricated_files(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "images/red.png")
    Image.new("RGB", (4, 4), (0, 255, 0)).save(tmp_path / "images/green.png")
    records = {
        "0": {"filename": "red.png", "caption": "a red one", "negative_caption": "a green one"},      # right
        "1": {"filename": "green.png", "caption": "a red one", "negative_caption": "a green one"},    # wrong
        "2": {"filename": "green.png", "caption": "a green one", "negative_caption": "a green one"},  # tie: wrong
        "3": {"filename": "green.png", "caption": "a green one", "negative_caption": "a red one"},    # right
    }
    (tmp_path / "swap_att.json").write_text(json.dumps(records))
    result = evaluate_sugarcrepe(ColourModel(), to_tensor, tokenize, tmp_path, ["swap_att"], 3, "cpu")
    assert result == {"swap_att": 50.0}
    with pytest.raises(FileNotFoundError, match="replace_obj.json"):
        evaluate_sugarcrepe(ColourModel(), to_tensor, tokenize, tmp_path, ["replace_obj"], 3, "cpu")
    (tmp_path / "images/red.png").unlink()
    with pytest.raises(FileNotFoundError, match="red.png"):
        evaluate_sugarcrepe(ColourModel(), to_tensor, tokenize, tmp_path, ["swap_att"], 3, "cpu")


def test_zeroshot_on_fabricated_folder(tmp_path):
    for folder, colour in (("red_thing", (255, 0, 0)), ("green_thing", (0, 255, 0))):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.new("RGB", (4, 4), colour).save(tmp_path / folder / f"{i}.jpg")
    meta = {"classes": ["red", "green"], "folders": ["red_thing", "green_thing"], "templates": ["a {} one"]}
    (tmp_path / "classes.json").write_text(json.dumps(meta))
    result = evaluate_zeroshot(ColourModel(), to_tensor, tokenize, tmp_path, 4, "cpu")
    assert result["acc1"] == 100.0 and result["acc5"] == 100.0
    meta["folders"] = ["green_thing", "red_thing"]  # labels swapped → every prediction wrong
    (tmp_path / "classes.json").write_text(json.dumps(meta))
    assert evaluate_zeroshot(ColourModel(), to_tensor, tokenize, tmp_path, 4, "cpu")["acc1"] == 0.0
