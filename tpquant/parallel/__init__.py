"""Tensor-parallel plumbing: mapping, sharding, custom all-reduce."""
