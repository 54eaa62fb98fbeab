"""Quantization data and operating points (thresholds) for deployed models."""
