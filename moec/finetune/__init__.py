"""Quantization-aware co-design fine-tuning: learnable per-group scales/zeros, shift-robust bit sampling."""
