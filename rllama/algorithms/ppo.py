"""Proximal Policy Optimization for LLM policies (clipped surrogate, GAE, KL to the base model).

Loss per minibatch, with ratio ``r = pi(a|s) / pi_old(a|s)`` per unit (a scored step is one unit,
a generated step one unit per token, each step weighing the same):

    L = -E[min(r A, clip(r, 1-eps, 1+eps) A)] + vf_coef * E[(V(s) - R)^2] / 2
        - ent_coef * H[pi] + kl_coef * KL(pi || pi_ref)

``A`` and ``R`` come from GAE over the value head's estimates; ``pi_ref`` is the base model with the
adapter disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rllama.algorithms.base import (
    OnPolicyAlgorithm,
    OnPolicyConfig,
    Timer,
    _check,
    explained_variance,
    kl_to_reference,
    old_unit_logprobs,
)
from rllama.algorithms.registry import register_algorithm


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO settings. Defaults were chosen on Blackjack-v1 with SmolLM2-135M (benchmarks/README.md).

    Attributes:
        epochs: passes over each batch.
        clip_range: PPO's epsilon.
        vf_coef: weight of the value loss.
        target_kl: stop the epochs of an update early once the approximate KL between the new and
            the acting policy exceeds ``1.5 * target_kl`` (``None``: never).
    """

    batch_episodes: int = 16
    learning_rate: float = 3e-5
    max_grad_norm: float = 0.5
    epochs: int = 2
    clip_range: float = 0.2
    vf_coef: float = 0.5
    target_kl: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "epochs", self.epochs >= 1, "must be at least 1")
        _check(self, "clip_range", self.clip_range > 0, "must be positive")
        _check(self, "vf_coef", self.vf_coef >= 0, "must be non-negative")
        _check(self, "target_kl", self.target_kl is None or self.target_kl > 0, "must be positive or None")


@register_algorithm("ppo")
class PPO(OnPolicyAlgorithm):
    """PPO with a clipped surrogate, GAE from the value head, and a KL penalty to the reference.

    Example:
        >>> agent = BlackjackAgent(algorithm="ppo", algorithm_config={"learning_rate": 1e-4})  # doctest: +SKIP
    """

    config_class = PPOConfig

    def update(self) -> dict[str, float]:
        cfg: PPOConfig = self.config
        timer = Timer()
        episodes = self.buffer.episodes
        batch = self.buffer.to_batch(cfg.gamma, cfg.gae_lambda)
        self.buffer.clear()
        advantages = batch.advantages
        if cfg.normalize_advantages and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        reference = self.reference_distributions(batch.steps) if cfg.kl_coef > 0 else None

        sums: dict[str, float] = {}
        n_minibatches = 0
        stop = False
        for _epoch in range(cfg.epochs):
            for idx in batch.minibatches(cfg.minibatch_size, self.generator):
                steps = [batch.steps[i] for i in idx.tolist()]
                ev = self.policy.evaluate(steps)
                new_lp, owner = ev.unit_logprobs()  # [U], [U]
                old_lp = old_unit_logprobs(steps).to(new_lp.device)
                log_ratio = new_lp - old_lp
                ratio = log_ratio.exp()
                adv = advantages[idx].to(new_lp.device)[owner]
                units_per_step = torch.bincount(owner, minlength=len(steps)).float()
                weight = 1.0 / units_per_step[owner]  # each step weighs the same
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range) * adv)
                pg_loss = -(surrogate * weight).sum() / len(steps)
                v_loss = 0.5 * (ev.values - batch.returns[idx].to(ev.values.device)).pow(2).mean()
                entropy = ev.entropy.mean()
                loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
                kl_ref = torch.zeros(())
                if reference is not None:
                    kl_ref = kl_to_reference(ev, [reference[i] for i in idx.tolist()], steps).mean()
                    loss = loss + cfg.kl_coef * kl_ref
                grad_norm = self.optimizer_step(loss)
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean().item()
                    clipfrac = ((ratio - 1).abs() > cfg.clip_range).float().mean().item()
                for key, value in (
                    ("loss/policy", pg_loss.item()),
                    ("loss/value", v_loss.item()),
                    ("loss/total", loss.item()),
                    ("policy/entropy", entropy.item()),
                    ("policy/kl_ref", kl_ref.item()),
                    ("policy/approx_kl", approx_kl),
                    ("policy/clipfrac", clipfrac),
                    ("train/grad_norm", grad_norm),
                ):
                    sums[key] = sums.get(key, 0.0) + value
                n_minibatches += 1
                if cfg.target_kl is not None and approx_kl > 1.5 * cfg.target_kl:
                    stop = True
                    break
            if stop:
                break
        self.num_updates += 1
        stats = {k: v / n_minibatches for k, v in sums.items()}
        stats.update(
            {
                "value/explained_variance": explained_variance(batch.old_values, batch.returns),
                "value/mean": float(batch.old_values.mean()),
                "rollout/episodes": float(len(episodes)),
                "rollout/steps": float(len(batch)),
                "rollout/mean_return": float(sum(e.total_reward for e in episodes) / len(episodes)),
                "train/minibatches": float(n_minibatches),
                "train/updates": float(self.num_updates),
                "time/update_s": timer(),
            }
        )
        return stats
