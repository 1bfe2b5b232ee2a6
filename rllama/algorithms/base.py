"""The algorithm interface.

"The policy acts, the algorithm updates it": an :class:`Algorithm` receives finished episodes from
the agent (:meth:`Algorithm.add_episode`), says when it has enough (:meth:`Algorithm.ready`) and
turns them into parameter updates of the policy's adapter and heads (:meth:`Algorithm.update`),
returning a dict of statistics. It never sees the environment, the agent or memory. The two
families are in :mod:`rllama.algorithms.on_policy` and :mod:`rllama.algorithms.off_policy`; the
loss terms they share in :mod:`rllama.algorithms.losses`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rllama.algorithms.buffers import (
    Episode,
    RolloutBuffer,
    Step,
    episode_from_dict,
    episode_to_dict,
    unit_logprobs_of,
)
from rllama.distributed import current as current_data_parallel
from rllama.errors import RLlamaError
from rllama.policy.model import POLICY_HEAD, CandidateOutputs, PolicyModel

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
        check_field(self, "batch_episodes", self.is_auto("batch_episodes") or _positive_int(self.batch_episodes),
                    "must be a positive integer" + self.or_auto("batch_episodes"))
        check_field(self, "learning_rate", self.is_auto("learning_rate") or _positive(self.learning_rate),
                    "must be positive" + self.or_auto("learning_rate"))
        rate = self.head_learning_rate
        check_field(self, "head_learning_rate",
               rate is None or (rate == AUTO and "head_learning_rate" in self.auto_fields)
               or (isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0),
               "must be positive or None" + (" or 'auto'" if "head_learning_rate" in self.auto_fields else ""))
        check_field(self, "max_grad_norm", self.max_grad_norm > 0, "must be positive")
        check_field(self, "weight_decay", self.weight_decay >= 0, "must be non-negative")

    def is_auto(self, name: str) -> bool:
        """Whether field ``name`` is ``"auto"`` and may be (it is one of ``auto_fields``)."""
        return getattr(self, name) == AUTO and name in self.auto_fields

    def or_auto(self, name: str) -> str:
        """``" or 'auto'"`` for a field that may be ``"auto"``, for error messages."""
        return " or 'auto'" if name in self.auto_fields else ""

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


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_field(config, name: str, ok: bool, what: str) -> None:
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
    keeps_episodes: ClassVar[bool] = True
    """Whether finished episodes wait in ``self.buffer``, a :class:`RolloutBuffer` (checkpointed with
    the algorithm), until an update uses them: what the default :meth:`add_episode` and :meth:`ready`
    do. Algorithms that keep experience otherwise (the off-policy ones: a replay buffer) set it
    ``False``, override both, and have no ``self.buffer``."""

    def __init__(self, policy: PolicyModel, config=None, seed: int | None = None) -> None:
        self.policy = policy
        self.config = config = self.resolve_config(config)
        self.generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        if self.keeps_episodes:
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

    def learns_scored_choices(self) -> bool:
        """Whether something this algorithm trains decides among scored candidates without the model's
        own scores (a policy head, or Q heads that choose): what ``score_normalization="none"`` needs."""
        return POLICY_HEAD in self.policy.heads

    def default_score_normalization(self, scoring: bool) -> str:
        """What an agent's ``score_normalization="auto"`` becomes with this algorithm (``scoring``: the agent
        scores candidates in this process): ``"mean"``, the model's scores in the policy. The on-policy
        algorithms leave them out where their policy head alone learns (:class:`OnPolicyAlgorithm`)."""
        return "mean"

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
    def proximal_logprobs(self, steps: Sequence[Step]) -> tuple[dict[int, torch.Tensor], list[int], dict[str, float]]:
        """The learner's own log-probs of the steps another policy acted, for the importance weights
        ``pi_prox / pi_behav`` that correct for it: steps acted by an older policy of this learner
        (``policy_version < num_updates``: asynchronous workers) and steps acted outside the learner
        (``learner_recompute``: an engine or server, :mod:`rllama.backends`).

        One pass over those steps under the current weights refreshes their values too (advantages from
        the current critic; engines give none). Returns ``({id(step): log-probs per unit}, every step's
        staleness in updates or ``[]`` when none is stale, statistics)``; the statistics say how far
        the engine's log-probs are from the learner's (``rollout/engine_logprob_diff_mean``, ``_max``:
        mean and largest ``|Δ log p|`` per unit) and how many steps were recomputed. A step acted
        outside the learner without usable log-probs (none recorded, or not one per unit) takes the
        learner's as its behaviour log-probs: no correction, rather than a wrong one.
        """
        lags = [self.num_updates - s.policy_version if s.policy_version is not None else 0 for s in steps]
        todo = [s for s, lag in zip(steps, lags) if lag > 0 or s.learner_recompute]
        recomputed = sum(1 for s in todo if s.learner_recompute)
        out: dict[int, torch.Tensor] = {}
        diffs: list[torch.Tensor] = []
        for step, dist, value in self._evaluate_in_chunks(todo):
            step.value = value
            index = step.unit_index
            mine = (dist[index : index + 1] if index is not None else dist).float().cpu()
            if step.learner_recompute:
                recorded = torch.tensor(unit_logprobs_of(step), dtype=torch.float32)
                if recorded.shape != mine.shape or not torch.isfinite(recorded).all():
                    _set_unit_logprobs(step, mine)  # behaviour = the learner's: nothing to correct
                elif step.policy_version is None or step.policy_version == self.num_updates:
                    diffs.append((mine - recorded).abs())
                step.learner_recompute = False
            out[id(step)] = mine
        stats: dict[str, float] = {}
        if recomputed:
            stats["rollout/recomputed_steps"] = float(recomputed)
        if diffs:
            d = torch.cat(diffs)
            stats["rollout/engine_logprob_diff_mean"] = float(d.mean())
            stats["rollout/engine_logprob_diff_max"] = float(d.max())
        return out, (lags if any(lag > 0 for lag in lags) else []), stats

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
        optimizer's hyperparameters, counters, the buffered episodes when :attr:`keeps_episodes`).
        Subclasses with more state extend both (and :meth:`load_state_dict`).
        """
        tensors = {"generator": self.generator.get_state()}
        meta: dict[str, Any] = {"name": self.name, "num_updates": self.num_updates}
        meta["optimizer"] = optimizer_state("optimizer", self.optimizer, tensors)
        if self.keeps_episodes:
            meta["buffer"] = [episode_to_dict(e) for e in self.buffer.episodes]
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the policy's weights are loaded separately)."""
        if meta.get("name") != self.name:
            raise RLlamaError(f"checkpoint state is of algorithm {meta.get('name')!r}, not {self.name!r}")
        self.generator.set_state(tensors["generator"])
        self.num_updates = int(meta["num_updates"])
        load_optimizer_state("optimizer", self.optimizer, meta["optimizer"], tensors)
        if self.keeps_episodes:
            self.buffer.episodes = [episode_from_dict(e) for e in meta["buffer"]]
        # Otherwise a "buffer" in the checkpoint is ignored: older versions saved every algorithm's,
        # always empty for those that keep no episodes (they never added to it).

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
        return self.step_gradients(loss.item())

    def step_gradients(self, loss: float) -> float:
        """Clip and step on the gradients already accumulated (``optimizer_step`` after its backward, or
        after several passes' backward, see :meth:`OnPolicyAlgorithm.gradient_step`); ``loss`` is only
        checked for being finite. Returns the adapter's gradient norm before clipping."""
        groups = self.optimizer.param_groups
        adapter, heads = groups[0]["params"], [p for group in groups[1:] for p in group["params"]]
        if self.data_parallel is not None:  # a frozen adapter has no gradients to average (nor to step)
            self.data_parallel.average_gradients(self.policy.trainable_parameters() if self.trains_adapter else heads)
        norm = torch.nn.utils.clip_grad_norm_(adapter, self.config.max_grad_norm)
        self.last_head_grad_norm = float(torch.nn.utils.clip_grad_norm_(heads, self.config.max_grad_norm))
        if self._agree(not all(math.isfinite(x) for x in (loss, float(norm), self.last_head_grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            raise RLlamaError(
                f"{type(self).__name__}: this update's loss or gradient is not finite (loss {float(loss):.4g}, "
                f"adapter grad norm {float(norm):.4g}, heads {self.last_head_grad_norm:.4g}); the step was not "
                "taken, so the weights stay finite. Rewards of a huge scale or a too high learning rate do this: "
                "scale the rewards down or lower learning_rate."
            )
        self.optimizer.step()
        return float(norm)


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


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def _set_unit_logprobs(step: Step, logprobs: torch.Tensor) -> None:
    """Record ``logprobs`` (one per unit) as the log-probs ``step`` was acted with."""
    if step.unit_index is not None:
        step.logprob = float(logprobs[0])
    else:
        step.token_logprobs = logprobs.tolist()
        step.logprob = float(logprobs.sum())
