"""lensjax: LLM selection (rectified scaling law, LensLLM) and adaptation (Transformer² SVF) in JAX.

Top-level API: :func:`load` a Hugging Face checkpoint into the common tree, :func:`forward`,
:func:`generate`, :func:`save`. None of it imports torch.
"""

from lensjax.checkpoints import CheckpointError, Model, load, save
from lensjax.config import ModelConfig, UnsupportedModelError
from lensjax.models import forward, generate, init_cache

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Model", "ModelConfig", "UnsupportedModelError", "forward", "generate",
           "init_cache", "load", "save"]
