import json

import pytest

from iqe.errors import InputError
from iqe.model.config import IQEConfig, list_presets, load_config


def test_presets_paper_defaults():
    cfg = load_config("vit-l-14-336")
    assert (cfg.image_size, cfg.grid, cfg.vision.width, cfg.vision.layers, cfg.vision_heads) == (240, 17, 1024, 24, 16)
    assert (cfg.features, cfg.prompt_len, cfg.deep_prompt_len, cfg.deep_prompt_layers) == ([6, 12, 18, 24], 2, 1, 11)
    assert (cfg.iqm.hidden_size, cfg.iqm.num_attention_heads, cfg.iqm.num_hidden_layers) == (768, 8, 4)
    assert cfg.end_position == 12 and cfg.text_heads == 12
    assert {"tiny", "vit-l-14-336"} <= set(list_presets())


def test_json_round_trip(tmp_path):
    cfg = load_config("tiny")
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    again = load_config(str(path))
    assert again == cfg and again.digest() == cfg.digest()
    assert again.digest() != load_config("vit-l-14-336").digest()


def test_unknown_preset_lists_known():
    with pytest.raises(InputError, match="unknown model preset 'vit-b'.*tiny"):
        load_config("vit-b")


def test_path_is_never_matched_to_a_preset(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        load_config(str(tmp_path / "tiny.json"))


def test_unknown_key_and_invariants(tmp_path):
    with pytest.raises(InputError, match=r"unknown key\(s\) \['vison'\]"):
        IQEConfig.from_dict({"vison": {}})
    with pytest.raises(InputError, match="deep_prompt_layers"):
        IQEConfig.from_dict({"deep_prompt_layers": 3})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"features": [30]}))
    with pytest.raises(InputError, match="features"):
        load_config(bad)
