"""Algorithms and their registry.

``available()`` lists the registered names; ``make_algorithm("ppo", policy)`` builds one;
``@register_algorithm("name")`` adds a user's own :class:`Algorithm` subclass.
"""

from rllama.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    OnPolicyAlgorithm,
    OnPolicyConfig,
    kl_to_reference,
)
from rllama.algorithms.buffers import Episode, RolloutBatch, RolloutBuffer, Step, compute_gae, discounted_returns
from rllama.algorithms.ppo import PPO, PPOConfig
from rllama.algorithms.registry import available, get_algorithm_class, make_algorithm, register_algorithm

__all__ = [
    "PPO",
    "Algorithm",
    "AlgorithmConfig",
    "Episode",
    "OnPolicyAlgorithm",
    "OnPolicyConfig",
    "PPOConfig",
    "RolloutBatch",
    "RolloutBuffer",
    "Step",
    "available",
    "compute_gae",
    "discounted_returns",
    "get_algorithm_class",
    "kl_to_reference",
    "make_algorithm",
    "register_algorithm",
]
