"""The algorithm interface and what on-policy algorithms share.

"The policy acts, the algorithm updates it": an :class:`Algorithm` receives finished episodes from
the agent (:meth:`Algorithm.add_episode`), says when it has enough (:meth:`Algorithm.ready`) and
turns them into parameter updates of the policy's adapter and heads (:meth:`Algorithm.update`),
returning a dict of statistics. It never sees the environment, the agent or memory.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rllama.algorithms.buffers import (
    Episode,
    ReplayBuffer,
    RolloutBatch,
    RolloutBuffer,
    Step,
    Transition,
    episode_from_dict,
    episode_to_dict,
    replay_from_dict,
    replay_to_dict,
)
from rllama.distributed import current as current_data_parallel
from rllama.errors import RLlamaError
from rllama.policy.model import POLICY_HEAD, CandidateOutputs, PolicyModel, StepEvaluation

AUTO = "auto"
"""A config value decided when the algorithm is built for an agent (:meth:`AlgorithmConfig.resolved`)."""


@dataclass
class AlgorithmConfig:
    """Settings every algorithm has.

    Attributes:
        batch_episodes: finished episodes collected before each update.
        learning_rate: AdamW learning rate of the adapter.
        head_learning_rate: AdamW learning rate of the value/Q heads (``None``: ``learning_rate``).
            Heads start from zero and need to move further than the adapter, hence a larger rate.
        max_grad_norm: gradients are clipped to this global norm.
        weight_decay: AdamW weight decay.
    """

    batch_episodes: int = 16
    learning_rate: float = 1e-4
    head_learning_rate: float | None = 1e-3
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    auto_fields: ClassVar[tuple[str, ...]] = ()
    """Fields that may be ``"auto"``, decided by :meth:`resolved`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or f.name.startswith("_"):
                continue
            if value != value:  # NaN
                raise ValueError(f"{type(self).__name__}.{f.name} is NaN")
        _check(self, "batch_episodes", self.batch_episodes >= 1, "must be at least 1")
        _check(self, "learning_rate", self.learning_rate > 0, "must be positive")
        rate = self.head_learning_rate
        _check(self, "head_learning_rate",
               rate is None or (rate == AUTO and "head_learning_rate" in self.auto_fields)
               or (isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0),
               "must be positive or None" + (" or 'auto'" if "head_learning_rate" in self.auto_fields else ""))
        _check(self, "max_grad_norm", self.max_grad_norm > 0, "must be positive")
        _check(self, "weight_decay", self.weight_decay >= 0, "must be non-negative")

    def resolved(self, scoring: bool | None = None) -> AlgorithmConfig:
        """A copy with every ``"auto"`` value decided for an agent that scores candidate actions
        (``scoring=True``), generates (``False``) or is unknown (``None``); this one has none."""
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def _check(config, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name}={getattr(config, name)!r} {what}")


