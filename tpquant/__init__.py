"""tpquant: tensor-parallel, quantized Llama inference on several GPUs, launched with MPI."""

__version__ = "0.1.0"
