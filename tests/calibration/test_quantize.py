"""INT8: the Q/DQ graph runs in ONNX Runtime and the fidelity gate judges it."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def test_int8_qdq_graph_runs_and_is_judged(tiny_model, tmp_path):
    import onnx
    import onnxruntime as ort

    from iqe.calibration.quantize import encoder_nodes, quantize_and_judge
    from iqe.export.fidelity import read_drift_report

    result, rep = quantize_and_judge(tiny_model, tmp_path, calib_images=8, timing_batch=2)
    graph = onnx.load(result.path).graph
    q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq  # explicit Q/DQ, the form TensorRT builds from
    # every quantized node belongs to the image encoder; the text branch and head stay float32
    compute = [c for d in dq for c in graph.node if d.output[0] in c.input and c.op_type in ("MatMul", "Gemm", "Conv")]
    assert compute and all(c.name.startswith("/encoder/") for c in compute)
    assert encoder_nodes(tmp_path / "fused.fp32.onnx")
    sess = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": np.random.default_rng(0).random((2, 3, 240, 240), dtype=np.float32)})
    assert all(np.isfinite(o).all() for o in out)
    # judged: the int8 contract's checks (including the AUC change on labelled images) are present
    metrics = {(c.output, c.metric) for c in rep.checks}
    assert ("map", "max abs") in metrics and ("score", "image-AUC change") in metrics
    assert result.passed == rep.passed and result.keep == (rep.passed and result.speedup >= 1.1)
    assert read_drift_report(tmp_path, "onnxruntime", "int8").passed == rep.passed
    assert result.int8_ms_per_image > 0 and result.fp32_ms_per_image > 0