class Algorithm(ABC):
    """Base class of every algorithm. A subclass sets ``config_class`` and implements :meth:`update`.

    Args:
        policy: the policy model to train.
        config: an instance of ``config_class``, a dict of its fields, or ``None`` for the defaults.
        seed: seeds the algorithm's own random generator (minibatch order, replay sampling).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = AlgorithmConfig
    requires_candidates: ClassVar[bool] = False
    """Value-based algorithms need a list of candidate actions for every observation."""
    acting_heads: ClassVar[tuple[str, ...]] = ()
    """State-action heads whose values :meth:`choose_actions` needs when acting."""

    def __init__(self, policy: PolicyModel, config=None, seed: int | None = None) -> None:
        self.policy = policy
        self.config = config = self.resolve_config(config)
        self.generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.buffer = RolloutBuffer()
        heads = [p for p in policy.heads.parameters() if p.requires_grad]
        head_ids = {id(p) for p in heads}
        adapter = [p for p in policy.trainable_parameters() if id(p) not in head_ids]
        head_lr = config.learning_rate if config.head_learning_rate is None else config.head_learning_rate
        # Param groups: the adapter, the heads, then each head with a rate of its own (head_learning_rates).
        own = {name: rate for name, rate in self.head_learning_rates().items() if name in policy.heads}
        own_ids = {id(p) for name in own for p in policy.heads[name].parameters()}
        groups = [{"params": adapter, "lr": config.learning_rate},
                  {"params": [p for p in heads if id(p) not in own_ids], "lr": head_lr}]
        groups += [{"params": list(policy.heads[name].parameters()), "lr": rate} for name, rate in own.items()]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.num_updates = 0
        self.last_head_grad_norm = 0.0
        # Several processes (torchrun / accelerate launch): start from rank 0's weights, average gradients.
        self.data_parallel = current_data_parallel()
        if self.data_parallel is not None:
            self.data_parallel.broadcast_parameters(policy.trainable_parameters())

    @property
    def trains_adapter(self) -> bool:
        """Whether updates train the LoRA adapter (``train_adapter``; configs without it always do)."""
        return getattr(self.config, "train_adapter", True) is not False

    def head_learning_rates(self) -> dict[str, float]:
        """Heads that learn at a rate of their own rather than ``head_learning_rate`` (none here)."""
        return {}

    @classmethod
    def resolve_config(cls, config, scoring: bool | None = None):
        """``config`` as an instance of ``config_class`` (from ``None``: the defaults, or a dict of
        fields), its ``"auto"`` values decided for ``scoring`` (:meth:`AlgorithmConfig.resolved`)."""
        if config is None:
            config = cls.config_class()
        elif isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        elif not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__} expects a {cls.config_class.__name__} or a dict, got {type(config).__name__}"
            )
        return config.resolved(scoring)

    def add_episode(self, episode: Episode) -> None:
        """Receive a finished episode from the agent."""
        self.buffer.add(episode)

    def choose_actions(
        self, outputs: CandidateOutputs, greedy: bool, generator: torch.Generator, training: bool
    ) -> list[tuple[int, float]]:
        """Pick a candidate for each prompt: ``(index, log-probability of that choice)``.

        The default samples from the policy's softmax over candidate scores (``greedy``: argmax).
        Value-based algorithms override this (epsilon-greedy on Q-values).
        """
        choices = []
        for lp in outputs.logprobs:
            lp = lp.detach().float().cpu()
            k = int(lp.argmax()) if greedy else int(torch.multinomial(lp.exp(), 1, generator=generator))
            choices.append((k, float(lp[k])))
        return choices

    @torch.no_grad()
    def recompute_behaviour(self, steps: Sequence[Step]) -> int:
        """Value and behaviour log-probs, under the learner's weights, of steps marked ``learner_recompute``
        (acted by a generation server, :mod:`rllama.backends`). Returns how many were recomputed."""
        todo = [s for s in steps if s.learner_recompute]
        for step, dist, value in self._evaluate_in_chunks(todo):
            step.value = value
            if step.is_scored:
                step.logprob = float(dist[step.action_index])
            else:
                step.token_logprobs = dist.float().tolist()
                step.logprob = float(dist.sum())
            step.learner_recompute = False
        return len(todo)

    def _evaluate_in_chunks(self, steps: Sequence[Step]):
        """``(step, distribution, value)`` under the current weights, a minibatch of steps per forward pass."""
        size = int(getattr(self.config, "minibatch_size", 16))
        for start in range(0, len(steps), size):
            part = steps[start : start + size]
            ev = self.policy.evaluate_actions(part, with_values=True, with_entropy=False)
            yield from zip(part, ev.distributions, ev.values.tolist())

    @torch.no_grad()
    def bootstrap_values(self, episodes: Sequence[Episode]) -> list[float | None]:
        """Per episode, the current value of the state a truncated episode was cut in (``None`` for
        the others, and for truncated ones without that state)."""
        todo = [i for i, e in enumerate(episodes) if e.truncated and e.bootstrap is not None]
        out: list[float | None] = [None] * len(episodes)
        if todo:
            values = self.policy.values([episodes[i].bootstrap.prompt_ids for i in todo])
            for i, v in zip(todo, values.float().cpu().tolist()):
                out[i] = v
        return out

    @torch.no_grad()
    def proximal_logprobs(self, steps: Sequence[Step]) -> tuple[dict[int, torch.Tensor], list[int]]:
        """For steps acted by an older policy (``policy_version < num_updates``): their log-probs per unit
        under the current weights (``{id(step): [units]}``), with their values refreshed too; and every
        step's staleness (updates behind). Empty when all steps are on-policy."""
        lags = [self.num_updates - s.policy_version if s.policy_version is not None else 0 for s in steps]
        stale = [s for s, lag in zip(steps, lags) if lag > 0]
        out: dict[int, torch.Tensor] = {}
        for step, dist, value in self._evaluate_in_chunks(stale):
            step.value = value  # advantages from the current critic, not the stale one
            index = step.action_index
            out[id(step)] = (dist[index : index + 1] if step.is_scored else dist).float().cpu()
        return out, (lags if stale else [])

    def ready(self) -> bool:
        """Whether enough experience has arrived for :meth:`update`."""
        return self.buffer.num_episodes >= self.config.batch_episodes

    @abstractmethod
    def update(self) -> dict[str, float]:
        """Train on the collected experience and return statistics (keys like ``"loss/policy"``)."""

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything an update depends on besides the policy's weights, for an exact resume.

        Returns ``(tensors, meta)``: tensors for safetensors, JSON-serialisable metadata (the
        optimizer's hyperparameters, counters, the buffered experience). Subclasses with more state
        extend both (and :meth:`load_state_dict`).
        """
        tensors = {"generator": self.generator.get_state()}
        meta: dict[str, Any] = {"name": self.name, "num_updates": self.num_updates}
        meta["optimizer"] = optimizer_state("optimizer", self.optimizer, tensors)
        meta["buffer"] = [episode_to_dict(e) for e in self.buffer.episodes]
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the policy's weights are loaded separately)."""
        if meta.get("name") != self.name:
            raise RLlamaError(f"checkpoint state is of algorithm {meta.get('name')!r}, not {self.name!r}")
        self.generator.set_state(tensors["generator"])
        self.num_updates = int(meta["num_updates"])
        load_optimizer_state("optimizer", self.optimizer, meta["optimizer"], tensors)
        self.buffer.episodes = [episode_from_dict(e) for e in meta["buffer"]]

    def _share_whitening(self, heads) -> None:
        """Across processes, every head gets the whitening process 0 fitted (each fits it from its own
        steps; features must be read the same way everywhere for the averaged gradients to agree)."""
        if self.data_parallel is not None:
            self.data_parallel.broadcast_parameters([b for head in heads for b in head.buffers()])

    def _agree(self, flag: bool) -> bool:
        """``flag`` if in one process; across processes, whether any process raised it."""
        return flag if self.data_parallel is None else self.data_parallel.any(flag)

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward, clip, step; returns the adapter's gradient norm before clipping.

        The adapter and the heads are clipped to ``max_grad_norm`` separately: a value or Q head's
        gradient is often ten times the adapter's, and one global clip scaled every policy step down
        by as much (Blackjack: grad norm 4-23 under a clip of 0.5). The heads' norm before clipping is
        kept in ``self.last_head_grad_norm``.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        groups = self.optimizer.param_groups
        adapter, heads = groups[0]["params"], [p for group in groups[1:] for p in group["params"]]
        if self.data_parallel is not None:  # a frozen adapter has no gradients to average (nor to step)
            self.data_parallel.average_gradients(self.policy.trainable_parameters() if self.trains_adapter else heads)
        norm = torch.nn.utils.clip_grad_norm_(adapter, self.config.max_grad_norm)
        self.last_head_grad_norm = float(torch.nn.utils.clip_grad_norm_(heads, self.config.max_grad_norm))
        self.optimizer.step()
        return float(norm)


@dataclass
class OnPolicyConfig(AlgorithmConfig):
    """Settings shared by the on-policy algorithms.

    Attributes:
        minibatch_size: steps per gradient step.
        max_importance_weight: cap of the importance weight ``pi_prox / pi_behav`` that corrects steps
            acted by an older policy (asynchronous training, :mod:`rllama.async_rl`); unused when every
            step is on-policy.
        gamma: discount factor.
        gae_lambda: GAE lambda.
        kl_coef: weight of the KL divergence to the reference policy (the base model with the
            adapter disabled) in the loss; 0 turns the reference pass off.
        kl_direction: ``"forward"``, ``KL(pi_ref || pi)``: a pull toward the base model whose gradient
            (``pi - pi_ref`` per candidate) does not vanish as the policy becomes certain, so an
            action the policy has nearly given up keeps being tried; or ``"reverse"``,
            ``KL(pi || pi_ref)`` as in RLHF, whose pull fades with the action's probability.
        ent_coef: weight of the entropy bonus.
        vf_coef: weight of the value loss (algorithms that learn a value).
        normalize_advantages: standardise advantages over the batch.
        policy_head: ``k > 0`` adds a linear head on each candidate's features, whitened to their
            top ``k`` principal components, to the candidate's logit (scoring mode), and the value
            head reads the prompt's features whitened the same way; both are fitted once, at the
            first update, from the steps collected so far (``learning_starts``). A linear policy on
            the model's features learns state-dependent choices that the adapter alone does not
            (Blackjack: ``docs/algorithms.md``). ``0``: off, the policy is the model's own scores.
            ``"auto"`` (default): 64 for an agent that scores candidate actions, 0 for one that
            generates (see :meth:`resolved`).
        train_adapter: ``False`` keeps the LoRA adapter as it is: only the heads learn, and every
            forward runs without gradients through the prefix cache (only with a policy head).
            ``"auto"``: ``False`` with a policy head, ``True`` without.
        learning_starts: steps collected before the first update (all of them train it: the policy
            does not change before); with a policy head, the sample its whitening is fitted from.
            ``"auto"``: 500 with a policy head, 0 without.
        head_learning_rate: as for every algorithm; ``"auto"``: with a policy head, the config's
            ``auto_head_learning_rate`` (a linear policy on unit-variance features: PPO ``1e-2``;
            A2C, REINFORCE and GRPO, with fewer gradient steps per episode, ``3e-2``), without one
            ``1e-3`` (the value head alone).
    """

    minibatch_size: int = 16
    gamma: float = 0.99
    gae_lambda: float = 0.95
    kl_coef: float = 0.05
    kl_direction: str = "forward"
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    normalize_advantages: bool = True
    max_importance_weight: float = 2.0
    auto_fields: ClassVar[tuple[str, ...]] = ("policy_head", "train_adapter", "learning_starts", "head_learning_rate")
    # What "auto" gives a scoring agent (resolved): the policy head's components, the steps its
    # whitening is fitted from, the heads' learning rate.
    auto_policy_head: ClassVar[int] = 64
    auto_learning_starts: ClassVar[int] = 500
    auto_head_learning_rate: ClassVar[float] = 1e-2
    policy_head: int | str = AUTO
    train_adapter: bool | str = AUTO
    learning_starts: int | str = AUTO
    head_learning_rate: float | str | None = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "policy_head", self.policy_head == AUTO or _count(self.policy_head),
               "must be 'auto', 0 (off) or a number of components")
        _check(self, "train_adapter", self.train_adapter == AUTO or isinstance(self.train_adapter, bool),
               "must be 'auto', True or False")
        head_possible = self.policy_head == AUTO or self.policy_head > 0
        _check(self, "train_adapter", self.train_adapter is not False or head_possible,
               "may be False only with a policy head (policy_head > 0): otherwise nothing but the critic would "
               "learn ('auto' gives a policy head only to an agent that scores its actions in this process)")
        _check(self, "learning_starts", self.learning_starts == AUTO or _count(self.learning_starts),
               "must be 'auto' or a non-negative number of steps")
        _check(self, "minibatch_size", self.minibatch_size >= 1, "must be at least 1")
        _check(self, "max_importance_weight", self.max_importance_weight >= 1, "must be at least 1")
        _check(self, "gamma", 0 <= self.gamma <= 1, "must lie in [0, 1]")
        _check(self, "gae_lambda", 0 <= self.gae_lambda <= 1, "must lie in [0, 1]")
        _check(self, "kl_coef", self.kl_coef >= 0, "must be non-negative")
        _check(self, "kl_direction", self.kl_direction in ("forward", "reverse"), "must be 'forward' or 'reverse'")
        _check(self, "vf_coef", self.vf_coef >= 0, "must be non-negative")

    def resolved(self, scoring: bool | None = None) -> OnPolicyConfig:
        """A copy with every ``"auto"`` field decided. ``scoring``: whether the agent scores candidate
        actions (and its backend serves the heads); the policy head is on only then (``None``,
        unknown: off, the setting that works in both modes). The measurements behind these values
        are in ``docs/algorithms.md``, "Heads on the model's features"."""
        head = self.policy_head if self.policy_head != AUTO else (self.auto_policy_head if scoring else 0)
        starts = self.auto_learning_starts if head else 0
        rate = self.auto_head_learning_rate if head else 1e-3
        return dataclasses.replace(
            self,
            policy_head=head,
            train_adapter=(not head) if self.train_adapter == AUTO else self.train_adapter,
            learning_starts=starts if self.learning_starts == AUTO else self.learning_starts,
            head_learning_rate=rate if self.head_learning_rate == AUTO else self.head_learning_rate,
        )


