"""Proximal Policy Optimization for LLM policies (clipped surrogate, GAE, KL to the base model).

Loss per minibatch, with ratio ``r = pi(a|s) / pi_old(a|s)`` per unit (a scored step, or a reply to
declared choices, is one unit, a free generated step one unit per token, each step weighing the same):

    L = -E[min(r A, clip(r, 1-eps, 1+eps) A)] + vf_coef * E[(V(s) - R)^2] / 2
        - ent_coef * H[pi] + kl_coef * KL(pi || pi_ref)

``A`` and ``R`` come from GAE over the value head's estimates; ``pi_ref`` is the base model with the
adapter disabled. :meth:`PPO.update` is the epoch loop, :meth:`PPO.loss` the objective above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rllama.algorithms.base import AUTO, check_field
from rllama.algorithms.losses import Minibatch, clipped_surrogate
from rllama.algorithms.on_policy import OnPolicyAlgorithm, OnPolicyConfig, StatSums
from rllama.algorithms.registry import register_algorithm


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO settings. Defaults were chosen on Blackjack-v1 with SmolLM2-135M (benchmarks/README.md).

    Attributes:
        learning_rate: the adapter's; ``"auto"``: ``1e-3`` when the adapter alone is the policy
            (``policy_head=0``: a generating agent, or a scoring agent without a head), else ``5e-5``
            (beside a policy head).
        batch_episodes: ``"auto"``: 64 when the adapter alone is the policy, else 16.
        minibatch_size: steps per gradient step; ``"auto"``: 64 when the adapter alone is the
            policy, else 4. The adapter alone learns from a ±1 return on Blackjack only with batches
            this large: with 16-episode batches of 4-step minibatches at ``1e-3`` each Adam step
            follows the noise of a few returns and the policy swings between always hit and always
            stick; with 64 and 64 it reaches 85–88 % of the states optimal on 3 seeds after 6,400
            episodes, −0.079 on 1,000 fixed deals on average, scoring; generating with its reply
            constrained to two choices, 83–86 % and −0.080 (``docs/algorithms.md``). At ``5e-5`` a
            generating agent's adapter barely moves in 320 episodes (``kl_ref`` ≤ 0.03).
        epochs: passes over each batch.
        clip_range: PPO's epsilon.
        target_kl: stop the epochs of an update early once the approximate KL between the new and
            the acting policy exceeds ``1.5 * target_kl`` (``None``: never).
    """

    auto_fields: ClassVar[tuple[str, ...]] = OnPolicyConfig.auto_fields + ("learning_rate", "batch_episodes",
                                                                          "minibatch_size")
    auto_adapter_alone: ClassVar[dict[str, float | int]] = {"learning_rate": 1e-3, "batch_episodes": 64,
                                                            "minibatch_size": 64}
    auto_otherwise: ClassVar[dict[str, float | int]] = {"learning_rate": 5e-5, "batch_episodes": 16,
                                                        "minibatch_size": 4}
    batch_episodes: int | str = AUTO
    minibatch_size: int | str = AUTO
    learning_rate: float | str = AUTO
    max_grad_norm: float = 0.5
    epochs: int = 2
    clip_range: float = 0.2
    kl_coef: float = 0.1
    target_kl: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "epochs", self.epochs >= 1, "must be at least 1")
        check_field(self, "clip_range", self.clip_range > 0, "must be positive")
        check_field(self, "target_kl", self.target_kl is None or self.target_kl > 0, "must be positive or None")


@register_algorithm("ppo")
class PPO(OnPolicyAlgorithm):
    """PPO with a clipped surrogate, GAE from the value head, and a KL penalty to the reference.

    Example:
        >>> agent = BlackjackAgent(algorithm="ppo", algorithm_config={"learning_rate": 1e-4})  # doctest: +SKIP
    """

    config_class = PPOConfig

    def policy_loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        return clipped_surrogate(mb, self.config.clip_range)

    def update(self) -> dict[str, float]:
        """``epochs`` passes over the batch in minibatches; with ``target_kl``, the update stops once a
        minibatch's approximate KL to the acting policy passes ``1.5 * target_kl``."""
        cfg = self.config
        data = self.prepare()  # targets (GAE), the reference, the proximal log-probs
        stats = StatSums()
        for _epoch in range(cfg.epochs):
            for idx in self.minibatches(data):
                step_stats = self.gradient_step(data, idx)  # evaluate, loss(), optimizer step
                stats.add(step_stats)
                if cfg.target_kl is not None and self._agree(step_stats["policy/approx_kl"] > 1.5 * cfg.target_kl):
                    return self.finish(data, stats)
        return self.finish(data, stats)

    def loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective of the module docstring, term by term."""
        cfg = self.config
        surrogate, stats = self.policy_loss(mb)
        entropy = self.entropy(mb)
        value = self.value_loss(mb)
        loss = surrogate - cfg.ent_coef * entropy + cfg.vf_coef * value
        stats.update({"loss/policy": surrogate.item(), "policy/entropy": entropy.item(), "loss/value": value.item()})
        if mb.reference is not None:  # kl_coef > 0
            kl = self.kl_to_reference(mb)
            loss = loss + cfg.kl_coef * kl
            stats["policy/kl_ref"] = kl.item()
        return loss, stats
