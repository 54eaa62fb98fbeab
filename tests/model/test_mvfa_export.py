"""MVFA export through the fidelity-gated FP16 policy (the same sweep and gate as IQE-CLIP).

Small models (112 px, 2 blocks of width 64) so a whole sweep takes seconds. The truth is
the float32 PyTorch model (`MVFAModel.score`) on fresh images, and the FP16 failure modes
are built into the weights: attention sharpened 300x (FP16 rounding of q/k then moves
the attention, as in tests/export/stress.py) or GEMM inputs scaled past FP16's range.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iqe.model.config import VisionConfig
from iqe.model.mvfa import MVFAConfig, MVFAModel, normalize_rows
from tests.conftest import randomize_

pytest.importorskip("onnxruntime")

CALIB = 8  # calibration images per sweep / gate here (the CLI default for fp16 is 64)
WIDTH = 64


def small_mvfa(layers: int = 2, bank_rows: int = 40, segmentation: bool = True) -> MVFAModel:
    """A 112-px MVFA (grid 8) with adapters after every block and a random bank."""
    cfg = MVFAConfig(name="small", image_size=112, embed_dim=32,
                     vision=VisionConfig(width=WIDTH, layers=layers, patch_size=14),
                     features=list(range(1, layers + 1)), segmentation=segmentation,
                     bank={"rows": bank_rows, "shots": 1, "head": "seg", "support": []} if bank_rows else None)
    model = randomize_(MVFAModel(cfg), seed=3)
    with torch.no_grad():
        model.text_features.copy_(normalize_rows(torch.randn(2, 32, generator=torch.Generator().manual_seed(4))).T)
        if bank_rows:
            model.bank.copy_(torch.randn(layers, bank_rows, 32, generator=torch.Generator().manual_seed(5)))
    return model.eval()


def sharpen_attention_(model: MVFAModel, block: int, scale: float = 300.0) -> MVFAModel:
    """Scale the q and k in-projections of a 1-based vision block (FP16 rounding then moves its attention)."""
    with torch.no_grad():
        attn = model.visual.transformer.resblocks[block - 1].attn
        attn.in_proj_weight[: 2 * WIDTH] *= scale
        attn.in_proj_bias[: 2 * WIDTH] *= scale
    return model


def overflow_fp16_(model: MVFAModel, scale: float = 1e5) -> MVFAModel:
    """Same float32 function, but every GEMM input of every block exceeds FP16's range (65504).

    LayerNorm outputs, values and MLP activations are scaled up by `scale` and the GEMM
    weights that consume them down by it, so float32 barely changes while a cast to FP16
    gives inf in every op class: no FP16 policy can pass.
    """
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            for ln in (block.ln_1, block.ln_2):
                ln.weight *= scale
                ln.bias *= scale
            block.attn.in_proj_weight[: 2 * WIDTH] /= scale  # q, k: same logits
            block.attn.in_proj_bias[2 * WIDTH:] *= scale  # v is `scale` x larger, the attention output too,
            block.attn.out_proj.weight /= scale  # the projection's output is not
            block.mlp.c_fc.weight /= scale
    return model


def _ort(path, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": images})))


def test_fp16_policy_keeps_the_sharp_block_passes_the_gate_and_runs_in_ort(tmp_path):
    import onnx

    from iqe.export.onnx_export import FidelityError, export_model
    from iqe.export.precision import PrecisionPolicy

    model = sharpen_attention_(small_mvfa(), block=1)
    info = export_model(model, tmp_path / "policy", "fp16", graphs=("fused",), progress=False, calib_images=CALIB)
    policy = PrecisionPolicy.from_dict(info.precision_policy)
    assert "qkv" not in policy.blocks.get(1, []) and set(policy.blocks[2]) == {"qkv", "attn_v", "out_proj", "mlp_fc",
                                                                                 "mlp_proj"}
    assert info.drift["passed"] and info.fp16_flop_fraction >= 0.5
    drift = json.loads((tmp_path / "policy" / "drift.onnxruntime.fp16.json").read_text())
    judged = {c["output"] for c in drift["checks"]}
    assert {"map", "map_zero", "map_few", "score_zero", "score_few"} <= judged  # MVFA's branches are gated too
    graph = tmp_path / "policy" / info.graphs["fused"].file
    fp16_inits = [i for i in onnx.load(str(graph)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16_inits) >= 3  # block 2's GEMM weights are FP16 in the graph
    # Fresh images: ONNX Runtime FP16 against the float32 PyTorch model, within the fp16 contract.
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(9)).numpy()
    got, want = _ort(graph, images), model.score(torch.from_numpy(images))
    for k in ("map", "map_zero", "map_few"):
        assert np.abs(got[k] - want[k]).max() < 1e-2, k
    assert np.abs(got["score_zero"] - want["score_zero"]).max() < 1e-3
    # The naive policy (every GEMM in FP16) on the same weights is refused, with the drift report.
    with pytest.raises(FidelityError) as err:
        export_model(model, tmp_path / "naive", "fp16", graphs=("fused",), progress=False, calib_images=CALIB,
                     policy=PrecisionPolicy.everything(2))
    lines = str(err.value).splitlines()
    assert lines[0] == (f"fused.fp16.onnx: onnxruntime fp16 (fused.fp16.onnx) drifts from torch fp32 past the fp16 "
                        f"contract on {CALIB} images:")
    assert any(ln.startswith("  map_zero: max abs ") for ln in lines)
    assert lines[-1] == f"  drift report: {tmp_path / 'naive' / 'drift.onnxruntime.fp16.json'}"


def test_fp16_refused_with_the_drift_report_when_no_policy_passes(tmp_path):
    from iqe.export.onnx_export import export_model
    from iqe.export.precision import PrecisionRefused

    model = small_mvfa(bank_rows=0)
    plain = model.score(torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)))
    overflow_fp16_(model)
    after = model.score(torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)))
    assert np.abs(after["map"] - plain["map"]).max() < 1e-3  # float32: the same model
    with pytest.raises(PrecisionRefused) as err:
        export_model(model, tmp_path, "fp16", graphs=("fused",), progress=False, calib_images=CALIB)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"--precision fp16 refused: no FP16 policy keeps this model within the fp16 contract "
                               f"on {CALIB} calibration images")
    assert lines[-1] == f"  drift report: {tmp_path / 'drift.sweep.fp16.json'}"
    assert not (tmp_path / "fused.fp16.onnx").exists()


def test_fp32_export_writes_the_drift_report_of_every_output(tmp_path):
    from iqe.export.onnx_export import export_model

    model = small_mvfa(segmentation=False)
    info = export_model(model, tmp_path, "fp32", graphs=("fused",), progress=False, calib_images=CALIB)
    assert info.drift["passed"] and info.precision_policy is None
    drift = json.loads((tmp_path / "drift.onnxruntime.fp32.json").read_text())
    assert {"score", "score_zero", "score_few", "map", "map_zero", "map_few"} <= set(drift["metrics"])
    assert max(drift["metrics"][k]["max_abs"] for k in ("map_zero", "map_few")) < 1e-4


def test_fp16_given_policy_without_verification_is_recorded(tmp_path):
    from iqe.export.onnx_export import export_model
    from iqe.export.precision import PrecisionPolicy

    info = export_model(small_mvfa(), tmp_path, "fp16", graphs=("fused",), progress=False, verify=False,
                        policy=PrecisionPolicy({2: ["mlp_fc", "mlp_proj"]}))
    record = json.loads((tmp_path / "export.fp16.json").read_text())
    assert record["drift"] is None and record["precision_policy"]["blocks"] == {"2": ["mlp_fc", "mlp_proj"]}
    assert 0 < info.fp16_flop_fraction < 0.5 and not (tmp_path / "drift.onnxruntime.fp16.json").exists()
