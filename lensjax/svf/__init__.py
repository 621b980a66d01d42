"""Transformer² Singular Value Fine-tuning: decomposition cache, z policies, REINFORCE trainer,
tasks and rewards, experts."""

from lensjax.svf.core import (PARAMETERISATIONS, TARGETS, Decomposition, SVFError, adapted_params,
                              decompose_params, init_z, merged_params, scales)

__all__ = ["PARAMETERISATIONS", "TARGETS", "Decomposition", "SVFError", "adapted_params", "decompose_params",
           "init_z", "merged_params", "scales"]
