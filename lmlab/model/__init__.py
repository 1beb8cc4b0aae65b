"""The model: its shapes (config.py), the decoder (transformer.py: blocks and the Transformer; attention.py,
norms.py, rope.py, kv_cache.py), sequence heads (heads.py) and weight-only quantization (quantize.py)."""
