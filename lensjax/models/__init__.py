"""Functional forward pass and KV-cache sampler over the common parameter tree."""

from lensjax.models.sampler import generate
from lensjax.models.transformer import encode, forward, init_cache, shift_right

__all__ = ["encode", "forward", "generate", "init_cache", "shift_right"]
