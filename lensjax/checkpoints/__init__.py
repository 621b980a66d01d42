"""Hugging Face checkpoints → the common tree (safetensors, sharded safetensors, flax msgpack)."""

from lensjax.checkpoints.loader import CheckpointError, Model, load, save

__all__ = ["CheckpointError", "Model", "load", "save"]
