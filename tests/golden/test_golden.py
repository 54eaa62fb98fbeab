"""Golden parity: this engine vs outputs the reference code itself produced (make_golden.py).

The fixtures are tiny random weights in the reference's own formats (OpenAI CLIP state
dict + IQE-CLIP checkpoint) and the reference's scores and maps on three 8-bit PNGs,
float32 CPU. Any change of model semantics (GELU variant, align_corners, normalisation,
prompt layout, ...) moves these numbers past 1e-5.
"""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from iqe.model.preprocess import load_image
from iqe.model.reference import import_reference

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = 1e-5  # float32 on both sides; measured agreement is ~1e-6


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    for name in ("clip.pt", "iqe.pth"):
        with gzip.open(FIXTURES / f"{name}.gz", "rb") as fi, open(tmp / name, "wb") as fo:
            shutil.copyfileobj(fi, fo)
    model = import_reference(tmp / "clip.pt", tmp / "iqe.pth", [1, 2, 3, 4], FIXTURES / "config_iqm.json", 240)
    return model.eval()


def test_matches_reference_outputs(imported):
    golden = np.load(FIXTURES / "golden.npz")
    images = np.stack([load_image(FIXTURES / "images" / str(p), 240) for p in golden["paths"]])
    got = imported.score(torch.from_numpy(images))
    want = {"score_query": golden["score_query"], "score_text": golden["score_text"],
            "score": golden["score_query"] + golden["score_text"], "map": golden["map"],
            "map_smooth": golden["map_smooth"]}
    for key, ref in want.items():
        diff = np.abs(got[key].astype(np.float64) - ref.astype(np.float64))
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        assert diff.max() <= ATOL, f"{key}: max abs {diff.max():.3g} at {worst} (got {got[key][worst]}, reference {ref[worst]})"
