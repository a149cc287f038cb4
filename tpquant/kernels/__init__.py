"""Python entry points of every device op.

Each op has a torch reference implementation that runs on CPU and CUDA tensors alike and is
the oracle the tests compare against. Fast GPU paths (CUDA in cpp/ or Triton) are chosen
automatically on CUDA tensors later (issue 5); until then every op is its reference.
"""
