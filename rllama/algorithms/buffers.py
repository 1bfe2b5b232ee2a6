"""Experience containers and advantage estimation, shared by every algorithm.

An agent step is one prompt and the reply the policy chose. In *scoring* mode the reply is one of
several candidate action texts, and the policy is the softmax over the candidates' scores; in
*generate* mode the reply is free text sampled token by token. Both kinds live in the same
:class:`Step` so that one buffer and one loss serve both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Step:
    """One decision of the agent and what followed it.

    Attributes:
        prompt_ids: token ids of the whole chat up to (and including) the assistant header.
        candidate_ids: scoring mode: token ids of every candidate action (each ends with the
            end-of-turn token); ``None`` in generate mode.
        action_index: scoring mode: index of the chosen candidate.
        response_ids: generate mode: token ids of the sampled reply (ends with the stop token when
            one was produced); ``None`` in scoring mode.
        logprob: log-probability of the chosen reply under the policy that acted.
        token_logprobs: generate mode: per-token log-probabilities under the acting policy.
        value: value estimate of the prompt under the acting policy.
        reward: reward received after this step (summed when assigned several times).
        text: the reply text, as given to ``extract_action``.
        action: what ``extract_action`` returned (what the environment received).
        learner_recompute: the step was acted by a policy other than the learner's model (a
            generation server, :mod:`rllama.backends`): its ``value`` is unknown (NaN) and the learner
            recomputes ``value`` and the behaviour log-probs under its own weights before the update.
        choice_ids: generate mode with declared choices (:mod:`rllama.replies`): each choice's token ids;
            the reply was sampled from the model restricted to them, token by token (under
            ``score_normalization="relative"``, as a whole choice from the same distribution, relative to
            the base model's). The learner treats such a step as one decision among the choices, as a
            scored step: one unit, whose entropy and KL are exact over the choices.
        reply_grammar: generate mode with a declared :class:`~rllama.replies.Regex` or
            :class:`~rllama.replies.Grammar`: the compiled grammar (llguidance's JSON) the reply was
            sampled under; the learner recomputes its masks from it (:mod:`rllama.replies`).
        policy_version: the learner's update count when the acting weights were made (the
            algorithm's ``num_updates``); older than the learner's at update time means stale
            (asynchronous rollout workers, :mod:`rllama.async_rl`).
        invalid_reply: generate mode: the reply was not in the form the agent reads (``extract_action``
            failed on it, or ``is_valid_reply`` said no).
        shaping: reward the agent adds to the step itself (the ``format_penalty`` of an invalid reply).
            The algorithms train on ``reward + shaping`` (:attr:`training_reward`); returns reported
            and written to logs are the environment's alone.
    """

    prompt_ids: list[int]
    candidate_ids: list[list[int]] | None = None
    action_index: int | None = None
    response_ids: list[int] | None = None
    logprob: float = 0.0
    token_logprobs: list[float] | None = None
    value: float = 0.0
    reward: float = 0.0
    text: str = ""
    action: Any = None
    learner_recompute: bool = False
    policy_version: int | None = None
    choice_ids: list[list[int]] | None = None
    reply_grammar: str | None = None
    invalid_reply: bool = False
    shaping: float = 0.0

    @property
    def training_reward(self) -> float:
        """What the algorithms learn from: the environment's reward plus the agent's own shaping."""
        return self.reward + self.shaping

    @property
    def is_scored(self) -> bool:
        """Whether the action was chosen by scoring candidates (rather than generated)."""
        return self.candidate_ids is not None

    @property
    def unit_index(self) -> int | None:
        """Where the step is one decision among listed ones, the index of the one taken: the scored candidate,
        or the declared choice replied (its distribution is over the whole choices); ``None`` for a free
        reply, which is one unit per token."""
        if self.is_scored:
            return self.action_index
        if self.choice_ids is None:
            return None
        response = list(map(int, self.response_ids or ()))
        for k, choice in enumerate(self.choice_ids):
            if list(map(int, choice)) == response:
                return k
        raise ValueError(f"the reply {response} is none of the step's declared choices "
                         f"{[list(c) for c in self.choice_ids]}")


def unit_logprobs_of(step: Step) -> list[float]:
    """A step's log-probabilities recorded when acting, one per unit (a scored step, or a reply to declared
    choices, is one unit: the whole reply's log-probability)."""
    return [step.logprob] if step.unit_index is not None else list(step.token_logprobs or ())



@dataclass
class Episode:
    """A finished episode of one environment.

    ``bootstrap``: for a truncated episode, the state it was cut in as a step with no action (its
    prompt and, in scoring mode, its candidates), when the loop passed the final observation; the
    algorithms complete the return with its value (or Q-values).
    """

    steps: list[Step]
    env_id: int = 0
    truncated: bool = False
    info: dict = field(default_factory=dict)
    bootstrap: Step | None = None

    @property
    def total_reward(self) -> float:
        """Undiscounted return (the environment's rewards)."""
        return float(sum(s.reward for s in self.steps))

    @property
    def training_return(self) -> float:
        """Undiscounted return the algorithms learn from (with the steps' shaping)."""
        return float(sum(s.training_reward for s in self.steps))

    def __len__(self) -> int:
        return len(self.steps)


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float, last_value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over one episode.

    Args:
        rewards: ``[T]`` rewards.
        values: ``[T]`` value estimates of the states the rewards followed.
        gamma: discount factor.
        lam: GAE lambda (1 gives Monte-Carlo returns minus the baseline, 0 one-step TD).
        last_value: value of the state after the last step (0 when the episode terminated).

    Returns:
        ``(advantages, returns)``, both ``[T]``, with ``returns = advantages + values``.
    """
    T = len(rewards)
    advantages = np.zeros(T, dtype=np.float64)
    next_value, running = last_value, 0.0
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + np.asarray(values, dtype=np.float64)


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo discounted return from every step of one episode."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


@dataclass
class RolloutBatch:
    """Flattened steps of several episodes with their advantage targets."""

    steps: list[Step]
    advantages: torch.Tensor  # [S]
    returns: torch.Tensor  # [S]
    old_values: torch.Tensor  # [S]

    def __len__(self) -> int:
        return len(self.steps)

    def minibatches(self, size: int, generator: torch.Generator, count: int | None = None) -> Iterator[torch.Tensor]:
        """Yield shuffled index tensors of at most ``size`` steps covering the batch once.

        Steps are shuffled, then sorted by prompt length within windows of four minibatches, so
        each minibatch holds prompts of similar length (less padding); minibatch order is shuffled.
        With ``count`` (data-parallel processes must agree on it), the batch is split into exactly
        ``count`` minibatches of near-equal size instead, which may exceed ``size``.
        """
        order = torch.randperm(len(self.steps), generator=generator).tolist()
        if count is not None:
            if not 1 <= count <= len(order):
                raise ValueError(f"count={count}; expected 1 to {len(order)} minibatches")
            size = -(-len(order) // count)
        window = 4 * size
        chunks = []
        for start in range(0, len(order), window):
            part = sorted(order[start : start + window], key=lambda i: len(self.steps[i].prompt_ids))
            if count is None:
                chunks.extend(part[j : j + size] for j in range(0, len(part), size))
            else:
                chunks.append(part)
        if count is not None:
            ordered = [i for part in chunks for i in part]
            bounds = [len(ordered) * k // count for k in range(count + 1)]
            chunks = [ordered[bounds[k] : bounds[k + 1]] for k in range(count)]
        for k in torch.randperm(len(chunks), generator=generator).tolist():
            yield torch.tensor(chunks[k], dtype=torch.long)


class RolloutBuffer:
    """Finished episodes waiting for an on-policy update."""

    def __init__(self) -> None:
        self.episodes: list[Episode] = []

    def add(self, episode: Episode) -> None:
        self.episodes.append(episode)

    def clear(self) -> None:
        self.episodes = []

    def take(self, trainable: Callable[[Episode], bool] | None = None) -> RolloutBuffer:
        """Remove the episodes an update trains on (``trainable``'s, default all) and return them as a
        buffer of their own; the others stay here for a later update."""
        taken, kept = RolloutBuffer(), []
        for e in self.episodes:
            (taken.episodes if trainable is None or trainable(e) else kept).append(e)
        self.episodes = kept
        return taken

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_steps(self) -> int:
        return sum(len(e) for e in self.episodes)

    def to_batch(self, gamma: float, lam: float, bootstrap_values: list[float | None] | None = None) -> RolloutBatch:
        """Compute GAE per episode and flatten.

        A terminated episode's return ends with its last reward. A truncated one's is completed with
        ``bootstrap_values[i]``, the value of the state it was cut in (see ``Episode.bootstrap``);
        where that is ``None`` (the loop gave no final observation), the value of the last state
        acted in stands in for it.
        """
        steps: list[Step] = []
        advantages, returns, values = [], [], []
        bootstrap_values = bootstrap_values or [None] * len(self.episodes)
        if len(bootstrap_values) != len(self.episodes):
            raise ValueError(f"{len(bootstrap_values)} bootstrap values for {len(self.episodes)} episodes")
        for episode, boot in zip(self.episodes, bootstrap_values):
            r = np.array([s.training_reward for s in episode.steps], dtype=np.float64)
            v = np.array([s.value for s in episode.steps], dtype=np.float64)
            last = 0.0
            if episode.truncated:
                last = float(v[-1]) if boot is None else float(boot)
            adv, ret = compute_gae(r, v, gamma, lam, last_value=last)
            steps.extend(episode.steps)
            advantages.append(adv)
            returns.append(ret)
            values.append(v)
        as_tensor = lambda parts: torch.tensor(np.concatenate(parts), dtype=torch.float32)  # noqa: E731
        return RolloutBatch(steps, as_tensor(advantages), as_tensor(returns), as_tensor(values))


@dataclass
class Transition:
    """One step for value-based learning: ``(s, a)`` in ``step``, the reward, and the next step's state.

    ``next_step`` is ``None`` when the episode ended after this step (its prompt and candidates
    give ``s'`` otherwise).
    """

    step: Step
    reward: float
    next_step: Step | None

    @property
    def done(self) -> bool:
        return self.next_step is None


class ReplayBuffer:
    """A ring buffer of transitions sampled uniformly at random.

    Args:
        capacity: transitions kept; the oldest is overwritten first.
        generator: torch generator for sampling (seeded by the algorithm).
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity={capacity}; expected at least 1")
        self.capacity = int(capacity)
        self.generator = generator
        self.items: list[Transition] = []
        self.position = 0  # next slot to overwrite once full

    def __len__(self) -> int:
        return len(self.items)

    def add(self, transition: Transition) -> None:
        if len(self.items) < self.capacity:
            self.items.append(transition)
        else:
            self.items[self.position] = transition
        self.position = (self.position + 1) % self.capacity

    def add_episode(self, episode: Episode) -> None:
        """Add every step of a finished episode; the last one is terminal.

        A truncated episode's last step leads to the state it was cut in (``Episode.bootstrap``),
        so its target bootstraps from there. Without that state (the loop gave no final
        observation) it is stored as terminal, which undervalues time-limited states (the agent warns).
        """
        steps = episode.steps
        for t, step in enumerate(steps):
            following = steps[t + 1] if t + 1 < len(steps) else episode.bootstrap
            self.add(Transition(step, step.training_reward, following))

    def sample(self, n: int) -> list[Transition]:
        """``n`` transitions drawn uniformly with replacement."""
        if not self.items:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(len(self.items), (n,), generator=self.generator)
        return [self.items[i] for i in idx.tolist()]


# ---------------------------------------------------------------------------------------------- serialisation
def _jsonable(value):
    """``value`` as JSON can hold it (NumPy scalars and arrays become Python values; others their repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def step_to_dict(step: Step) -> dict:
    """A JSON-serialisable copy of a step (for checkpoints; never pickle)."""
    return {
        "prompt_ids": list(map(int, step.prompt_ids)),
        "candidate_ids": None if step.candidate_ids is None else [list(map(int, c)) for c in step.candidate_ids],
        "action_index": step.action_index,
        "response_ids": None if step.response_ids is None else list(map(int, step.response_ids)),
        "logprob": float(step.logprob),
        "token_logprobs": None if step.token_logprobs is None else [float(x) for x in step.token_logprobs],
        "value": float(step.value),
        "reward": float(step.reward),
        "text": step.text,
        "action": _jsonable(step.action),
        "learner_recompute": bool(step.learner_recompute),
        "policy_version": None if step.policy_version is None else int(step.policy_version),
        "choice_ids": None if step.choice_ids is None else [list(map(int, c)) for c in step.choice_ids],
        "reply_grammar": step.reply_grammar,
        "invalid_reply": bool(step.invalid_reply),
        "shaping": float(step.shaping),
    }


def step_from_dict(d: dict) -> Step:
    return Step(**d)


def episode_to_dict(episode: Episode) -> dict:
    return {"steps": [step_to_dict(s) for s in episode.steps], "env_id": int(episode.env_id),
            "truncated": bool(episode.truncated), "info": _jsonable(episode.info),
            "bootstrap": None if episode.bootstrap is None else step_to_dict(episode.bootstrap)}


def episode_from_dict(d: dict) -> Episode:
    boot = d.get("bootstrap")
    return Episode([step_from_dict(s) for s in d["steps"]], env_id=d["env_id"], truncated=d["truncated"],
                   info=dict(d["info"]), bootstrap=None if boot is None else step_from_dict(boot))


def replay_to_dict(replay: ReplayBuffer) -> dict:
    """The replay buffer's transitions, with steps stored once even when two transitions share one."""
    index: dict[int, int] = {}
    steps: list[dict] = []

    def ref(step: Step | None) -> int:
        if step is None:
            return -1
        if id(step) not in index:
            index[id(step)] = len(steps)
            steps.append(step_to_dict(step))
        return index[id(step)]

    items = [[ref(t.step), float(t.reward), ref(t.next_step)] for t in replay.items]
    return {"capacity": replay.capacity, "position": replay.position, "steps": steps, "items": items}


def replay_from_dict(replay: ReplayBuffer, d: dict) -> None:
    steps = [step_from_dict(s) for s in d["steps"]]
    replay.items = [Transition(steps[a], r, None if b < 0 else steps[b]) for a, r, b in d["items"]]
    replay.position = int(d["position"])
