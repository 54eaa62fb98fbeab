"""MVFA family: tokenizer, registry and bundles, chunked 1-NN, ONNX export, bank CLI, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iqe.errors import InputError
from iqe.model.bundle import load_bundle, save_bundle
from iqe.model.config import IQEConfig, VisionConfig
from iqe.model.families import config_from_dict, create_model, get_family, list_families
from iqe.model.mvfa import MVFAConfig, MVFAModel, nearest_distance, normalize_rows
from iqe.model.tokenizer import default_tokenizer
from tests.conftest import randomize_


def tiny_mvfa(bank_rows: int = 0, segmentation: bool = True, chunk_rows: int = 4096) -> MVFAModel:
    cfg = MVFAConfig(name="tiny", embed_dim=64, vision=VisionConfig(width=64, layers=4, patch_size=14),
                     features=[1, 2, 3, 4], segmentation=segmentation, chunk_rows=chunk_rows,
                     bank={"rows": bank_rows, "shots": 1, "head": "seg", "support": []} if bank_rows else None)
    model = randomize_(MVFAModel(cfg), seed=3)
    with torch.no_grad():
        model.text_features.copy_(normalize_rows(torch.randn(2, 64, generator=torch.Generator().manual_seed(4))).T)
        if bank_rows:
            model.bank.copy_(torch.randn(4, bank_rows, 64, generator=torch.Generator().manual_seed(5)))
    return model.eval()


# Ids printed by the reference's CLIP/tokenizer.py for these sentences (also in MVFA.md §2).
@pytest.mark.parametrize("text, ids", [
    ("a bad photo of a Brain.", [320, 2103, 1125, 539, 320, 4812, 269]),
    ("a bad photo of a damaged Brain.", [320, 2103, 1125, 539, 320, 13568, 4812, 269]),
    ("a bad photo of a retinal OCT.", [320, 2103, 1125, 539, 320, 31270, 566, 4565, 269]),
    ("a bad photo of a Chest X-ray film.", [320, 2103, 1125, 539, 320, 10563, 343, 268, 3077, 1860, 269]),
    ("a bad photo of a histopathological image.", [320, 2103, 1125, 539, 320, 677, 6005, 64, 1325, 4791, 2867, 269]),
])
def test_tokenizer_matches_reference_ids(text, ids):
    row = default_tokenizer().tokenize([text])[0]
    assert row[: len(ids) + 2] == [49406, *ids, 49407] and set(row[len(ids) + 2:]) == {0} and len(row) == 77


def test_tokenizer_too_long_is_an_error():
    with pytest.raises(InputError, match=r"has 79 tokens, more than the context length 77"):
        default_tokenizer().tokenize(["a " * 77])


def test_registry_dispatch_and_errors():
    assert {"iqe-clip", "mvfa"} <= set(list_families())
    assert isinstance(config_from_dict({"name": "x"}), IQEConfig)  # no family key: iqe-clip
    assert isinstance(config_from_dict(tiny_mvfa().cfg.to_dict()), MVFAConfig)
    with pytest.raises(InputError, match=r"^unknown model family 'clip-x'; known families: iqe-clip, mvfa"):
        get_family("clip-x")
    with pytest.raises(InputError, match=r"config: unknown key\(s\) \['quick_gelu'\]"):
        config_from_dict({"family": "mvfa", "quick_gelu": True})


def test_mvfa_bundle_round_trip(tmp_path):
    model = tiny_mvfa(bank_rows=300)
    bundle = save_bundle(model, tmp_path / "b")
    assert json.loads((bundle / "config.json").read_text())["family"] == "mvfa"
    loaded = load_bundle(bundle)
    assert type(loaded) is MVFAModel and type(create_model(loaded.cfg)) is MVFAModel
    images = torch.rand(2, 3, 240, 240)
    a, b = model.score(images), loaded.score(images)
    assert set(a) == set(model.output_names())
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_nearest_distance_chunked_equals_brute_force(chunk):
    g = np.random.default_rng(0)
    tokens, bank = g.normal(size=(2, 9, 16)), g.normal(size=(50, 16))
    bank[3] = 0  # a zero row: the eps clamp keeps it finite (cos 0, distance 1)
    want = np.empty((2, 9))
    for b in range(2):
        for i in range(9):
            t = tokens[b, i] / np.linalg.norm(tokens[b, i])
            cos = [r @ t / max(np.linalg.norm(r), 1e-8) for r in bank]
            want[b, i] = min(1 - c for c in cos)
    unit = normalize_rows(torch.tensor(bank, dtype=torch.float32), 1e-8)
    got = nearest_distance(torch.tensor(tokens, dtype=torch.float32), unit, chunk).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_fusion_with_constants():
    model = tiny_mvfa(bank_rows=40)
    model.cfg.fusion_zero, model.cfg.fusion_few = [1.0, 3.0], [0.1, 0.5]
    raw = {k: v.detach() for k, v in model.heads(*model.encode(torch.rand(1, 3, 240, 240))).items()}
    out = model.fuse(raw)
    want = 0.5 * (raw["map_zero"] - 1) / 2 + 0.5 * (raw["map_few"] - 0.1) / 0.4
    torch.testing.assert_close(out["map"], want)
    assert float(out["score"]) == float(want.max()) == float(out["map_max"])
    model.cfg.segmentation = False
    out = model.fuse(raw)
    torch.testing.assert_close(out["score"], 0.5 * (raw["score_zero"] - 1) / 2 + 0.5 * (raw["score_few"] - 0.1) / 0.4)


@pytest.mark.slow
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", 1e-1)])
def test_onnx_export_matmul_reducemin_chunks(tmp_path, precision, atol):
    import onnx
    import onnxruntime as ort

    from iqe.export.onnx_export import export_model

    model = tiny_mvfa(bank_rows=600, chunk_rows=256)  # 3 chunks per level
    info = export_model(model, tmp_path, precision, graphs=("fused",), progress=False, calib_images=8)
    graph = onnx.load(str(tmp_path / info.graphs["fused"].file)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("ReduceMin") == 4 * 3 and ops.count("MatMul") >= 4 * 3
    images = torch.rand(3, 3, 240, 240)
    sess = ort.InferenceSession(str(tmp_path / info.graphs["fused"].file), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": images.numpy()})))
    want = model.score(images)  # the fp32 torch model, independent of the graph wrapper
    for k in ("score_zero", "map_zero", "map_few", "score"):
        assert np.abs(got[k] - want[k]).max() < atol, (k, np.abs(got[k] - want[k]).max())


def test_bank_cli_errors(tmp_path, tiny_model, capsys):
    from iqe.cli import main

    save_bundle(tiny_model, tmp_path / "iqe")
    (tmp_path / "support").mkdir()
    assert main(["bank", str(tmp_path / "iqe"), "--support", str(tmp_path / "support"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "`iqe bank` is for MVFA bundles (this one is iqe-clip)")
    save_bundle(tiny_mvfa(), tmp_path / "mvfa")
    from PIL import Image

    Image.new("L", (32, 32), 90).save(tmp_path / "support" / "one.png")
    assert main(["bank", str(tmp_path / "mvfa"), "--support", str(tmp_path / "support"), "--shots", "2",
                 "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"iqe bank: error: {tmp_path / 'support'}: 2 shots asked for, 1 image(s) found"


def test_fit_fusion_takes_branch_ranges():
    from iqe.model.bank import fit_fusion

    model = tiny_mvfa(bank_rows=40)
    images = torch.rand(3, 3, 240, 240)
    fitted = fit_fusion(model, images, "test", batch=2)
    with torch.no_grad():
        raw = model.heads(*model.encode(images))
    assert fitted.cfg.fusion_zero == [float(raw["map_zero"].min()), float(raw["map_zero"].max())]
    assert fitted.cfg.fusion_few == [float(raw["map_few"].min()), float(raw["map_few"].max())]


@pytest.mark.slow
def test_few_shot_training_recipe(tmp_path):
    from iqe.model.mvfa_train import MVFATrainOptions, train_mvfa
    from iqe.model.synth import write_synthetic_bmad

    root = write_synthetic_bmad(tmp_path / "data", objects=["Brain"], n_per_class={"train": 1, "valid": 3, "test": 1},
                                size=64)
    model = tiny_mvfa()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = train_mvfa(model, MVFATrainOptions(str(root), "Brain", shots=1, epochs=1, max_steps_per_epoch=3),
                         tmp_path / "out", progress=False)
    after = load_bundle(tmp_path / "out")
    assert after.cfg.bank["rows"] == 11 * 290 and after.cfg.fusion_source.startswith("validation split (4 images)")
    state = after.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items() if k.startswith("visual."))  # CLIP frozen
    assert not torch.equal(state["seg_adapters.0.fc1.0.weight"], before["seg_adapters.0.fc1.0.weight"])
    assert not torch.equal(state["det_adapters.0.fc1.0.weight"], before["det_adapters.0.fc1.0.weight"])
    assert summary["best_epoch"] == 1 and "image_auc" in summary["validation"]
