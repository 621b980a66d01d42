"""Transformer²: singular-value fine-tuning (decomposition cache, z policies, REINFORCE trainer,
tasks and rewards, experts) and self-adaptation (mixtures of experts, per-row experts in one
forward, two-pass inference with prompt / classifier / few-shot CEM): ``lensjax.svf.adapt(...)``."""

from lensjax.svf.adaptation import STRATEGIES, AdaptResult, adapt
from lensjax.svf.core import (PARAMETERISATIONS, TARGETS, Decomposition, SVFError, adapted_params,
                              decompose_params, init_z, merged_params, scales)
from lensjax.svf.mixing import ExpertSet, load_experts, mix

__all__ = ["PARAMETERISATIONS", "STRATEGIES", "TARGETS", "AdaptResult", "Decomposition", "ExpertSet", "SVFError",
           "adapt", "adapted_params", "decompose_params", "init_z", "load_experts", "merged_params", "mix", "scales"]
