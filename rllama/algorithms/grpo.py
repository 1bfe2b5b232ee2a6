"""Group Relative Policy Optimization for multi-step episodes (critic-free).

As DeepSeek's GRPO does for prompts, here for episodes: the agent plays ``group_size`` episodes
from the same start state (the env is reset with one seed per group, see ``rllama.loops``), and
each episode's advantage is its return standardised within its group:

    A_i = (R_i - mean_group(R)) / (std_group(R) + eps)

Every step of episode ``i`` gets ``A_i``. The loss is PPO's clipped surrogate on these advantages
plus ``kl_coef * KL(pi || pi_ref)`` to the base model (adapter disabled); there is no value head.

In a plain loop (``act`` / ``assign_reward`` / ``terminate_episode`` without ``group=``), episodes
are grouped by their first prompt, i.e. by the state they started from (the episode-level groups of
GiGPO, Feng et al. 2025); an episode whose start state no other episode of the batch shares is
compared with all such episodes of the batch instead (a batch baseline).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch

from rllama.algorithms.base import check_field
from rllama.algorithms.buffers import Episode, RolloutBatch
from rllama.algorithms.losses import Minibatch, clipped_surrogate
from rllama.algorithms.on_policy import OnPolicyAlgorithm, OnPolicyConfig, StatSums
from rllama.algorithms.registry import register_algorithm


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

    auto_head_learning_rate: ClassVar[float] = 3e-2  # fewer steps an episode than PPO (OnPolicyConfig)

    group_size: int = 4
    batch_episodes: int = 16
    minibatch_size: int = 4
    learning_rate: float = 5e-5
    max_grad_norm: float = 0.5
    epochs: int = 2
    clip_range: float = 0.2
    kl_coef: float = 0.1
    std_eps: float = 1e-4
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "group_size", self.group_size >= 2, "must be at least 2")
        check_field(self, "batch_episodes", self.batch_episodes % self.group_size == 0,
               f"must be a multiple of group_size={self.group_size}")
        check_field(self, "epochs", self.epochs >= 1, "must be at least 1")
        check_field(self, "clip_range", self.clip_range > 0, "must be positive")


def group_key(episode: Episode):
    """The group an episode belongs to: ``info["group"]`` when the loop set one, else its first prompt."""
    group = episode.info.get("group")
    if group is not None:
        return group
    return ("start", tuple(episode.steps[0].prompt_ids) if episode.steps else ())


def group_advantages(episodes: list[Episode], eps: float) -> list[float]:
    """Each episode's return standardised within its group (:func:`group_key`). Episodes alone in
    their group (only possible without ``info["group"]``) are standardised against the returns of
    every such lone episode of the batch."""
    by_group: dict = defaultdict(list)
    for e in episodes:
        by_group[group_key(e)].append(e.training_return)
    lone = [rets[0] for rets in by_group.values() if len(rets) == 1]

    def stats(rets: list[float]) -> tuple[float, float]:
        t = torch.tensor(rets, dtype=torch.float64)
        return float(t.mean()), float(t.std(unbiased=False))

    per_group = {g: stats(rets if len(rets) > 1 else lone) for g, rets in by_group.items()}
    out = []
    for e in episodes:
        mean, std = per_group[group_key(e)]
        out.append((e.training_return - mean) / (std + eps))
    return out


@register_algorithm("grpo")
class GRPO(OnPolicyAlgorithm):
    """Critic-free policy optimisation with advantages relative to a group of episodes from one start."""

    config_class = GRPOConfig
    uses_value = False

    @property
    def group_size(self) -> int:
        return self.config.group_size

    def _trainable(self, episode: Episode, complete: set) -> bool:
        """Episodes the loop grouped train once their group is whole; ungrouped ones train at once."""
        return "group" not in episode.info or episode.info["group"] in complete

    def _complete_groups(self) -> set:
        counts: dict[int, int] = defaultdict(int)
        for e in self.buffer.episodes:
            if "group" in e.info:
                counts[e.info["group"]] += 1
        return {g for g, c in counts.items() if c >= self.group_size}

    def ready(self) -> bool:
        complete = self._complete_groups()
        if self.num_updates == 0 and self.buffer.num_steps < self.config.learning_starts:
            return False
        return sum(self._trainable(e, complete) for e in self.buffer.episodes) >= self.config.batch_episodes

    def update(self) -> dict[str, float]:
        """``epochs`` passes over the batch of whole groups (members of unfinished groups wait in the
        buffer for the next update), with the group-relative advantages of :meth:`compute_targets`."""
        complete = self._complete_groups()
        data = self.prepare(lambda e: self._trainable(e, complete))
        stats = StatSums()
        for _epoch in range(self.config.epochs):
            for idx in self.minibatches(data):
                stats.add(self.gradient_step(data, idx))  # evaluate, loss() (PPO's clipped surrogate), step
        return self.finish(data, stats)

    def compute_targets(self, batch: RolloutBatch, episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        per_episode = group_advantages(episodes, self.config.std_eps)
        adv = torch.tensor([a for e, a in zip(episodes, per_episode) for _ in e.steps], dtype=torch.float32)
        return adv, batch.returns

    def policy_loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        return clipped_surrogate(mb, self.config.clip_range)
