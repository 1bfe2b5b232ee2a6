"""Group Relative Policy Optimization for multi-step episodes (critic-free).

As DeepSeek's GRPO does for prompts, here for episodes: the agent plays ``group_size`` episodes
from the same start state (the env is reset with one seed per group, see ``rllama.loops``), and
each episode's advantage is its return standardised within its group:

    A_i = (R_i - mean_group(R)) / (std_group(R) + eps)

Every step of episode ``i`` gets ``A_i``. The loss is PPO's clipped surrogate on these advantages
plus ``kl_coef * KL(pi || pi_ref)`` to the base model (adapter disabled); there is no value head.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from rllama.algorithms.base import Minibatch, OnPolicyAlgorithm, OnPolicyConfig, _check, clipped_surrogate
from rllama.algorithms.buffers import Episode, RolloutBatch, RolloutBuffer
from rllama.algorithms.registry import register_algorithm
from rllama.errors import AgentStateError


@dataclass
class GRPOConfig(OnPolicyConfig):
    """GRPO settings.

    Attributes:
        group_size: episodes per start state (G).
        batch_episodes: episodes per update; a multiple of ``group_size`` (whole groups only).
        epochs: passes over each batch (the clipped ratio keeps later passes close).
        clip_range: PPO's epsilon.
        std_eps: added to the group's standard deviation; a group whose returns are all equal
            gets zero advantages.
    """

    group_size: int = 4
    batch_episodes: int = 16
    learning_rate: float = 3e-5
    max_grad_norm: float = 0.5
    epochs: int = 2
    clip_range: float = 0.2
    kl_coef: float = 0.04
    std_eps: float = 1e-4
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "group_size", self.group_size >= 2, "must be at least 2")
        _check(self, "batch_episodes", self.batch_episodes % self.group_size == 0,
               f"must be a multiple of group_size={self.group_size}")
        _check(self, "epochs", self.epochs >= 1, "must be at least 1")
        _check(self, "clip_range", self.clip_range > 0, "must be positive")


def group_advantages(episodes: list[Episode], eps: float) -> list[float]:
    """Each episode's return standardised within its group (same ``info["group"]``)."""
    by_group: dict[int, list[float]] = defaultdict(list)
    for e in episodes:
        by_group[e.info["group"]].append(e.total_reward)
    stats = {}
    for g, rets in by_group.items():
        t = torch.tensor(rets, dtype=torch.float64)
        stats[g] = (float(t.mean()), float(t.std(unbiased=False)))
    return [(e.total_reward - stats[e.info["group"]][0]) / (stats[e.info["group"]][1] + eps) for e in episodes]


@register_algorithm("grpo")
class GRPO(OnPolicyAlgorithm):
    """Critic-free policy optimisation with advantages relative to a group of episodes from one start."""

    config_class = GRPOConfig
    uses_value = False

    @property
    def group_size(self) -> int:
        return self.config.group_size

    def add_episode(self, episode: Episode) -> None:
        if "group" not in episode.info:
            raise AgentStateError(
                "GRPO needs episodes in groups that start from the same state: run agent.train(env, ...), "
                "which resets each group's episodes with one seed, or pass group= to terminate_episode()"
            )
        super().add_episode(episode)

    def _complete_groups(self) -> list[int]:
        counts: dict[int, int] = defaultdict(int)
        for e in self.buffer.episodes:
            counts[e.info["group"]] += 1
        return [g for g, c in counts.items() if c >= self.group_size]

    def ready(self) -> bool:
        return len(self._complete_groups()) * self.group_size >= self.config.batch_episodes

    def update(self) -> dict[str, float]:
        # Train on whole groups only; members of unfinished groups wait for the next update.
        complete = set(self._complete_groups())
        waiting = [e for e in self.buffer.episodes if e.info["group"] not in complete]
        self.buffer.episodes = [e for e in self.buffer.episodes if e.info["group"] in complete]
        try:
            return super().update()
        finally:
            self.buffer = RolloutBuffer()
            for e in waiting:
                self.buffer.add(e)

    def compute_targets(self, batch: RolloutBatch, episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        per_episode = group_advantages(episodes, self.config.std_eps)
        adv = torch.tensor([a for e, a in zip(episodes, per_episode) for _ in e.steps], dtype=torch.float32)
        return adv, batch.returns

    def policy_loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        return clipped_surrogate(mb, self.config.clip_range)
