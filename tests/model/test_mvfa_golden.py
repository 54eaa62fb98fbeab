"""MVFA against the reference code's own outputs (tests/golden/mvfa, made by make_golden.py).

The fixtures are tiny random weights in MVFA's formats (OpenAI CLIP state dict, adapter
checkpoint), 8-bit PNGs and the raw outputs that the reference's test_zero.py / test_few.py
computed from them (fp32, CPU). Any semantic drift of import, text features, adapters,
heads, augmentation or memory bank moves these numbers by far more than 1e-4.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iqe.model.bank import bank_features, with_bank
from iqe.model.mvfa import import_mvfa
from iqe.model.preprocess import load_image

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "mvfa"
META = json.loads((GOLDEN / "fixtures.json").read_text())
ROWS = np.array(META["map_rows"])
TOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / "reference_outputs.npz"))


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip_tiny.pt"
    path.write_bytes(gzip.decompress((GOLDEN / "clip_tiny.pt.gz").read_bytes()))
    return path


def _images(folder: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([load_image(GOLDEN / folder / n, 240) for n in META[folder]]))


def _sample(maps: np.ndarray) -> np.ndarray:
    return maps[:, ROWS][:, :, ROWS]


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("organ", ["Brain", "Chest"])
def test_torch_matches_reference(organ, clip_file, reference):
    model = import_mvfa(clip_file, GOLDEN / f"{organ}.pth", organ, features=META["features"])
    assert model.cfg.segmentation == (organ == "Brain")
    model = with_bank(model, bank_features(model, _images("support")), [GOLDEN / "support" / n for n in META["support"]],
                      META["shots"])
    assert model.bank.shape == (4, 11 * META["shots"] * 290, 64)  # 11x augmentation, all tokens incl. CLS
    with torch.no_grad():
        out = {k: v.numpy() for k, v in model.heads(*model.encode(_images("test"))).items()}
    assert _max_abs(out["score_zero"], reference[f"{organ}/score_zero"]) < TOL
    assert _max_abs(_sample(out["map_zero"]), reference[f"{organ}/map_zero"]) < TOL
    assert _max_abs(_sample(out["map_few"]), reference[f"{organ}/map_few"]) < TOL
    if organ == "Chest":
        assert _max_abs(out["score_few"], reference["Chest/score_few"]) < TOL


def _cli(*args: str) -> int:
    """The CLI in-process (each subprocess would pay torch's import again)."""
    from iqe.cli import main

    return main(list(args))


@pytest.mark.slow
def test_cli_import_bank_score_onnxruntime(clip_file, reference, tmp_path):
    """The user's path: import-reference --family mvfa, bank, score on ONNX Runtime fp32 and torch."""
    bundle = tmp_path / "brain"
    r = _cli("import-reference", "--family", "mvfa", "--clip", str(clip_file), "--checkpoint", str(GOLDEN / "Brain.pth"),
             "--organ", "Brain", "--features", "1,2,3,4", "--out", str(bundle), "--quiet")
    assert r == 0
    r = _cli("bank", str(bundle), "--support", str(GOLDEN / "support"), "--shots", str(META["shots"]), "--quiet")
    assert r == 0
    config = json.loads((bundle / "config.json").read_text())
    assert config["family"] == "mvfa" and [s["file"] for s in config["bank"]["support"]] == META["support"]
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / backend
        r = _cli("score", "--model", str(bundle), str(GOLDEN / "test"), "--out", str(out), "--save-maps",
                 "--backend", backend, "--engine", str(tmp_path / "engine"), "--quiet")
        assert r == 0
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert [Path(row["path"]).name for row in rows] == META["test"]
        per_item = [np.load(out / row["maps"]) for row in rows]  # iqe score streams maps/NNNNNN.npz per item
        maps = {k: np.stack([m[k] for m in per_item]) for k in ("map", "map_zero", "map_few")}
        assert _max_abs([row["score_zero"] for row in rows], reference["Brain/score_zero"]) < TOL, backend
        assert _max_abs(_sample(maps["map_zero"]), reference["Brain/map_zero"]) < TOL, backend
        assert _max_abs(_sample(maps["map_few"]), reference["Brain/map_few"]) < TOL, backend
        # identity fusion constants (no --calibrate): map = 0.5 map_zero + 0.5 map_few, score = its max
        np.testing.assert_allclose(maps["map"], 0.5 * maps["map_zero"] + 0.5 * maps["map_few"], atol=1e-6)
        np.testing.assert_allclose([row["score"] for row in rows], maps["map"].reshape(3, -1).max(axis=1), atol=1e-6)
