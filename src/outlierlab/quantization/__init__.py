"""Fake quantization of weights, activations and the KV cache (issue 5)."""
