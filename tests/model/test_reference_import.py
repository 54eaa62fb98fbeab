"""Import of reference-format files: round trips, load-time numerics, error messages."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from iqe.errors import InputError, WeightsError
from iqe.model.bundle import load_bundle, save_bundle
from iqe.model.reference import import_reference, resize_positional_embedding
from tests.model.reference_format import reference_state, round_clip_to_fp16_, write_reference_files

FEATS = [1, 2, 3, 4]


@pytest.fixture
def fp16_model(tiny_model):
    return round_clip_to_fp16_(tiny_model)


def _iqm_json(tmp_path, heads=2):
    path = tmp_path / "iqm.json"
    path.write_text(json.dumps({"num_attention_heads": heads, "hidden_size": 64, "num_hidden_layers": 2}))
    return path


@pytest.mark.parametrize("jit", [False, True], ids=["state_dict", "torchscript"])
def test_import_round_trip_identical_outputs(fp16_model, tmp_path, jit):
    clip, ckpt = write_reference_files(fp16_model, tmp_path, jit=jit)
    imported = import_reference(clip, ckpt, FEATS, _iqm_json(tmp_path))
    assert imported.cfg.vision == fp16_model.cfg.vision and imported.cfg.iqm == fp16_model.cfg.iqm
    images = torch.rand(2, 3, 240, 240)
    a, b = fp16_model.score(images), imported.score(images)
    for k in ("score", "score_query", "score_text", "map", "map_smooth"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # and through a bundle on disk
    bundle = save_bundle(imported, tmp_path / "bundle")
    c = load_bundle(bundle).score(images)
    np.testing.assert_array_equal(a["map"], c["map"])


def test_load_time_fp16_rounding_only_where_the_reference_rounds(tiny_model, tmp_path):
    clip, ckpt = write_reference_files(tiny_model, tmp_path, clip_dtype=torch.float32)
    imported = import_reference(clip, ckpt, FEATS, _iqm_json(tmp_path))
    src, got = tiny_model.state_dict(), imported.state_dict()
    for key in ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                "visual.transformer.resblocks.0.mlp.c_fc.bias", "visual.proj", "text.text_projection"):
        assert torch.equal(got[key], src[key].half().float()), key
        assert not torch.equal(got[key], src[key]), key
    for key in ("visual.ln_pre.weight", "visual.class_embedding", "text.token_embedding.weight",
                "text.prompt_proj.weight", "iqm.layernorm.weight", "patch_adapter.0.weight"):
        assert torch.equal(got[key], src[key]), key


def test_positional_table_resize_matches_pil(tiny_model, tmp_path):
    """336-px table (24x24+1) -> 17x17+1; PIL's antialiased bicubic is the independent truth."""
    table = torch.randn(24 * 24 + 1, 64, generator=torch.Generator().manual_seed(0)).half().float()
    clip, ckpt = write_reference_files(tiny_model, tmp_path, pos_table=table)
    got = import_reference(clip, ckpt, FEATS, _iqm_json(tmp_path)).state_dict()["visual.positional_embedding"]
    assert got.shape == (17 * 17 + 1, 64)
    assert torch.equal(got[0], table[0])
    grid = table[1:].numpy().reshape(24, 24, 64)
    expected = np.stack(
        [np.asarray(Image.fromarray(grid[:, :, c], mode="F").resize((17, 17), Image.BICUBIC)) for c in range(64)], axis=2
    ).reshape(289, 64)
    err = np.abs(got[1:].numpy() - expected).max()
    assert err < 1e-4, f"max abs diff to PIL bicubic {err:.3g}"
    # a table already at the 240-px grid is used as is
    same = tiny_model.state_dict()["visual.positional_embedding"]
    assert resize_positional_embedding(same, 17) is same


def test_missing_key_named(fp16_model, tmp_path):
    clip, ckpt = reference_state(fp16_model)
    del ckpt["iqm"]["encoder.layer.1.crossattention.attention.key.weight"]
    torch.save(clip, tmp_path / "clip.pt")
    torch.save(ckpt, tmp_path / "iqe.pth")
    with pytest.raises(WeightsError, match=r"missing keys: iqm\.encoder\.layer\.1\.crossattention\.attention\.key\.weight"):
        import_reference(tmp_path / "clip.pt", tmp_path / "iqe.pth", FEATS, _iqm_json(tmp_path))


def test_wrong_shape_names_key_and_both_shapes(fp16_model, tmp_path):
    clip, ckpt = reference_state(fp16_model)
    ckpt["New_Lan_Embed"]["prompt_linear1.fc.bias"] = torch.zeros(3)
    torch.save(clip, tmp_path / "clip.pt")
    torch.save(ckpt, tmp_path / "iqe.pth")
    with pytest.raises(WeightsError, match=r"cpt\.fc\.bias: expected \[2\], got \[3\]"):
        import_reference(tmp_path / "clip.pt", tmp_path / "iqe.pth", FEATS, _iqm_json(tmp_path))


def test_unexpected_key_and_bad_files(fp16_model, tmp_path):
    clip, ckpt = reference_state(fp16_model)
    ckpt["mystery_prompt_gate"] = torch.zeros(2)
    torch.save(clip, tmp_path / "clip.pt")
    torch.save(ckpt, tmp_path / "iqe.pth")
    with pytest.raises(WeightsError, match="unexpected keys: checkpoint:mystery_prompt_gate"):
        import_reference(tmp_path / "clip.pt", tmp_path / "iqe.pth", FEATS, _iqm_json(tmp_path))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt: neither a TorchScript archive nor a torch state dict"):
        import_reference(tmp_path / "junk.pt", tmp_path / "iqe.pth", FEATS)
    with pytest.raises(WeightsError, match="4 patch adapters .* lists 3 layers"):
        import_reference(tmp_path / "clip.pt", tmp_path / "iqe.pth", [1, 2, 3])
    with pytest.raises(InputError, match="missing entries: iqm"):
        del ckpt["iqm"]
        torch.save(ckpt, tmp_path / "bad.pth")
        import_reference(tmp_path / "clip.pt", tmp_path / "bad.pth", FEATS)


def test_bundle_bytes_are_deterministic(tiny_model, tmp_path):
    """Engine caches key on the bundle's bytes: saving the same weights twice must give the same file."""
    a = save_bundle(tiny_model, tmp_path / "a") / "model.safetensors"
    b = save_bundle(tiny_model, tmp_path / "b") / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
