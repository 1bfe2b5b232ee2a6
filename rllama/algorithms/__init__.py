"""Algorithms and their registry.

``available()`` lists the registered names; ``make_algorithm("ppo", policy)`` builds one;
``@register_algorithm("name")`` adds a user's own :class:`Algorithm` subclass.
"""

from rllama.algorithms.a2c import A2C, A2CConfig
from rllama.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Minibatch,
    OnPolicyAlgorithm,
    OnPolicyConfig,
    kl_to_reference,
)
from rllama.algorithms.buffers import Episode, RolloutBatch, RolloutBuffer, Step, compute_gae, discounted_returns
from rllama.algorithms.grpo import GRPO, GRPOConfig
from rllama.algorithms.ppo import PPO, PPOConfig
from rllama.algorithms.registry import available, get_algorithm_class, make_algorithm, register_algorithm
from rllama.algorithms.reinforce import REINFORCE, REINFORCEConfig

__all__ = [
    "A2C",
    "A2CConfig",
    "GRPO",
    "GRPOConfig",
    "PPO",
    "REINFORCE",
    "REINFORCEConfig",
    "Algorithm",
    "AlgorithmConfig",
    "Episode",
    "Minibatch",
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
