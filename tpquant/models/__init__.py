"""Model definitions: the Llama config (config.py) and the tensor-parallel model built from tpquant layers."""
