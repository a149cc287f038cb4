"""Model definitions: the Llama config (config.py) and the tensor-parallel Llama model."""
