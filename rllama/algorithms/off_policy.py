"""Value-based algorithms (DQN, SAC): transitions go to a replay buffer; updates sample it."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rllama.algorithms.base import Algorithm, AlgorithmConfig, Timer, check_field, tokens_of
from rllama.algorithms.buffers import (
    Episode,
    ReplayBuffer,
    Transition,
    episode_from_dict,
    episode_to_dict,
    replay_from_dict,
    replay_to_dict,
)
from rllama.policy.model import POLICY_HEAD, CandidateOutputs, PolicyModel

AuxiliaryLosses = Sequence[tuple[torch.optim.Optimizer, torch.Tensor]]
"""Losses of parameters outside the main optimizer, each with its optimizer (:meth:`OffPolicyAlgorithm.train_step`)."""


@dataclass
class OffPolicyConfig(AlgorithmConfig):
    """Settings shared by the value-based (replay) algorithms.

    Attributes:
        batch_episodes: finished episodes between two updates.
        buffer_size: transitions the replay buffer keeps.
        learning_starts: transitions collected before the first update.
        gradient_steps: minibatches per update.
        minibatch_size: transitions per minibatch.
        gamma: discount factor.
        tau: target update: 1 copies the online weights every ``target_update_interval`` gradient
            steps; smaller values move the target by ``tau`` toward them (Polyak) at that interval.
        target_update_interval: gradient steps between target updates.
        train_adapter: ``False`` keeps the LoRA adapter as it is and trains the Q heads alone, on the
            model's features: every forward then runs without gradients through the prefix cache
            (a gradient step costs milliseconds rather than seconds) and the target is a copy of
            the heads only.
        whiten_features: Q heads read the top ``whiten_features`` principal components of their
            input, whitened (``0``: the raw normalised hidden state; capped at the model's hidden
            size), fitted once at the first update from the replay buffer's states
            (:meth:`rllama.policy.model.ValueHead.fit_whitening`). Meant for a frozen adapter,
            whose features do not move after the fit.
    """

    batch_episodes: int = 16
    buffer_size: int = 20_000
    learning_starts: int = 64
    gradient_steps: int = 4
    minibatch_size: int = 16
    learning_rate: float = 3e-5
    head_learning_rate: float | None = 1e-3
    max_grad_norm: float = 1.0
    gamma: float = 0.99
    tau: float = 1.0
    target_update_interval: int = 10
    train_adapter: bool = True
    whiten_features: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "train_adapter", isinstance(self.train_adapter, bool), "must be True or False")
        check_field(self, "whiten_features", isinstance(self.whiten_features, int) and self.whiten_features >= 0,
               "must be 0 (off) or a number of components")
        check_field(self, "buffer_size", self.buffer_size >= 1, "must be at least 1")
        check_field(self, "learning_starts", self.learning_starts >= 1, "must be at least 1")
        check_field(self, "gradient_steps", self.gradient_steps >= 1, "must be at least 1")
        check_field(self, "minibatch_size", self.minibatch_size >= 1, "must be at least 1")
        check_field(self, "gamma", 0 <= self.gamma <= 1, "must lie in [0, 1]")
        check_field(self, "tau", 0 < self.tau <= 1, "must lie in (0, 1]")
        check_field(self, "target_update_interval", self.target_update_interval >= 1, "must be at least 1")


class OffPolicyAlgorithm(Algorithm):
    """Value-based algorithms: transitions go to a replay buffer; updates sample it.

    Subclasses name their state-action heads in ``q_heads`` (created on the policy, zero-initialised)
    and implement :meth:`train_step`, which computes losses; :meth:`update` samples the minibatches
    and takes every optimizer step. The target network is a snapshot of the adapter and the Q
    heads (:meth:`PolicyModel.snapshot`), never a copy of the base model. Experience lives in the
    replay buffer (``self.replay``): there is no episode buffer (:attr:`Algorithm.keeps_episodes`).
    """

    config_class: ClassVar[type] = OffPolicyConfig
    requires_candidates: ClassVar[bool] = True
    keeps_episodes: ClassVar[bool] = False
    q_heads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, policy: PolicyModel, config=None, seed: int | None = None) -> None:
        config = self.resolve_config(config)
        for name in self.q_heads:
            policy.add_head(name, whiten=config.whiten_features)  # before the optimizer is built
        super().__init__(policy, config, seed)
        self.replay = ReplayBuffer(self.config.buffer_size, self.generator)
        self.target = self.policy.snapshot(heads=self.q_heads, adapter=self.config.train_adapter)
        self.gradient_steps_done = 0
        self.env_steps = 0
        self._episodes_since_update: list[Episode] = []

    def add_episode(self, episode: Episode) -> None:
        bad = [s for s in episode.steps if not s.is_scored]
        if bad:
            raise ValueError(f"{type(self).__name__} learns from scored steps only (candidate actions)")
        self.replay.add_episode(episode)
        self._episodes_since_update.append(episode)

    def ready(self) -> bool:
        return (len(self.replay) >= self.config.learning_starts
                and len(self._episodes_since_update) >= self.config.batch_episodes)

    @abstractmethod
    def train_step(
        self, batch: list[Transition]
    ) -> tuple[torch.Tensor, dict[str, float]] | tuple[torch.Tensor, dict[str, float], AuxiliaryLosses]:
        """The loss of one sampled minibatch and its statistics: ``(loss, stats)``, ``loss`` minimised by
        ``self.optimizer`` (adapter and heads). It only computes: :meth:`update` steps the optimizers.

        An algorithm with parameters of its own, outside ``self.optimizer`` (SAC's temperature),
        returns a third item, ``[(optimizer, loss), ...]``: :meth:`update` takes a step of each
        (:meth:`auxiliary_step`), in that order, before the step of ``self.optimizer`` on ``loss``.
        """

    def auxiliary_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """Backward and step of an optimizer of the algorithm's own parameters (see :meth:`train_step`);
        across processes, their gradients averaged first. No clipping."""
        optimizer.zero_grad()
        loss.backward()
        if self.data_parallel is not None:
            self.data_parallel.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
        optimizer.step()

    def update_target(self) -> None:
        """Copy (``tau=1``) or move (Polyak) the target snapshot toward the online weights."""
        online = self.policy.snapshot(heads=self.q_heads, adapter=self.config.train_adapter)
        if self.config.tau >= 1:
            self.target = online
        else:
            for name, value in online.items():
                self.target[name].lerp_(value, self.config.tau)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        tensors.update({f"target.{k}": v for k, v in self.target.items()})
        meta.update(gradient_steps_done=self.gradient_steps_done, env_steps=self.env_steps,
                    replay=replay_to_dict(self.replay),
                    episodes_since_update=[episode_to_dict(e) for e in self._episodes_since_update])
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.target = {k[len("target."):]: v.clone() for k, v in tensors.items() if k.startswith("target.")}
        self.gradient_steps_done = int(meta["gradient_steps_done"])
        self.env_steps = int(meta["env_steps"])
        replay_from_dict(self.replay, meta["replay"])
        self._episodes_since_update = [episode_from_dict(e) for e in meta["episodes_since_update"]]

    def target_outputs(self, prompts, candidates, scores: bool = True) -> CandidateOutputs:
        """Candidate outputs (with the Q heads) under the target weights, without gradients
        (``scores=False``: Q-values only, see :meth:`PolicyModel.candidate_outputs`)."""
        with torch.no_grad(), self.policy.weights(self.target):
            return self.policy.candidate_outputs(prompts, candidates, q_heads=self.q_heads, scores=scores)

    def q_outputs(self, prompts, candidates, scores: bool = True) -> CandidateOutputs:
        """Candidate outputs with the Q heads under the online weights, with gradients for what trains
        (only the heads when ``train_adapter`` is off; ``scores=False``: Q-values only)."""
        return self.policy.candidate_outputs(prompts, candidates, q_heads=self.q_heads,
                                             frozen_body=not self.config.train_adapter, scores=scores)

    def fit_whitening(self, max_transitions: int = 4096) -> bool:
        """Fit the whitening of Q heads (and of a policy head) that have none yet, from the states of
        up to ``max_transitions`` transitions in the replay buffer (every candidate of each; it runs
        at the first update, before the ring buffer wraps); returns whether it fitted any."""
        names = [*self.q_heads, *([POLICY_HEAD] if POLICY_HEAD in self.policy.heads else [])]
        heads = [self.policy.heads[name] for name in names if not self.policy.heads[name].fitted]
        if not heads:
            return False
        steps = [t.step for t in self.replay.items[-max_transitions:]]
        hidden = self.policy.action_features([s.prompt_ids for s in steps], [s.candidate_ids for s in steps])
        for head in heads:
            head.fit_whitening(hidden)
        self._share_whitening(heads)
        self.target = self.policy.snapshot(heads=self.q_heads, adapter=self.config.train_adapter)
        return True

    def update(self) -> dict[str, float]:
        cfg = self.config
        timer = Timer()
        episodes, self._episodes_since_update = self._episodes_since_update, []
        sums: dict[str, float] = {}
        tokens = 0
        self.fit_whitening()
        for _ in range(cfg.gradient_steps):
            sample = self.replay.sample(cfg.minibatch_size)
            tokens += tokens_of([t.step for t in sample]) + 2 * tokens_of([t.next_step for t in sample if t.next_step])
            loss, stats, *auxiliary = self.train_step(sample)
            for optimizer, auxiliary_loss in (auxiliary[0] if auxiliary else ()):
                self.auxiliary_step(optimizer, auxiliary_loss)
            stats["train/grad_norm"] = self.optimizer_step(loss)
            stats["train/head_grad_norm"] = self.last_head_grad_norm
            stats["loss/total"] = loss.item()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            self.gradient_steps_done += 1
            if self.gradient_steps_done % cfg.target_update_interval == 0:
                self.update_target()
        self.num_updates += 1
        out = {k: v / cfg.gradient_steps for k, v in sums.items()}
        out.update(
            {
                "rollout/episodes": float(len(episodes)),
                "rollout/steps": float(sum(len(e) for e in episodes)),
                "rollout/mean_return": float(sum(e.total_reward for e in episodes) / max(1, len(episodes))),
                "replay/size": float(len(self.replay)),
                "train/gradient_steps": float(self.gradient_steps_done),
                "train/updates": float(self.num_updates),
                "time/update_s": timer(),
            }
        )
        out["time/update_tokens_per_s"] = tokens / max(out["time/update_s"], 1e-9)
        return out


def transition_batch(batch: Sequence[Transition]):
    """Split transitions into tensors and lists the losses need.

    Returns ``(prompts, candidates, actions [N], rewards [N], nonterminal indices, next prompts,
    next candidates)``.
    """
    prompts = [t.step.prompt_ids for t in batch]
    candidates = [t.step.candidate_ids for t in batch]
    actions = torch.tensor([t.step.action_index for t in batch], dtype=torch.long)
    rewards = torch.tensor([t.reward for t in batch], dtype=torch.float32)
    live = [i for i, t in enumerate(batch) if not t.done]
    next_prompts = [batch[i].next_step.prompt_ids for i in live]
    next_candidates = [batch[i].next_step.candidate_ids for i in live]
    return prompts, candidates, actions, rewards, live, next_prompts, next_candidates