def _count(value) -> bool:
    """Whether ``value`` is a non-negative int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class Minibatch:
    """What an on-policy loss sees: steps, their re-evaluation, and the targets."""

    steps: list[Step]
    evaluation: StepEvaluation  # under the current parameters, with gradients
    new_logprobs: torch.Tensor  # [U] per unit (a scored step is one unit, a generated step one per token)
    old_logprobs: torch.Tensor  # [U] recorded when acting
    owner: torch.Tensor  # [U] step index of each unit
    unit_weights: torch.Tensor  # [U] 1 / units of the step: every step weighs the same
    advantages: torch.Tensor  # [S]
    returns: torch.Tensor  # [S]
    importance_weights: torch.Tensor | None = None  # [U] pi_prox / pi_behav of stale steps (capped), else None

    def unit_advantages(self) -> torch.Tensor:
        """Each unit's advantage; for steps acted by an older policy, times its importance weight."""
        adv = self.advantages[self.owner]
        return adv if self.importance_weights is None else adv * self.importance_weights

    def mean_over_steps(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Average of a per-unit quantity in which every step weighs the same."""
        return (per_unit * self.unit_weights).sum() / len(self.steps)


class OnPolicyAlgorithm(Algorithm):
    """Policy-gradient algorithms: collect episodes, compute targets, minimise a loss over minibatches.

    A subclass implements :meth:`policy_loss` and may override :meth:`compute_targets`; the
    loop adds the value loss (when ``uses_value``), the entropy bonus and the KL penalty to the
    reference policy, and handles epochs, minibatches, the optimizer step and statistics.
    """

    config_class: ClassVar[type] = OnPolicyConfig
    uses_value: ClassVar[bool] = True

    def __init__(self, policy: PolicyModel, config=None, seed: int | None = None) -> None:
        config = self.resolve_config(config)
        if config.policy_head:  # before the optimizer is built
            policy.add_head(POLICY_HEAD, whiten=config.policy_head)
            if policy.heads["value"].whiten != min(config.policy_head, policy.hidden_size):
                policy.replace_head("value", whiten=config.policy_head)
        super().__init__(policy, config, seed)

    def ready(self) -> bool:
        return super().ready() and (self.num_updates > 0 or self.buffer.num_steps >= self.config.learning_starts)

    def fit_whitening(self, steps: Sequence[Step]) -> bool:
        """Fit the policy and value heads' whitening from ``steps`` (once); returns whether it did."""
        heads = self.policy.heads
        if not self.config.policy_head or heads[POLICY_HEAD].fitted:
            return False
        scored = [s for s in steps if s.is_scored]
        if not scored:
            raise RLlamaError("a policy head (policy_head > 0) needs scored steps (candidate actions); "
                              "this batch was generated")
        prompt, action = self.policy.features([s.prompt_ids for s in scored], [s.candidate_ids for s in scored])
        heads[POLICY_HEAD].fit_whitening(action)
        if not heads["value"].fitted:
            heads["value"].fit_whitening(prompt)
        self._share_whitening([heads[POLICY_HEAD], heads["value"]])
        return True

    @torch.no_grad()
    def reference_distributions(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """Each step's action distribution under the reference policy (adapter disabled)."""
        return self.policy.reference_distributions(steps, self.config.minibatch_size)

    def compute_targets(self, batch: RolloutBatch, episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages [S], returns [S])``; the default is GAE from the value estimates made when acting."""
        return batch.advantages, batch.returns

    @abstractmethod
    def policy_loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy-gradient part of the loss and its statistics."""

    @property
    def epochs(self) -> int:
        return int(getattr(self.config, "epochs", 1))

    def update(self) -> dict[str, float]:
        cfg = self.config
        timer = Timer()
        episodes = self.buffer.episodes
        all_steps = [s for e in episodes for s in e.steps]
        if not cfg.train_adapter and not all(s.is_scored for s in all_steps):
            raise RLlamaError("train_adapter=False trains the policy head only, which needs scored steps "
                              "(candidate actions); generated steps need the adapter: set train_adapter=True "
                              "(or policy_head=0), or have the agent's scores_actions() return False")
        recomputed = self.recompute_behaviour(all_steps)
        proximal, staleness = self.proximal_logprobs(all_steps)
        self.fit_whitening(all_steps)
        batch = self.buffer.to_batch(cfg.gamma, cfg.gae_lambda, self.bootstrap_values(episodes))
        self.buffer.clear()
        advantages, returns = self.compute_targets(batch, episodes)
        if cfg.normalize_advantages and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        reference = self.reference_distributions(batch.steps) if cfg.kl_coef > 0 else None
        target_kl = getattr(cfg, "target_kl", None)

        sums: dict[str, float] = {}
        stats_weights: list[torch.Tensor] = []
        n_minibatches = 0
        tokens = tokens_of(batch.steps) if reference is not None else 0
        # Across processes every one takes the same number of gradient steps (the fewest minibatches any has).
        count = None
        if self.data_parallel is not None:
            count = self.data_parallel.min_int(-(-len(batch) // cfg.minibatch_size))
        for _epoch in range(self.epochs):
            stop = False
            for idx in batch.minibatches(cfg.minibatch_size, self.generator, count=count):
                rows = idx.tolist()
                steps = [batch.steps[i] for i in rows]
                ev = self.policy.evaluate_actions(steps, with_values=self.uses_value, frozen_body=not cfg.train_adapter)
                tokens += tokens_of(steps)
                new_lp, owner = ev.unit_logprobs()
                units_per_step = torch.bincount(owner, minlength=len(steps)).float()
                behaviour = old_unit_logprobs(steps).to(new_lp.device)
                weights = None
                if proximal:
                    # Decoupled PPO: the ratio is taken to the policy at the start of this update (proximal);
                    # the capped pi_prox / pi_behav corrects for the older policy that acted.
                    prox = torch.cat([proximal[id(s)].to(behaviour.device) if id(s) in proximal
                                      else behaviour.new_tensor(_units(s)) for s in steps])
                    weights = (prox - behaviour).exp().clamp(max=cfg.max_importance_weight)
                    behaviour = prox
                    stats_weights.append(weights)
                mb = Minibatch(
                    steps=steps, evaluation=ev, new_logprobs=new_lp, owner=owner, old_logprobs=behaviour,
                    unit_weights=1.0 / units_per_step[owner],
                    advantages=advantages[idx].to(new_lp.device), returns=returns[idx].to(new_lp.device),
                    importance_weights=weights,
                )
                pg_loss, stats = self.policy_loss(mb)
                entropy = ev.entropy.mean()
                loss = pg_loss - cfg.ent_coef * entropy
                stats["loss/policy"] = pg_loss.item()
                stats["policy/entropy"] = entropy.item()
                if self.uses_value:
                    v_loss = 0.5 * (ev.values - mb.returns).pow(2).mean()
                    loss = loss + cfg.vf_coef * v_loss
                    stats["loss/value"] = v_loss.item()
                if reference is not None:
                    kl_ref = kl_to_reference(ev, [reference[i] for i in rows], steps, cfg.kl_direction).mean()
                    loss = loss + cfg.kl_coef * kl_ref
                    stats["policy/kl_ref"] = kl_ref.item()
                with torch.no_grad():
                    log_ratio = new_lp - mb.old_logprobs
                    approx_kl = ((log_ratio.exp() - 1) - log_ratio).mean().item()
                stats["policy/approx_kl"] = approx_kl
                stats["train/grad_norm"] = self.optimizer_step(loss)
                stats["train/head_grad_norm"] = self.last_head_grad_norm
                stats["loss/total"] = loss.item()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                n_minibatches += 1
                if target_kl is not None and self._agree(approx_kl > 1.5 * target_kl):
                    stop = True
                    break
            if stop:
                break
        self.num_updates += 1
        out = {k: v / n_minibatches for k, v in sums.items()}
        out.update(
            {
                "rollout/episodes": float(len(episodes)),
                "rollout/steps": float(len(batch)),
                "rollout/mean_return": float(sum(e.total_reward for e in episodes) / len(episodes)),
                "train/minibatches": float(n_minibatches),
                "train/updates": float(self.num_updates),
                "time/update_s": timer(),
            }
        )
        out["time/update_tokens_per_s"] = tokens / max(out["time/update_s"], 1e-9)
        if recomputed:
            out["rollout/recomputed_steps"] = float(recomputed)
        if staleness:
            out["rollout/stale_steps"] = float(sum(1 for lag in staleness if lag > 0))
            out["rollout/mean_staleness"] = sum(staleness) / len(staleness)
        if stats_weights:
            w = torch.cat(stats_weights)
            out["policy/importance_weight"] = float(w.mean())
            out["policy/importance_weight_capped"] = float((w >= cfg.max_importance_weight).float().mean())
        if self.uses_value:
            out["value/explained_variance"] = explained_variance(batch.old_values, returns)
            out["value/mean"] = float(batch.old_values.mean())
        return out


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
        _check(self, "train_adapter", isinstance(self.train_adapter, bool), "must be True or False")
        _check(self, "whiten_features", isinstance(self.whiten_features, int) and self.whiten_features >= 0,
               "must be 0 (off) or a number of components")
        _check(self, "buffer_size", self.buffer_size >= 1, "must be at least 1")
        _check(self, "learning_starts", self.learning_starts >= 1, "must be at least 1")
        _check(self, "gradient_steps", self.gradient_steps >= 1, "must be at least 1")
        _check(self, "minibatch_size", self.minibatch_size >= 1, "must be at least 1")
        _check(self, "gamma", 0 <= self.gamma <= 1, "must lie in [0, 1]")
        _check(self, "tau", 0 < self.tau <= 1, "must lie in (0, 1]")
        _check(self, "target_update_interval", self.target_update_interval >= 1, "must be at least 1")


class OffPolicyAlgorithm(Algorithm):
    """Value-based algorithms: transitions go to a replay buffer; updates sample it.

    Subclasses name their state-action heads in ``q_heads`` (created on the policy, zero-initialised)
    and implement :meth:`train_step`. The target network is a snapshot of the adapter and the Q
    heads (:meth:`PolicyModel.snapshot`), never a copy of the base model.
    """

    config_class: ClassVar[type] = OffPolicyConfig
    requires_candidates: ClassVar[bool] = True
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
    def train_step(self, batch: list[Transition]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one sampled minibatch and its statistics."""

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
            loss, stats = self.train_step(sample)
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


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    """Put an optimizer's tensor state into ``tensors`` (keys ``prefix.state.<param>.<name>``);
    return the rest (hyperparameters, non-tensor state) as JSON-serialisable metadata."""
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{index}.{name}"] = value.detach().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, meta: dict,
                         tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for key, value in tensors.items():
        if key.startswith(head):
            index, name = key[len(head):].split(".", 1)
            state.setdefault(int(index), {})[name] = value.clone()
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def tokens_of(steps: Sequence[Step]) -> int:
    """Tokens a forward pass over ``steps`` processes: each prompt plus its candidates or its reply."""
    total = 0
    for s in steps:
        total += len(s.prompt_ids)
        total += sum(len(c) for c in s.candidate_ids) if s.candidate_ids is not None else len(s.response_ids or ())
    return total


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


def clipped_surrogate(mb: Minibatch, clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate loss ``-E[min(r A, clip(r, 1-eps, 1+eps) A)]`` over the minibatch's units."""
    ratio = (mb.new_logprobs - mb.old_logprobs).exp()
    adv = mb.unit_advantages()
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    clipfrac = ((ratio - 1).abs() > clip_range).float().mean().item()
    return -mb.mean_over_steps(surrogate), {"policy/clipfrac": clipfrac}


def _units(step: Step) -> list[float]:
    return [step.logprob] if step.is_scored else list(step.token_logprobs or ())


def old_unit_logprobs(steps: Sequence[Step]) -> torch.Tensor:
    """Log-probabilities recorded when acting, one per unit (see ``StepEvaluation.unit_logprobs``)."""
    parts = [[s.logprob] if s.is_scored else list(s.token_logprobs or ()) for s in steps]
    return torch.tensor([x for p in parts for x in p], dtype=torch.float32)


def kl_to_reference(new: StepEvaluation, reference: Sequence[torch.Tensor], steps: Sequence[Step],
                    direction: str = "reverse") -> torch.Tensor:
    """KL divergence between the policy and the reference per step, ``[S]``.

    ``direction="reverse"`` is ``KL(pi || pi_ref)``, ``"forward"`` is ``KL(pi_ref || pi)``. Scored
    steps get the exact divergence over their candidates. Generated steps get the mean over reply
    tokens (sampled from ``pi``) of a non-negative estimator with ``d = log p_ref - log p``:
    ``exp(d) - d - 1`` (reverse, Schulman's k3) or ``d exp(d) - exp(d) + 1`` (forward, the same
    f-divergence estimator for ``r log r``), since the full-vocabulary sums are not taken.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction={direction!r}; expected 'forward' or 'reverse'")
    out = []
    for dist, ref, step in zip(new.distributions, reference, steps):
        ref = ref.to(dist.device)
        if step.is_scored:
            p, q = (dist, ref) if direction == "reverse" else (ref, dist)
            out.append((p.exp() * (p - q)).sum())
        else:
            d = ref - dist
            e = torch.exp(d)
            out.append((e - d - 1).mean() if direction == "reverse" else (d * e - e + 1).mean())
    return torch.stack(out)


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - pred) / Var(target); nan when the target is constant."""
    var = target.var(unbiased=False)
    if var.item() == 0:
        return float("nan")
    return float(1 - (target - pred).var(unbiased=False) / var)


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
