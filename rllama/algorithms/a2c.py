"""Advantage actor-critic (synchronous, A2C): one pass over each batch in small minibatches, no clipping.

    L = -E[A_t log pi(a_t|s_t)] + vf_coef * E[(V(s_t) - R_t)^2] / 2 - ent_coef * H[pi]
        + kl_coef * KL(pi || pi_ref)

``A_t`` is GAE over the value head's estimates (``gae_lambda=1`` gives Monte-Carlo returns minus
the value; smaller values n-step-like bootstrapping). The actor and the critic share the LoRA
adapter and train together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rllama.algorithms.losses import Minibatch
from rllama.algorithms.on_policy import OnPolicyAlgorithm, OnPolicyConfig
from rllama.algorithms.registry import register_algorithm


@dataclass
class A2CConfig(OnPolicyConfig):
    """A2C settings: one pass over each batch in minibatches of ``minibatch_size`` steps."""

    auto_head_learning_rate: ClassVar[float] = 3e-2  # fewer steps an episode than PPO (OnPolicyConfig)

    batch_episodes: int = 8
    minibatch_size: int = 4
    learning_rate: float = 1e-4
    max_grad_norm: float = 0.5
    gae_lambda: float = 1.0
    kl_coef: float = 0.1
    normalize_advantages: bool = False


@register_algorithm("a2c")
class A2C(OnPolicyAlgorithm):
    """Advantage actor-critic with the value head as critic."""

    config_class = A2CConfig

    def policy_loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        return -mb.mean_over_steps(mb.unit_advantages() * mb.new_logprobs), {}
