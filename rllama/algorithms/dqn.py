"""Deep Q-learning over candidate actions (Double DQN, Huber loss, replay, target network).

``Q(s, a)`` is a linear head on the hidden state of the prompt followed by the action's text, so
actions are compared by what they say. By default the head reads that state whitened and learns
alone, the adapter frozen (``train_adapter=False``, ``whiten_features=64``; see
``docs/algorithms/dqn.md``). The target network is a snapshot of the Q head (and of the LoRA
adapter when it trains; the base model is shared). For a transition ``(s, a, r, s')``:

    y = r + gamma * Q_target(s', argmax_a' Q(s', a'))      (0 after the last step)
    L = Huber(Q(s, a) - y)

Acting is epsilon-greedy on ``Q``; epsilon falls linearly from ``exploration_initial_eps`` to
``exploration_final_eps`` over ``exploration_steps`` environment steps. Ties (an untrained, all-zero
Q head) are broken by the language model's own preference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rllama.algorithms.base import check_field
from rllama.algorithms.buffers import Transition
from rllama.algorithms.off_policy import OffPolicyAlgorithm, OffPolicyConfig, transition_batch
from rllama.algorithms.registry import register_algorithm
from rllama.policy.model import CandidateOutputs


@dataclass
class DQNConfig(OffPolicyConfig):
    """DQN settings.

    Attributes:
        exploration_initial_eps: epsilon at the start.
        exploration_final_eps: epsilon after ``exploration_steps`` environment steps.
        exploration_steps: length of the linear epsilon schedule, in environment steps.
        huber_delta: threshold of the Huber loss.
    """

    learning_starts: int = 500
    gradient_steps: int = 16
    minibatch_size: int = 64
    train_adapter: bool = False
    whiten_features: int = 64
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.05
    exploration_steps: int = 3000
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("exploration_initial_eps", "exploration_final_eps"):
            check_field(self, name, 0 <= getattr(self, name) <= 1, "must lie in [0, 1]")
        check_field(self, "exploration_steps", self.exploration_steps >= 1, "must be at least 1")
        check_field(self, "huber_delta", self.huber_delta > 0, "must be positive")


def greedy_index(q: torch.Tensor, prior: torch.Tensor) -> int:
    """Index of the largest Q-value; among equal values, the one the language model prefers."""
    best = q.max()
    tied = (q >= best - 1e-7).nonzero().flatten()
    return int(tied[prior[tied].argmax()])


@register_algorithm("dqn")
class DQN(OffPolicyAlgorithm):
    """Double DQN with a Q head on (prompt + action text) hidden states."""

    config_class = DQNConfig
    q_heads = ("q",)
    acting_heads = ("q",)

    @property
    def epsilon(self) -> float:
        cfg = self.config
        frac = min(1.0, self.env_steps / cfg.exploration_steps)
        return cfg.exploration_initial_eps + frac * (cfg.exploration_final_eps - cfg.exploration_initial_eps)

    def learns_scored_choices(self) -> bool:
        return True  # the Q head chooses; the model's scores only break its ties

    def choose_actions(self, outputs: CandidateOutputs, greedy: bool, generator: torch.Generator,
                       training: bool) -> list[tuple[int, float]]:
        eps = 0.0 if greedy else self.epsilon
        choices = []
        for q, prior in zip(outputs.q["q"], outputs.logprobs):
            q, prior = q.detach().float().cpu(), prior.detach().float().cpu()
            n = len(q)
            best = greedy_index(q, prior)
            explore = eps > 0 and float(torch.rand((), generator=generator)) < eps
            k = int(torch.randint(n, (), generator=generator)) if explore else best
            prob = eps / n + (1 - eps) * (k == best)
            choices.append((k, float(torch.log(torch.tensor(prob)))))
        if training:
            self.env_steps += len(choices)
        return choices

    def train_step(self, batch: list[Transition]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        prompts, candidates, actions, rewards, live, next_prompts, next_candidates = transition_batch(batch)
        # Targets first: the target weights are swapped into the parameters in place, which must
        # not happen while the online forward's graph holds them.
        targets = rewards.clone()
        if live:
            # Q-values only: which of equal online values picks the target's value cannot matter
            # to the target (tied online values only occur while the head is constant).
            with torch.no_grad():
                online = self.policy.candidate_outputs(next_prompts, next_candidates, q_heads=("q",), scores=False)
                best = [int(q.argmax()) for q in online.q["q"]]
                target = self.target_outputs(next_prompts, next_candidates, scores=False)
                next_q = torch.stack([q[b] for q, b in zip(target.q["q"], best)]).float().cpu()
            targets[live] += cfg.gamma * next_q
        out = self.q_outputs(prompts, candidates, scores=False)
        q_sa = torch.stack([q[a] for q, a in zip(out.q["q"], actions.tolist())])  # [N]
        targets = targets.to(q_sa.device)
        loss = F.huber_loss(q_sa, targets, delta=cfg.huber_delta)
        return loss, {"loss/q": loss.item(), "q/mean": q_sa.mean().item(), "q/target_mean": targets.mean().item(),
                      "explore/epsilon": self.epsilon}
