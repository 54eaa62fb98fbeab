"""Bundle -> ONNX graphs (image encoder, precomputed text branch, IQM head, fused), each checked against PyTorch."""
