"""Model building: parameter counts on the meta device, the 1-dim clamped logit scale, one root forward."""
import math
from pathlib import Path

import open_clip
import pytest
import torch

from degla_scale.config import ConfigError, ModelConfig, load_config
from degla_scale.models import build_model, count_parameters_meta

ROOT = Path(__file__).resolve().parents[1]

# Published totals (open_clip's model profile table, in millions of parameters).
PUBLISHED_MILLIONS = {"ViT-B-32": 151.28, "ViT-L-14": 427.62, "ViT-H-14": 986.11, "ViT-bigG-14": 2539.57}


@pytest.mark.parametrize("config", ["vitb32", "vitl14", "vith14", "vitbigg14"])
def test_config_models_on_meta_device(config):
    cfg = load_config(ROOT / f"configs/{config}.yaml")
    assert (cfg.model.name, cfg.model.pretrained) in open_clip.list_pretrained()
    count = count_parameters_meta(cfg.model)
    assert count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[cfg.model.name], abs=0.01)


def test_tiny_model_forward_shapes_and_scale():
    model = build_model(ModelConfig("degla-tiny"))
    assert model.clip.logit_scale.shape == (1,)
    b, K = 3, 2
    images = torch.randn(b, 3, 32, 32)
    tokens = open_clip.get_tokenizer("degla-tiny")(["a red circle"] * (b * (1 + K)))
    img, txt, scale = model(images, tokens)
    assert img.shape == (b, 64) and txt.shape == (b * (1 + K), 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(b))
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(1000.0))
    _, _, scale = model(images, tokens)
    assert scale.item() == pytest.approx(100.0)
    scale.sum().backward()
    assert model.clip.logit_scale.grad.abs().item() == 0.0  # clamped: no gradient pushes it further


def test_pretrained_local_file_round_trip(tmp_path):
    model = build_model(ModelConfig("degla-tiny"))
    path = tmp_path / "tiny.pt"
    state = model.open_clip_state_dict()
    assert state["logit_scale"].ndim == 0  # open_clip's own layout
    torch.save(state, path)
    again = build_model(ModelConfig("degla-tiny", pretrained=str(path)))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_unknown_model_and_tag():
    with pytest.raises(ConfigError, match="ViT-B-3"):
        build_model(ModelConfig("ViT-B-3"))
    with pytest.raises(ConfigError, match="'missing.pt': no such file"):
        build_model(ModelConfig("degla-tiny", pretrained="missing.pt"))
    with pytest.raises(ConfigError, match="not an open_clip tag of degla-tiny"):
        build_model(ModelConfig("degla-tiny", pretrained="openai"))
