"""ONNX -> engines per backend behind a registry (registry.py; torch_backend, onnxruntime_backend,
tensorrt_backend), manifests binding engines to their bundle, and runners behind one interface."""
