"""iqe-engine: IQE-CLIP anomaly detection from checkpoint to PACS.

Data flow, one subpackage per stage:
    model/        bundle (config.json + model.safetensors), nn.Modules, reference import, training
    export/       bundle -> ONNX graphs, each checked against PyTorch
    engine/       ONNX -> engine per backend (torch, onnxruntime, tensorrt), manifest, runners
    runtime/      files / DICOM -> preprocessing -> batches -> runner -> results
    calibration/  quantization data, operating points
"""

__version__ = "0.1.0"
