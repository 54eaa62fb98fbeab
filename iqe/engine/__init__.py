"""ONNX -> engines per backend (torch, onnxruntime, tensorrt), manifest and runners behind one interface."""
