"""The backend registry: names, availability, the best backend here, and the torch backend's numerics."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from iqe.engine.registry import BACKENDS, BackendMissing, best_backend, get_backend, require_backend
from iqe.engine.torch_backend import TorchRunner
from iqe.errors import InputError


def test_every_backend_is_registered_under_its_name():
    assert BACKENDS == ("torch", "onnxruntime", "tensorrt")
    assert [get_backend(n).name for n in BACKENDS] == list(BACKENDS)
    assert [get_backend(n).needs_engine for n in BACKENDS] == [False, True, True]


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(InputError) as err:
        get_backend("cuda")
    assert str(err.value) == "unknown backend 'cuda'; known: torch, onnxruntime, tensorrt"


def test_missing_library_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert get_backend("onnxruntime").version() is None
    with pytest.raises(BackendMissing) as err:
        require_backend("onnxruntime")
    assert str(err.value) == ("--backend onnxruntime: onnxruntime is not installed; install it with "
                              "`pip install 'iqe-engine[onnx]'`")


def test_best_backend_falls_back_in_order(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    pytest.importorskip("onnxruntime")
    assert best_backend() == "onnxruntime"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert best_backend() == "torch"


def test_torch_fp32_runs_without_tf32_and_matches_the_model(tiny_model, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    images = torch.rand(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    with TorchRunner(tiny_model, device="cpu", precision="fp32") as runner:
        got = runner.infer(images.numpy())
        assert runner.preferred_batch() == 1
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    want = tiny_model.score(images)
    for key in ("score", "map_smooth"):
        np.testing.assert_allclose(got[key], np.asarray(want[key]), rtol=0, atol=1e-5, err_msg=key)
