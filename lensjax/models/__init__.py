"""Functional forward pass and KV-cache sampler over the common parameter tree."""

from lensjax.models.sampler import generate
from lensjax.models.transformer import forward, init_cache

__all__ = ["forward", "generate", "init_cache"]
