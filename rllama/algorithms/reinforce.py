"""REINFORCE: Monte-Carlo policy gradient with an optional baseline.

    L = -E[(G_t - b(s_t)) log pi(a_t|s_t)] - ent_coef * H[pi] + kl_coef * KL(pi || pi_ref)

``G_t`` is the discounted return from step ``t`` to the end of the episode. The baseline ``b`` is
the value head (``baseline="value"``, trained on ``G_t``), a running mean of returns
(``baseline="mean"``) or zero (``baseline="none"``). One gradient pass per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from rllama.algorithms.base import check_field
from rllama.algorithms.buffers import Episode, RolloutBatch, discounted_returns
from rllama.algorithms.losses import Minibatch
from rllama.algorithms.on_policy import OnPolicyAlgorithm, OnPolicyConfig
from rllama.algorithms.registry import register_algorithm


@dataclass
class REINFORCEConfig(OnPolicyConfig):
    """REINFORCE settings.

    Attributes:
        baseline: ``"value"`` (learned value head), ``"mean"`` (running mean of returns) or ``"none"``.
        baseline_momentum: weight of the old running mean in ``baseline="mean"``.
        minibatch_size: steps per gradient step (the batch is passed once).
    """

    auto_head_learning_rate: ClassVar[float] = 3e-2  # fewer steps an episode than PPO (OnPolicyConfig)

    batch_episodes: int = 8
    minibatch_size: int = 4
    learning_rate: float = 1e-4
    max_grad_norm: float = 0.5
    gamma: float = 1.0
    kl_coef: float = 0.1
    baseline: str = "value"
    baseline_momentum: float = 0.9
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "baseline", self.baseline in ("value", "mean", "none"), "must be 'value', 'mean' or 'none'")
        check_field(self, "baseline_momentum", 0 <= self.baseline_momentum < 1, "must lie in [0, 1)")


@register_algorithm("reinforce")
class REINFORCE(OnPolicyAlgorithm):
    """Monte-Carlo policy gradient (Williams, 1992) with a value, running-mean or no baseline."""

    config_class = REINFORCEConfig

    def __init__(self, policy, config=None, seed: int | None = None) -> None:
        super().__init__(policy, config, seed)
        self.uses_value = self.config.baseline == "value"
        self.running_mean: float | None = None

    def state_dict(self):
        tensors, meta = super().state_dict()
        meta["running_mean"] = self.running_mean
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        self.running_mean = meta["running_mean"]

    def compute_targets(self, batch: RolloutBatch, episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        per_episode = [discounted_returns(np.array([s.training_reward for s in e.steps]), cfg.gamma) for e in episodes]
        returns = torch.tensor(np.concatenate(per_episode), dtype=torch.float32)
        if cfg.baseline == "value":
            baseline = batch.old_values
        elif cfg.baseline == "mean":
            baseline = torch.full_like(returns, 0.0 if self.running_mean is None else self.running_mean)
            batch_mean = float(returns.mean())
            self.running_mean = batch_mean if self.running_mean is None else (
                cfg.baseline_momentum * self.running_mean + (1 - cfg.baseline_momentum) * batch_mean)
        else:
            baseline = torch.zeros_like(returns)
        return returns - baseline, returns

    def policy_loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        return -mb.mean_over_steps(mb.unit_advantages() * mb.new_logprobs), {}
