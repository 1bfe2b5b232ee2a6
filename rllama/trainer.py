"""``Trainer``: when an agent's algorithm updates, and the counters of its training.

Every agent owns one (``agent.trainer``). The agent acts and records; when a training episode ends
it hands the episode to its trainer, which buffers it in the algorithm and runs an update once a
batch is full (in every process, when training data-parallel), then tells the acting backend that
the weights changed. So the plain loop of the README trains with no trainer in sight::

    stats = agent.terminate_episode()     # -> agent.trainer.add_episode(...); agent.trainer.maybe_update()

and every other way of training goes through the same object: :meth:`Trainer.train` (what
``agent.train`` calls), :meth:`Trainer.collect` (the experiment runner's segments) and the
asynchronous learner of :mod:`rllama.async_rl`, which feeds it episodes played elsewhere.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import numpy as np
import torch

from rllama.acting import Actor
from rllama.algorithms import Episode
from rllama.backends import Backend
from rllama.callbacks import CallbackLike, update_hooks, wants_stop
from rllama.distributed import DataParallel
from rllama.loops import LoopAgent, run_episodes
from rllama.policy import PolicyModel


class TrainedAgent(LoopAgent, Protocol):
    """What a :class:`Trainer` asks of the agent it trains (:class:`rllama.RLlamaAgent` is one): besides
    the loops' needs (it plays the agent's episodes), what an update reads and resets. Stated here rather
    than imported, so that this module needs nothing from :mod:`rllama.agent`."""

    policy: PolicyModel
    adapter_name: str  # the LoRA adapter it trains
    backend: Backend  # told when the weights change
    actor: Actor  # its parse failures are reported, and reset, at each update
    data_parallel: DataParallel | None
    generator: torch.Generator  # GRPO's group seeds, without a loop seed


class Trainer:
    """The update schedule of ``agent``'s algorithm, and the counters of its training.

    Attributes:
        auto_update: ``False`` makes :meth:`maybe_update` never update: finished episodes wait in the
            algorithm's buffer (rollout workers, whose learner trains elsewhere).
        total_episodes: training episodes finished.
        total_steps: training steps taken (episodes still running included).
    """

    def __init__(self, agent: TrainedAgent) -> None:
        self.agent = agent
        self.auto_update = True
        self.total_episodes = 0
        self.total_steps = 0
        self.next_group = 0  # id of the next start-state group (GRPO)
        self.pending_groups: deque[tuple[int, int]] = deque()  # (group id, reset seed) still to play
        self._others_active = False  # data-parallel: whether another process still plays episodes

    @property
    def algorithm(self):
        return self.agent.algorithm

    # ------------------------------------------------------------------ the schedule
    def count_steps(self, n: int) -> None:
        """Count ``n`` training steps just taken (the agent does as it acts)."""
        self.total_steps += int(n)

    def add_episode(self, episode: Episode) -> None:
        """Hand a finished training episode to the algorithm and count it (no update yet: :meth:`maybe_update`)."""
        self.algorithm.add_episode(episode)
        self.total_episodes += 1

    def ready(self) -> bool:
        """Whether the algorithm holds a full batch (in this process)."""
        return self.algorithm.ready()

    def maybe_update(self, active: bool = True) -> dict[str, float]:
        """Update if a batch is full — in every process, when data-parallel; returns the update's
        statistics, or an empty dict when none ran.

        Data-parallel processes call this in lockstep (one small all-reduce each time); ``active``
        tells the others whether this process still has episodes to play.
        """
        if not self.auto_update or not self._ready_everywhere(active):
            return {}
        return self.update()

    def update(self) -> dict[str, float]:
        """Run one update now, then let the acting backend know the weights changed."""
        agent = self.agent
        with agent.policy.lock, agent.policy.using_adapter(agent.adapter_name):  # the adapter it trains
            stats = self.algorithm.update()
            agent.backend.after_update(agent.policy)
        release_freed_memory()
        stats.update(agent.backend.update_stats())
        stats["rollout/total_episodes"] = float(self.total_episodes)
        stats["rollout/total_steps"] = float(self.total_steps)
        replies, invalid, failures = agent.actor.take_reply_counts()  # since the last update
        stats["rollout/parse_failures"] = float(failures)
        if replies:  # an agent that generates
            stats["rollout/invalid_replies"] = invalid / replies
        return stats

    def _ready_everywhere(self, active: bool) -> bool:
        group = self.agent.data_parallel
        if group is None:
            return self.algorithm.ready()
        ready, others = group.sum([float(self.algorithm.ready()), float(active)])
        self._others_active = others > float(active)
        return ready == group.world_size

    def finish_data_parallel(self) -> list[dict[str, float]]:
        """After this process's last training episode: keep taking part in the other processes' update
        checks (and their updates) until every process has finished. :meth:`train` calls it; a
        hand-written training loop calls it once at the end. Returns the statistics of updates that
        ran meanwhile."""
        history = []
        if self.agent.data_parallel is None:
            return history
        while True:
            if self._ready_everywhere(active=False):
                history.append(self.update())
            if not self._others_active:
                return history

    def take_episodes(self) -> list[Episode]:
        """Remove and return the episodes waiting in the algorithm's buffer (rollout workers send them on)."""
        buffer = getattr(self.algorithm, "buffer", None)
        if buffer is None:
            return []
        episodes = list(buffer.episodes)
        buffer.clear()
        return episodes

    # ------------------------------------------------------------------ loops
    def collect(self, env, n_episodes: int, *, seed: int | None = None, progress: bool = False,
                desc: str = "train", callback: CallbackLike = None) -> tuple[list[float], list[dict[str, float]]]:
        """Play ``n_episodes`` training episodes on ``env`` (single or vector), updating as batches fill.

        ``callback`` gets each update's statistics (see :meth:`train`); ``False`` from any stops.
        Returns the episodes' returns and the updates' statistics.
        """
        history: list[dict[str, float]] = []
        hooks = update_hooks(callback)

        def on_update(stats: dict) -> bool:
            history.append(stats)
            return not wants_stop(hooks, stats)

        returns = run_episodes(self.agent, env, n_episodes, seed=seed, progress=progress, desc=desc,
                               on_update=on_update)
        return returns, history

    def train(self, env, n_episodes: int, *, seed: int | None = None, progress: bool = True,
              callback: CallbackLike = None) -> list[dict[str, float]]:
        """What :meth:`rllama.agent.RLlamaAgent.train` does (see there); returns every update's statistics."""
        data_parallel = self.agent.data_parallel
        if seed is not None and data_parallel is not None:
            seed += 1_000_003 * data_parallel.rank  # each process plays different episodes
        _returns, history = self.collect(env, n_episodes, seed=seed, progress=progress, callback=callback)
        history.extend(self.finish_data_parallel())
        return history

    def group_slots(self, count: int, group_size: int, seeds: np.random.Generator | None) -> list[tuple[int, int]]:
        """The (group id, reset seed) of the next ``count`` episodes of a group-relative algorithm:
        groups of ``group_size`` episodes share a reset seed (drawn from ``seeds``, or from the agent's
        generator without). A group cut by the end of one loop is completed by the next."""
        while len(self.pending_groups) < count:
            if seeds is not None:
                group_seed = int(seeds.integers(2**31))
            else:
                group_seed = int(torch.randint(2**31, (1,), generator=self.agent.generator))
            self.pending_groups.extend((self.next_group, group_seed) for _ in range(group_size))
            self.next_group += 1
        return [self.pending_groups.popleft() for _ in range(count)]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Counters and group bookkeeping (JSON-serialisable), for an exact resume."""
        return {"total_steps": self.total_steps, "total_episodes": self.total_episodes,
                "next_group": self.next_group, "pending_group_slots": [list(x) for x in self.pending_groups]}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        self.total_steps, self.total_episodes = int(meta["total_steps"]), int(meta["total_episodes"])
        self.next_group = int(meta["next_group"])
        self.pending_groups.clear()
        self.pending_groups.extend(tuple(x) for x in meta["pending_group_slots"])


def release_freed_memory() -> None:
    """Return the memory an update freed to the system (glibc keeps freed blocks of the update's
    many differently sized tensors, so a generate-mode run's resident size grew by ~0.7 GB an update
    before this); nothing where the C library is not glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
