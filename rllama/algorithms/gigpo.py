"""Group-in-Group Policy Optimization (GiGPO): GRPO's episode groups plus step groups of identical states.

GRPO judges a whole episode against the other episodes of its group (same start state), so every
step of an episode gets the same advantage. GiGPO adds a second, finer comparison inside the group:
steps of the group's episodes that acted in the same *anchor state* form a step group, and each is
judged against the others of its step group by what followed it. Critic-free, as GRPO. From
L. Feng, Z. Xue, T. Liu, B. An, "Group-in-Group Policy Optimization for LLM Agent Training" (2025,
arXiv:2505.10978), whose code is verl-agent.

For episode ``i`` of group ``g`` (``rllama.algorithms.grpo``) and its step ``t`` in state ``s_t``:

    A_ep(i)   = (R_i - mean_g(R)) / (std_g(R) + eps)                 # GRPO's episode advantage
    G_t       = sum_{k >= t} gamma^(k - t) r_k                         # discounted return from step t
    S(g, s)   = {steps of group g's episodes, in any episode, whose state is s}   # step group
    A_step(t) = (G_t - mean_S(G)) / (std_S(G) + eps)                   # step_normalize=True
              =  G_t - mean_S(G)                                       # step_normalize=False
    A(t)      = A_ep(i) + step_weight * A_step(t)

A step group of one step has ``A_step = 0`` (its own return is its mean), so a step whose state no
other step of the group met keeps GRPO's advantage; ``step_weight=0`` is GRPO exactly. The loss is
GRPO's: PPO's clipped surrogate on ``A``, the entropy bonus and ``kl_coef * KL`` to the reference
policy (adapter disabled); there is no value head. ``std`` is the population standard deviation and ``eps`` is
``std_eps`` at both levels, so the two advantages are on one scale.

The state of a step (:func:`anchor_state`) is its prompt token ids (and its candidate actions when
it scored them): exactly what the policy conditioned on. ``Step`` and ``Episode`` keep no
observation text, and recovering the last user message from the ids would depend on the chat
template, so the prompt is the key. With ``keep_history = False`` (the prompt is the system prompt
and the current observation, as ``BlackjackAgent`` has it) that is verl-agent's grouping by the
current observation. With history, two steps match only when their whole chat so far matches too:
fewer and smaller step groups than verl-agent's (whose anchor is the raw observation whatever the
history), never a match of two different prompts. Retrieved memories injected into a prompt make it
another state as well. A subclass may override :meth:`GiGPO.anchor_state` to key on something coarser.

Facts taken from verl-agent (github.com/langfengQ/verl-agent, read in its fork vanzll/verl-agent):
``gigpo/core_gigpo.py`` computes per-trajectory discounted returns ``R_t = r_t + gamma R_{t+1}``
(``compute_step_discounted_returns``, the paper's Eq. 5), clusters identical anchor observations
within each episode group only (``build_step_group``, Eq. 6), normalises a step's return within its
cluster, a cluster of one getting 0 (``step_norm_reward``, Eq. 7), and adds the two advantages as
``episode + step_advantage_w * step`` (``compute_gigpo_outcome_advantage``, Eq. 8); its
``mode="mean_norm"`` subtracts the mean only, ``"mean_std_norm"`` also divides by the std.
``verl/trainer/config/ppo_trainer.yaml`` defaults ``step_advantage_w=1.0`` and ``mode="mean_norm"``;
``examples/gigpo_trainer/run_alfworld.sh`` (the ALFWorld run) sets ``gamma=0.95`` and
``mode="mean_std_norm"`` with groups of 8. ``agent_system/environments/env_manager.py`` uses the env's
raw observation as the anchor, not the prompt with its history. Differences here: the episode level
is GRPO's (one return per episode, where verl-agent's default takes the group's mean and std over
its steps, weighting long episodes more), and both levels use the population std plus ``std_eps``
(verl-agent: the sample std plus 1e-6).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rllama.algorithms.base import check_field
from rllama.algorithms.buffers import Episode, RolloutBatch, Step, discounted_returns
from rllama.algorithms.grpo import GRPO, GRPOConfig, group_key
from rllama.algorithms.registry import register_algorithm


@dataclass
class GiGPOConfig(GRPOConfig):
    """GiGPO settings: GRPO's, plus the step level.

    Attributes:
        gamma: discount of the step-level returns ``G_t`` (verl-agent's ALFWorld run: 0.95).
            The episode level uses each episode's undiscounted return, as GRPO does.
        step_weight: weight ``omega`` of the step advantage in ``A_ep + omega * A_step``
            (verl-agent's ``step_advantage_w``, default 1.0); 0 gives GRPO's advantages exactly.
        step_normalize: divide each step advantage by its step group's standard deviation (plus
            ``std_eps``), as the episode level does (verl-agent's ``mode="mean_std_norm"``);
            ``False`` subtracts the step group's mean only (``"mean_norm"``).
    """

    gamma: float = 0.95
    step_weight: float = 1.0
    step_normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        weight = self.step_weight
        check_field(self, "step_weight",
                    isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
                    and weight >= 0, "must be a non-negative number (0: GRPO)")
        check_field(self, "step_normalize", isinstance(self.step_normalize, bool), "must be True or False")


def anchor_state(step: Step) -> Hashable:
    """The state a step acted in: its prompt token ids, and its candidate actions when it scored them
    (the same prompt with other valid actions is another decision)."""
    candidates = None if step.candidate_ids is None else tuple(tuple(c) for c in step.candidate_ids)
    return tuple(step.prompt_ids), candidates


def step_returns(episodes: Sequence[Episode], gamma: float) -> np.ndarray:
    """Every step's discounted return to the end of its episode, ``[S]`` in the episodes' order.
    Critic-free, a truncated episode's return is not completed with a value."""
    parts = [discounted_returns(np.array([s.training_reward for s in e.steps], dtype=np.float64), gamma)
             for e in episodes]
    return np.concatenate(parts) if parts else np.zeros(0)


def step_group_keys(episodes: Sequence[Episode], state: Callable[[Step], Hashable] = anchor_state) -> list:
    """Every step's step group, ``[S]``: its episode's group (:func:`~rllama.algorithms.grpo.group_key`)
    and its state. Steps of different episode groups never share a step group (as in verl-agent: an
    observation alone need not tell two tasks apart); steps of one episode may (a state met twice)."""
    return [(group_key(e), state(s)) for e in episodes for s in e.steps]


def step_advantages(returns: np.ndarray, keys: Sequence, eps: float, normalize: bool = True) -> np.ndarray:
    """Each step's return relative to its step group: ``G_t - mean``, divided by ``std + eps`` when
    ``normalize``; 0 for a step alone in its group. ``[S]``, float64."""
    members: dict = defaultdict(list)
    for i, key in enumerate(keys):
        members[key].append(i)
    out = np.zeros(len(keys), dtype=np.float64)
    for rows in members.values():
        group = returns[rows]
        centred = group - group.mean()
        scale = group.std() + eps
        out[rows] = centred / scale if normalize and scale > 0 else centred  # equal returns: all 0
    return out


@register_algorithm("gigpo")
class GiGPO(GRPO):
    """GRPO's episode-level group advantage plus a step-level one from steps that met the same state.

    Grouping, whole-group updates and the loss are GRPO's; only the advantages differ. Updates report
    ``rollout/anchored_steps``, the fraction of steps that share their state with another step of
    their group (where it is 0, the update is GRPO's).

    Example:
        >>> from rllama.algorithms import GiGPOConfig
        >>> GiGPOConfig(group_size=8, batch_episodes=16, step_weight=1.0).gamma
        0.95
    """

    config_class = GiGPOConfig
    _anchored: float = 0.0  # of the last update's steps, the fraction in a step group of two or more

    def anchor_state(self, step: Step) -> Hashable:
        """The key under which steps of one group count as the same state (:func:`anchor_state`)."""
        return anchor_state(step)

    def compute_targets(self, batch: RolloutBatch, episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        episode_adv, _ = super().compute_targets(batch, episodes)  # [S] each step its episode's A_ep
        returns = step_returns(episodes, cfg.gamma)  # [S]
        keys = step_group_keys(episodes, self.anchor_state)
        step_adv = step_advantages(returns, keys, cfg.std_eps, cfg.step_normalize)  # [S]
        sizes = Counter(keys)
        self._anchored = sum(sizes[k] > 1 for k in keys) / max(len(keys), 1)
        advantages = episode_adv + cfg.step_weight * torch.tensor(step_adv, dtype=torch.float32)
        return advantages, torch.tensor(returns, dtype=torch.float32)

    def update(self) -> dict[str, float]:
        stats = super().update()
        stats["rollout/anchored_steps"] = self._anchored
        return stats
