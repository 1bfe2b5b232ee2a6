"""Policy-gradient algorithms (PPO, A2C, REINFORCE, GRPO): collect episodes, compute targets, minimise a
loss over minibatches."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from rllama.algorithms.base import AUTO, Algorithm, AlgorithmConfig, Timer, check_field, tokens_of
from rllama.algorithms.buffers import (
    Episode,
    RolloutBatch,
    Step,
)
from rllama.algorithms.losses import Minibatch, explained_variance, kl_to_reference, old_unit_logprobs, unit_logprobs_of
from rllama.errors import RLlamaError
from rllama.policy.model import POLICY_HEAD, PolicyModel


@dataclass
class OnPolicyConfig(AlgorithmConfig):
    """Settings shared by the on-policy algorithms.

    Attributes:
        minibatch_size: steps per gradient step.
        max_pass_tokens: the most tokens (prompts with their candidates or replies) one forward and
            backward pass of the learner holds; a larger minibatch is evaluated in several passes
            whose gradients add up to the one step (gradient accumulation): the same step, in the
            memory of a pass. A step longer than this is a pass alone. ``None``: the whole minibatch
            in one pass. A loss that is not a mean over the minibatch's steps (every built-in one
            is: :meth:`Minibatch.mean_over_steps`) needs ``None``.
        max_importance_weight: cap of the importance weight ``pi_prox / pi_behav`` that corrects steps
            acted by an older policy (asynchronous training, :mod:`rllama.async_rl`); unused when every
            step is on-policy.
        gamma: discount factor.
        gae_lambda: GAE lambda.
        kl_coef: weight of the KL divergence to the reference policy (the base model with the
            adapter disabled) in the loss; 0 turns the reference pass off, as does a batch of scored
            steps without the model's own scores (``score_normalization="none"``: their reference
            would be uniform).
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
        lr_decay_episodes: ``None`` (default) keeps the learning rates constant; a number of episodes
            lowers every rate (adapter and heads) linearly, update by update, from its value to
            ``lr_decay_to`` times it over that many trained episodes, and holds it there after (as
            CleanRL's ``anneal_lr``, with a floor): a policy found late keeps moving under full-size
            steps, and smaller ones let it settle (Blackjack, the adapter alone: docs/algorithms.md).
        lr_decay_to: the fraction of each rate that ``lr_decay_episodes`` ends at, in ``[0, 1]``.
        lr_decay_start: trained episodes before the decay begins (0: from the start); the rates fall
            over the ``lr_decay_episodes`` after it.
        head_learning_rate: as for every algorithm; ``"auto"``: with a policy head, the config's
            ``auto_head_learning_rate`` (a linear policy on unit-variance features: PPO ``1e-2``;
            A2C, REINFORCE and GRPO, with fewer gradient steps per episode, ``3e-2``), without one
            ``1e-3`` (the value head alone).

    An algorithm may also let ``learning_rate``, ``batch_episodes`` and ``minibatch_size`` be
    ``"auto"`` (PPO does): they then take ``auto_adapter_alone`` when the adapter alone is the
    policy (``policy_head=0``: every generating agent, and a scoring agent without a head), and
    ``auto_otherwise`` beside a policy head.
    """

    minibatch_size: int = 16
    max_pass_tokens: int | None = 4096
    gamma: float = 0.99
    gae_lambda: float = 0.95
    kl_coef: float = 0.05
    kl_direction: str = "forward"
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    normalize_advantages: bool = True
    max_importance_weight: float = 2.0
    lr_decay_episodes: int | None = None
    lr_decay_to: float = 0.1
    lr_decay_start: int = 0
    auto_fields: ClassVar[tuple[str, ...]] = ("policy_head", "train_adapter", "learning_starts", "head_learning_rate")
    # What "auto" gives a scoring agent (resolved): the policy head's components, the steps its
    # whitening is fitted from, the heads' learning rate.
    auto_policy_head: ClassVar[int] = 64
    auto_learning_starts: ClassVar[int] = 500
    auto_head_learning_rate: ClassVar[float] = 1e-2
    # What "auto" gives learning_rate, batch_episodes and minibatch_size, for an algorithm that lists
    # them in auto_fields: when the adapter alone is a scoring agent's policy, and otherwise.
    auto_adapter_alone: ClassVar[dict[str, float | int]] = {}
    auto_otherwise: ClassVar[dict[str, float | int]] = {}
    policy_head: int | str = AUTO
    train_adapter: bool | str = AUTO
    learning_starts: int | str = AUTO
    head_learning_rate: float | str | None = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "policy_head", self.policy_head == AUTO or _count(self.policy_head),
               "must be 'auto', 0 (off) or a number of components")
        check_field(self, "train_adapter", self.train_adapter == AUTO or isinstance(self.train_adapter, bool),
               "must be 'auto', True or False")
        head_possible = self.policy_head == AUTO or self.policy_head > 0
        check_field(self, "train_adapter", self.train_adapter is not False or head_possible,
               "may be False only with a policy head (policy_head > 0): otherwise nothing but the critic would "
               "learn ('auto' gives a policy head only to an agent that scores its actions in this process)")
        check_field(self, "learning_starts", self.learning_starts == AUTO or _count(self.learning_starts),
               "must be 'auto' or a non-negative number of steps")
        check_field(self, "minibatch_size", self.is_auto("minibatch_size") or _count(self.minibatch_size)
                    and self.minibatch_size >= 1, "must be a positive integer" + self.or_auto("minibatch_size"))
        check_field(self, "max_pass_tokens", self.max_pass_tokens is None or _count(self.max_pass_tokens)
                    and self.max_pass_tokens >= 1, "must be None (one pass) or a positive number of tokens")
        check_field(self, "max_importance_weight", self.max_importance_weight >= 1, "must be at least 1")
        check_field(self, "gamma", 0 <= self.gamma <= 1, "must lie in [0, 1]")
        check_field(self, "gae_lambda", 0 <= self.gae_lambda <= 1, "must lie in [0, 1]")
        check_field(self, "kl_coef", self.kl_coef >= 0, "must be non-negative")
        check_field(self, "kl_direction", self.kl_direction in ("forward", "reverse"), "must be 'forward' or 'reverse'")
        check_field(self, "vf_coef", self.vf_coef >= 0, "must be non-negative")
        check_field(self, "lr_decay_episodes", self.lr_decay_episodes is None or _count(self.lr_decay_episodes)
                    and self.lr_decay_episodes >= 1, "must be None (constant rates) or a positive number of episodes")
        check_field(self, "lr_decay_start", _count(self.lr_decay_start), "must be a non-negative number of episodes")
        check_field(self, "lr_decay_to", isinstance(self.lr_decay_to, (int, float))
                    and not isinstance(self.lr_decay_to, bool) and 0 <= self.lr_decay_to <= 1, "must lie in [0, 1]")

    def resolved(self, scoring: bool | None = None) -> OnPolicyConfig:
        """A copy with every ``"auto"`` field decided. ``scoring``: whether the agent scores candidate
        actions (and its backend serves the heads); the policy head is on only then (``None``,
        unknown: off, the setting that works in both modes). The measurements behind these values
        are in ``docs/algorithms.md``, "Heads on the model's features"."""
        head = self.policy_head if self.policy_head != AUTO else (self.auto_policy_head if scoring else 0)
        starts = self.auto_learning_starts if head else 0
        rate = self.auto_head_learning_rate if head else 1e-3
        # The adapter alone is the policy without a head, in either mode: scoring (benchmarks/README.md,
        # "The adapter alone") and generating (the generate-mode section) learn at the same sizes.
        sizes = self.auto_otherwise if head else self.auto_adapter_alone
        return dataclasses.replace(
            self,
            **{name: value for name, value in sizes.items() if self.is_auto(name)},
            policy_head=head,
            train_adapter=(not head) if self.train_adapter == AUTO else self.train_adapter,
            learning_starts=starts if self.learning_starts == AUTO else self.learning_starts,
            head_learning_rate=rate if self.head_learning_rate == AUTO else self.head_learning_rate,
        )


def split_by_tokens(steps: Sequence[Step], limit: int | None) -> list[int]:
    """Sizes of consecutive runs of ``steps`` of at most ``limit`` tokens each (:func:`tokens_of`); a
    step longer than ``limit`` is a run alone. ``None``: one run."""
    if limit is None:
        return [len(steps)]
    sizes, tokens = [], 0
    for step in steps:
        n = tokens_of([step])
        if sizes and tokens + n <= limit:
            sizes[-1] += 1
            tokens += n
        else:
            sizes.append(1)
            tokens = n
    return sizes


def _count(value) -> bool:
    """Whether ``value`` is a non-negative int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class OnPolicyAlgorithm(Algorithm):
    """Policy-gradient algorithms: collect episodes, compute targets, minimise a loss over minibatches.

    A subclass implements :meth:`policy_loss` and may override :meth:`compute_targets`; :meth:`loss`
    adds the value loss (when ``uses_value``), the entropy bonus and the KL penalty to the reference
    policy (a subclass may override it to write its whole objective, as PPO does, from the terms
    :meth:`entropy`, :meth:`value_loss` and :meth:`kl_to_reference`). An update is :meth:`prepare`
    (targets, the reference, the proximal log-probs), :meth:`gradient_step` per minibatch, and
    :meth:`finish` (statistics); :meth:`update` makes one pass, PPO and GRPO write their epochs out.
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
        self.base_learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.episodes_trained = 0

    def default_score_normalization(self, scoring: bool) -> str:
        """``"none"`` when the policy head on the frozen adapter's features chooses among scored candidates
        (the defaults for a scoring agent), else ``"mean"``. The model's likelihood of the candidate words
        is a prior that depends on the words a user picks, and the head first has to unlearn it: on
        Blackjack with "stand"/"hit" after "Player sum: ...", PPO, A2C, REINFORCE and GRPO beside the
        scores stayed at map values of -0.12 to -0.17 for 3,200 episodes and reached -0.064 to -0.084
        without them (``benchmarks/README.md``, "A user's own agent"). Where the adapter learns it is the
        policy, or part of it, and the scores stay."""
        head_alone = POLICY_HEAD in self.policy.heads and not self.trains_adapter
        return "none" if scoring and head_alone else "mean"

    def learning_rate_scale(self) -> float:
        """The factor every learning rate is multiplied by for the next update (``lr_decay_episodes``)."""
        cfg = self.config
        if cfg.lr_decay_episodes is None:
            return 1.0
        done = min(max(self.episodes_trained - cfg.lr_decay_start, 0) / cfg.lr_decay_episodes, 1.0)
        return 1.0 - (1.0 - cfg.lr_decay_to) * done

    def state_dict(self):
        tensors, meta = super().state_dict()
        meta["episodes_trained"] = self.episodes_trained
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        # States saved before the count was kept: every update took one batch.
        self.episodes_trained = int(meta.get("episodes_trained", self.num_updates * self.config.batch_episodes))

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

    def loss(self, mb: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The minibatch's whole objective and its statistics. The default adds the shared terms to
        :meth:`policy_loss`: ``policy_loss - ent_coef * entropy + vf_coef * value_loss + kl_coef * KL``
        (the value term when the algorithm has a critic, the KL term when ``kl_coef > 0``); an
        algorithm may write its own out instead, as PPO does."""
        cfg = self.config
        pg_loss, stats = self.policy_loss(mb)
        entropy = self.entropy(mb)
        loss = pg_loss - cfg.ent_coef * entropy
        stats.update({"loss/policy": pg_loss.item(), "policy/entropy": entropy.item()})
        if self.uses_value:
            v_loss = self.value_loss(mb)
            loss = loss + cfg.vf_coef * v_loss
            stats["loss/value"] = v_loss.item()
        if mb.reference is not None:
            kl_ref = self.kl_to_reference(mb)
            loss = loss + cfg.kl_coef * kl_ref
            stats["policy/kl_ref"] = kl_ref.item()
        return loss, stats

    @staticmethod
    def entropy(mb: Minibatch) -> torch.Tensor:
        """The policy's mean entropy over the minibatch's steps (per token for free generated steps)."""
        return mb.evaluation.entropy.mean()

    @staticmethod
    def value_loss(mb: Minibatch) -> torch.Tensor:
        """``E[(V(s) - R)^2] / 2`` over the minibatch's steps."""
        return 0.5 * (mb.evaluation.values - mb.returns).pow(2).mean()

    def kl_to_reference(self, mb: Minibatch) -> torch.Tensor:
        """The mean KL divergence to the reference policy (``kl_direction``) over the minibatch's steps."""
        return kl_to_reference(mb.evaluation, mb.reference, mb.steps, self.config.kl_direction).mean()

    # ------------------------------------------------------------------ the update, in three parts
    def update(self) -> dict[str, float]:
        """One pass over the batch in minibatches (A2C, REINFORCE). PPO and GRPO write their own: epochs
        of :meth:`gradient_step` between the same :meth:`prepare` and :meth:`finish`."""
        data = self.prepare()
        stats = StatSums()
        for idx in self.minibatches(data):
            stats.add(self.gradient_step(data, idx))
        return self.finish(data, stats)

    def prepare(self, trainable: Callable[[Episode], bool] | None = None) -> UpdateData:
        """Take the episodes to train on from the buffer (``trainable``'s, default all; the others wait
        for a later update) and compute what every gradient step of the update reads: the learner's
        log-probs of steps another policy acted (the proximal policy, with the importance-weight
        statistics), the heads' whitening (first update), targets from :meth:`compute_targets`
        (advantages standardised if ``normalize_advantages``), and the reference policy's
        distributions when ``kl_coef > 0``."""
        cfg = self.config
        timer = Timer()
        if not cfg.train_adapter and not all(s.is_scored for e in self.buffer.episodes for s in e.steps):
            raise RLlamaError("train_adapter=False trains the policy head only, which needs scored steps "
                              "(candidate actions); generated steps need the adapter: set train_adapter=True "
                              "(or policy_head=0), or have the agent's scores_actions() return False")
        taken = self.buffer.take(trainable)
        episodes = taken.episodes
        scale = self.learning_rate_scale()
        for group, base in zip(self.optimizer.param_groups, self.base_learning_rates):
            group["lr"] = base * scale
        self.episodes_trained += len(episodes)
        all_steps = [s for e in episodes for s in e.steps]
        proximal, staleness, correction = self.proximal_logprobs(all_steps)
        self.fit_whitening(all_steps)
        batch = taken.to_batch(cfg.gamma, cfg.gae_lambda, self.bootstrap_values(episodes))
        advantages, returns = self.compute_targets(batch, episodes)
        if cfg.normalize_advantages and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        # Without the model's scores a scored step's reference is uniform: nothing of the model's to stay near.
        anchored = self.policy.uses_scores or not all(s.is_scored for s in batch.steps)
        reference = self.reference_distributions(batch.steps) if cfg.kl_coef > 0 and anchored else None
        # Across processes every one takes the same number of gradient steps (the fewest minibatches any has).
        count = None
        if self.data_parallel is not None:
            count = self.data_parallel.min_int(-(-len(batch) // cfg.minibatch_size))
        return UpdateData(episodes, batch, advantages, returns, reference, proximal, staleness, correction, count,
                          timer, tokens=tokens_of(batch.steps) if reference is not None else 0)

    def minibatches(self, data: UpdateData):
        """One shuffled pass over the batch: index tensors of ``minibatch_size`` steps."""
        return data.batch.minibatches(self.config.minibatch_size, self.generator, count=data.count)

    def gradient_step(self, data: UpdateData, idx: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the steps ``idx`` of the batch: evaluate them under the current weights,
        take :meth:`loss`, step; returns the minibatch's statistics (``policy/approx_kl`` among them).

        A minibatch of more than ``max_pass_tokens`` tokens is evaluated in several passes, each
        pass's loss weighted by its share of the steps and its gradient added to the others' before
        the one step: the step of one pass (every loss is a mean over the minibatch's steps), in the
        memory of a pass."""
        rows = idx.tolist()
        passes = split_by_tokens([data.batch.steps[i] for i in rows], self.config.max_pass_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        total, stats, log_ratios, start = 0.0, {}, [], 0
        for size in passes:
            share = size / len(rows)
            mb = self.minibatch(data, rows[start:start + size])
            start += size
            loss, part = self.loss(mb)
            (loss * share).backward()
            total += share * loss.item()
            for key, value in part.items():
                stats[key] = stats.get(key, 0.0) + share * value
            log_ratios.append((mb.new_logprobs - mb.old_logprobs).detach())
        log_ratio = torch.cat(log_ratios)
        stats["policy/approx_kl"] = ((log_ratio.exp() - 1) - log_ratio).mean().item()
        stats["train/grad_norm"] = self.step_gradients(total)
        stats["train/head_grad_norm"] = self.last_head_grad_norm
        stats["loss/total"] = total
        return stats

    def minibatch(self, data: UpdateData, rows: list[int]) -> Minibatch:
        """The steps ``rows`` of the batch evaluated under the current weights, with their targets."""
        cfg = self.config
        steps = [data.batch.steps[i] for i in rows]
        ev = self.policy.evaluate_actions(steps, with_values=self.uses_value, frozen_body=not cfg.train_adapter)
        data.tokens += tokens_of(steps)
        new_lp, owner = ev.unit_logprobs()
        units_per_step = torch.bincount(owner, minlength=len(steps)).float()
        behaviour = old_unit_logprobs(steps).to(new_lp.device)
        weights = None
        if data.proximal:
            # Decoupled PPO: the ratio is taken to the policy at the start of this update (proximal);
            # the capped pi_prox / pi_behav corrects for the policy that acted (an older one, or an
            # engine whose numerics differ: truncated importance sampling).
            prox = torch.cat([data.proximal[id(s)].to(behaviour.device) if id(s) in data.proximal
                              else behaviour.new_tensor(unit_logprobs_of(s)) for s in steps])
            weights = (prox - behaviour).exp().clamp(max=cfg.max_importance_weight)
            behaviour = prox
            data.importance_weights.append(weights)
        idx = torch.tensor(rows, dtype=torch.long)
        return Minibatch(
            steps=steps, evaluation=ev, new_logprobs=new_lp, owner=owner, old_logprobs=behaviour,
            unit_weights=1.0 / units_per_step[owner],
            advantages=data.advantages[idx].to(new_lp.device), returns=data.returns[idx].to(new_lp.device),
            importance_weights=weights, reference=None if data.reference is None else [data.reference[i] for i in rows],
        )

    def finish(self, data: UpdateData, stats: StatSums) -> dict[str, float]:
        """The update's statistics: the minibatches' means, and the batch's."""
        cfg = self.config
        self.num_updates += 1
        episodes, batch = data.episodes, data.batch
        out = stats.means()
        out.update(
            {
                "rollout/episodes": float(len(episodes)),
                "rollout/steps": float(len(batch)),
                "rollout/mean_return": float(sum(e.total_reward for e in episodes) / len(episodes)),
                "train/minibatches": float(stats.count),
                "train/updates": float(self.num_updates),
                "train/learning_rate": float(self.optimizer.param_groups[0]["lr"]),
                "time/update_s": data.timer(),
            }
        )
        out["time/update_tokens_per_s"] = data.tokens / max(out["time/update_s"], 1e-9)
        out.update(data.correction)
        if data.staleness:
            out["rollout/stale_steps"] = float(sum(1 for lag in data.staleness if lag > 0))
            out["rollout/mean_staleness"] = sum(data.staleness) / len(data.staleness)
        if data.importance_weights:
            w = torch.cat(data.importance_weights)
            out["policy/importance_weight"] = float(w.mean())
            out["policy/importance_weight_capped"] = float((w >= cfg.max_importance_weight).float().mean())
        if self.uses_value:
            out["value/explained_variance"] = explained_variance(batch.old_values, data.returns)
            out["value/mean"] = float(batch.old_values.mean())
        return out


@dataclass
class UpdateData:
    """What the gradient steps of one update read (:meth:`OnPolicyAlgorithm.prepare`)."""

    episodes: list[Episode]
    batch: RolloutBatch
    advantages: torch.Tensor  # [S], standardised if the config says so
    returns: torch.Tensor  # [S], the value head's targets
    reference: list[torch.Tensor] | None  # per step, the reference policy's distribution (kl_coef > 0)
    proximal: dict[int, torch.Tensor]  # id(step) -> the learner's log-probs of a step another policy acted
    staleness: list[int]  # every step's lag in updates, [] when none is stale
    correction: dict[str, float]  # statistics of the engine-learner mismatch
    count: int | None  # minibatches a pass takes (data-parallel processes agree on it), else None
    timer: Timer
    tokens: int = 0  # tokens through the model so far (for time/update_tokens_per_s)
    importance_weights: list[torch.Tensor] = dataclasses.field(default_factory=list)


class StatSums:
    """Running sums of the minibatches' statistics; :meth:`means` averages them."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}
