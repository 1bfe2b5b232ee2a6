"""Soft actor-critic for discrete candidate actions (Christodoulou, 2019), on a LoRA policy.

The actor is the policy itself: the softmax over the candidates' scores. Two Q heads on the hidden
state of (prompt + action text) are the critics, with a target snapshot of the Q heads (and of the
adapter when it trains). By default the adapter stays as it is (``train_adapter=False``) and the
actor learns through a policy head, a linear function of each candidate's whitened features added
to its logit, as the on-policy algorithms' ``policy_head`` does; with ``train_adapter=True`` the
adapter is the actor and critics' shared body. The entropy temperature ``alpha`` is tuned so the
policy's entropy tracks ``target_entropy_ratio * log(K)`` for a state with ``K`` candidates.

    y      = r + gamma * sum_a' pi(a'|s') [min_i Q_target_i(s', a') - alpha log pi(a'|s')]
    L_Q    = sum_i (Q_i(s, a) - y)^2 / 2
    L_pi   = sum_a pi(a|s) [alpha log pi(a|s) - min_i Q_i(s, a)]        (Q detached)
    L_alpha = log(alpha) * (H[pi(.|s)] - H_target)                        (H detached)

The heads (and the adapter, when it trains) minimise ``L_Q + actor_coef * L_pi`` with the algorithm's optimizer;
``log(alpha)`` minimises ``L_alpha`` with an Adam of its own. :meth:`SAC.train_step` computes the three
losses and steps nothing: the update (:meth:`OffPolicyAlgorithm.update`) takes the temperature's step,
then the heads'. In ``y`` and ``L_pi``, ``alpha`` is a number read at the start of the minibatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rllama.algorithms.base import check_field, load_optimizer_state, optimizer_state
from rllama.algorithms.buffers import Transition
from rllama.algorithms.off_policy import AuxiliaryLosses, OffPolicyAlgorithm, OffPolicyConfig, transition_batch
from rllama.algorithms.registry import register_algorithm
from rllama.policy.model import POLICY_HEAD


@dataclass
class SACConfig(OffPolicyConfig):
    """Discrete SAC settings.

    Attributes:
        initial_alpha: starting entropy temperature.
        alpha_learning_rate: Adam learning rate of ``log(alpha)``.
        target_entropy_ratio: target entropy as a fraction of the uniform policy's, ``log(K)``.
        actor_coef: weight of the actor loss against the critics' (they share the adapter when
            it trains).
        actor_learning_rate: AdamW learning rate of the actor's policy head (``train_adapter=False``;
            ``None``: ``head_learning_rate``).

    With ``train_adapter=False`` (the default) the Q heads and the actor's policy head read the
    candidates' features whitened to ``whiten_features`` components, fitted at the first update.
    """

    learning_starts: int = 500
    gradient_steps: int = 16
    minibatch_size: int = 64
    train_adapter: bool = False
    whiten_features: int = 64
    tau: float = 0.05
    target_update_interval: int = 1
    initial_alpha: float = 0.1
    alpha_learning_rate: float = 3e-3
    target_entropy_ratio: float = 0.5
    actor_coef: float = 1.0
    actor_learning_rate: float | None = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "initial_alpha", self.initial_alpha > 0, "must be positive")
        check_field(self, "alpha_learning_rate", self.alpha_learning_rate > 0, "must be positive")
        check_field(self, "target_entropy_ratio", 0 <= self.target_entropy_ratio <= 1, "must lie in [0, 1]")
        check_field(self, "actor_coef", self.actor_coef >= 0, "must be non-negative")
        check_field(self, "actor_learning_rate", self.actor_learning_rate is None or self.actor_learning_rate > 0,
               "must be positive or None")


@register_algorithm("sac")
class SAC(OffPolicyAlgorithm):
    """Discrete soft actor-critic: the LLM's candidate softmax is the actor, two Q heads the critics."""

    config_class = SACConfig
    q_heads = ("q1", "q2")

    def __init__(self, policy, config=None, seed: int | None = None) -> None:
        config = self.resolve_config(config)
        if not config.train_adapter:  # the actor is a policy head; before the optimizer is built
            policy.add_head(POLICY_HEAD, whiten=config.whiten_features)
        super().__init__(policy, config, seed)
        self.log_alpha = torch.tensor(math.log(self.config.initial_alpha), requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=self.config.alpha_learning_rate)

    def state_dict(self):
        tensors, meta = super().state_dict()
        tensors["log_alpha"] = self.log_alpha.detach().clone()
        meta["alpha_optimizer"] = optimizer_state("alpha_optimizer", self.alpha_optimizer, tensors)
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])
        load_optimizer_state("alpha_optimizer", self.alpha_optimizer, meta["alpha_optimizer"], tensors)

    def head_learning_rates(self) -> dict[str, float]:
        rate = self.config.actor_learning_rate
        return {POLICY_HEAD: rate} if rate is not None and not self.config.train_adapter else {}

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def train_step(self, batch: list[Transition]) -> tuple[torch.Tensor, dict[str, float], AuxiliaryLosses]:
        """``L_Q + actor_coef * L_pi`` (for the heads and adapter), the statistics, and ``L_alpha`` with the
        temperature's optimizer, which the update steps (this steps nothing)."""
        cfg = self.config
        alpha = self.alpha
        prompts, candidates, actions, rewards, live, next_prompts, next_candidates = transition_batch(batch)
        # Targets first: the target weights are swapped into the parameters in place, which must
        # not happen while the online forward's graph holds them.
        targets = rewards.clone()
        if live:
            with torch.no_grad():
                next_pi = self.policy.candidate_outputs(next_prompts, next_candidates,
                                                        frozen_body=not cfg.train_adapter).logprobs
                target = self.target_outputs(next_prompts, next_candidates, scores=False)  # Q only
                soft_values = torch.stack([
                    (lp.exp() * (torch.min(q1, q2) - alpha * lp)).sum()
                    for lp, q1, q2 in zip(next_pi, target.q["q1"], target.q["q2"])
                ]).float().cpu()
            targets[live] += cfg.gamma * soft_values
        out = self.q_outputs(prompts, candidates)
        targets = targets.to(out.values.device)

        critic_loss = actor_loss = 0.0
        entropies, target_entropies = [], []
        for i, a in enumerate(actions.tolist()):
            q1, q2, logp = out.q["q1"][i], out.q["q2"][i], out.logprobs[i]
            critic_loss = critic_loss + 0.5 * ((q1[a] - targets[i]) ** 2 + (q2[a] - targets[i]) ** 2)
            p = logp.exp()
            actor_loss = actor_loss + (p * (alpha * logp - torch.min(q1, q2).detach())).sum()
            entropies.append(-(p * logp).sum())
            target_entropies.append(cfg.target_entropy_ratio * math.log(len(logp)))
        n = len(batch)
        critic_loss, actor_loss = critic_loss / n, actor_loss / n
        entropy = torch.stack(entropies)
        alpha_loss = (self.log_alpha * (entropy.detach() - torch.tensor(target_entropies))).mean()
        loss = critic_loss + cfg.actor_coef * actor_loss
        stats = {
            "loss/critic": critic_loss.item(),
            "loss/actor": actor_loss.item(),
            "loss/alpha": alpha_loss.item(),
            "policy/entropy": entropy.mean().item(),
            "sac/alpha": alpha,
            "q/mean": float(torch.stack([q[a] for q, a in zip(out.q["q1"], actions.tolist())]).detach().mean()),
        }
        return loss, stats, [(self.alpha_optimizer, alpha_loss)]
