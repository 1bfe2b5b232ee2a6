"""Algorithms and their registry.

``available()`` lists the registered names; ``make_algorithm("ppo", policy)`` builds one;
``@register_algorithm("name")`` adds a user's own :class:`Algorithm` subclass.
"""

from rllama.algorithms.a2c import A2C, A2CConfig
from rllama.algorithms.base import Algorithm, AlgorithmConfig
from rllama.algorithms.buffers import (
    Episode,
    ReplayBuffer,
    RolloutBatch,
    RolloutBuffer,
    Step,
    Transition,
    compute_gae,
    discounted_returns,
)
from rllama.algorithms.dqn import DQN, DQNConfig
from rllama.algorithms.gigpo import GiGPO, GiGPOConfig
from rllama.algorithms.grpo import GRPO, GRPOConfig
from rllama.algorithms.losses import Minibatch, kl_to_reference
from rllama.algorithms.off_policy import OffPolicyAlgorithm, OffPolicyConfig
from rllama.algorithms.on_policy import OnPolicyAlgorithm, OnPolicyConfig
from rllama.algorithms.ppo import PPO, PPOConfig
from rllama.algorithms.registry import available, get_algorithm_class, make_algorithm, register_algorithm
from rllama.algorithms.reinforce import REINFORCE, REINFORCEConfig
from rllama.algorithms.sac import SAC, SACConfig

__all__ = [
    "A2C",
    "A2CConfig",
    "DQN",
    "DQNConfig",
    "GiGPO",
    "GiGPOConfig",
    "GRPO",
    "GRPOConfig",
    "PPO",
    "REINFORCE",
    "REINFORCEConfig",
    "SAC",
    "SACConfig",
    "Algorithm",
    "AlgorithmConfig",
    "Episode",
    "Minibatch",
    "OnPolicyAlgorithm",
    "OffPolicyAlgorithm",
    "OffPolicyConfig",
    "OnPolicyConfig",
    "PPOConfig",
    "RolloutBatch",
    "ReplayBuffer",
    "RolloutBuffer",
    "Step",
    "Transition",
    "available",
    "compute_gae",
    "discounted_returns",
    "get_algorithm_class",
    "kl_to_reference",
    "make_algorithm",
    "register_algorithm",
]
