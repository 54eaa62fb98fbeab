"""PyTorch IQE-CLIP: config, modules, bundle I/O, reference import, training, data."""
