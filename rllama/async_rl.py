"""Asynchronous RL on Ray: rollout workers stream episodes to a learner that publishes adapter weights.

Acting and learning run apart, as in AReaL's asynchronous PPO: ``num_workers`` Ray actors each hold
a copy of the agent (the base model, and the adapter and heads the learner publishes) and their own
envs, and play ``episodes_per_task`` episodes at a time; the learner (this process) takes finished
episodes as they arrive, trains with the agent's on-policy algorithm whenever a batch is full, and
publishes the new adapter and heads (never the base model) through Ray's object store; a worker
picks them up before its next episodes.

Every step records the policy version (the learner's update count) that acted. Episodes more than
``max_staleness`` versions behind the learner are dropped; the rest are corrected as in decoupled
PPO: the ratio is taken to the proximal policy (the learner's weights when the update starts), and
each unit is weighted by the capped importance weight ``pi_prox / pi_behav``
(``max_importance_weight`` in the algorithm's config); the values of stale steps are recomputed.

.. code-block:: python

    from rllama.async_rl import AsyncTrainer

    def make_agent(seed):
        return BlackjackAgent(seed=seed, algorithm="ppo")

    def make_env():
        return gym.make_vec("Blackjack-v1", num_envs=8, vectorization_mode="sync", sab=True)

    with AsyncTrainer(make_agent, make_env, num_workers=2, max_staleness=1) as trainer:
        history = trainer.train(640)      # ray.init() on this machine, or an address: ray_address="auto"
    trainer.agent.save("blackjack-async")

``make_agent`` and ``make_env`` travel to the workers (by cloudpickle): define them at module level
in an importable module or in the script itself.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rllama.algorithms.buffers import episode_from_dict, episode_to_dict
from rllama.algorithms.on_policy import OnPolicyAlgorithm
from rllama.callbacks import CallbackLike, update_hooks, wants_stop
from rllama.errors import RLlamaError, require


def trainable_state(policy) -> dict[str, torch.Tensor]:
    """The adapter's and heads' weights (what the learner trains) and the heads' buffers (a fitted
    whitening), on the CPU: what workers need."""
    state = {name: p.detach().to("cpu", copy=True) for name, p in policy.named_parameters() if p.requires_grad}
    state.update({f"heads.{name}": b.detach().to("cpu", copy=True) for name, b in policy.heads.named_buffers()})
    return state


def checksum(state: dict[str, torch.Tensor]) -> float:
    """A number that changes when the weights do (to check that workers act with what was published)."""
    return float(sum(float(v.double().sum()) + float(v.double().abs().sum()) for v in state.values()))


@torch.no_grad()
def load_trainable_state(policy, state: dict[str, torch.Tensor]) -> None:
    params = {**dict(policy.named_parameters()), **{f"heads.{n}": b for n, b in policy.heads.named_buffers()}}
    missing = [name for name in state if name not in params]
    if missing:
        raise RLlamaError(f"published weights name parameters this policy lacks: {missing[:3]}")
    for name, value in state.items():
        params[name].copy_(value)


class RolloutWorker:
    """Plays episodes with a copy of the agent; a Ray actor (``ray.remote(RolloutWorker)``) in practice."""

    def __init__(self, make_agent: Callable[[int], Any], make_env: Callable[[], Any], seed: int,
                 threads: int | None = 1) -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.agent = make_agent(seed)
        self.agent.trainer.auto_update = False  # the learner trains; finished episodes wait in the buffer
        self.env = make_env()
        self.seed = int(seed)
        self.version = None
        self.tasks = 0

    def collect(self, n_episodes: int, version: int, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Load ``weights`` (version ``version``) if newer, play ``n_episodes``, return them as dicts."""
        from rllama.loops import run_episodes

        start = time.perf_counter()
        if version != self.version:
            load_trainable_state(self.agent.policy, weights)
            self.agent.algorithm.num_updates = int(version)  # steps are stamped with it
            self.version = version
        steps_before = self.agent.total_steps
        returns = run_episodes(self.agent, self.env, n_episodes, seed=self.seed * 1_000_003 + self.tasks)
        self.tasks += 1
        episodes = self.agent.trainer.take_episodes()
        replies = self.agent.actor.take_reply_counts()
        return {"episodes": [episode_to_dict(e) for e in episodes], "version": int(version), "returns": returns,
                "steps": self.agent.total_steps - steps_before, "wall_s": time.perf_counter() - start,
                "replies": list(replies), "checksum": checksum(trainable_state(self.agent.policy))}

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        self.env.close()


@dataclass
class AsyncStats:
    """Counters of an asynchronous run."""

    episodes: int = 0  # accepted (trained on)
    dropped: int = 0  # too stale
    env_steps: int = 0  # all steps played, dropped episodes included
    tasks: int = 0


class RayCollector:
    """``num_workers`` Ray rollout workers that play episodes with the weights last published.

    Each task is ``episodes_per_task`` episodes of one worker, acted by the version of the weights
    the task was given; :meth:`next_result` waits for whichever finishes first. Tasks still in flight
    when a training call ends carry over to the next.
    """

    def __init__(self, make_agent: Callable[[int], Any], make_env: Callable[[], Any], *, num_workers: int,
                 episodes_per_task: int, seed: int, worker_threads: int | None, worker_cpus: float,
                 ray_address: str | None, ray_init_kwargs: dict[str, Any]) -> None:
        self.make_agent, self.make_env = make_agent, make_env
        self.num_workers, self.episodes_per_task, self.seed = num_workers, episodes_per_task, seed
        self.worker_threads, self.worker_cpus = worker_threads, worker_cpus
        self.ray_address, self.ray_init_kwargs = ray_address, ray_init_kwargs
        self.workers: list = []
        self.pending: dict = {}  # task ref -> worker
        self.published: dict[int, float] = {}  # version -> checksum of the weights published as it
        self._weights = None  # (version, object ref) of the last published weights

    def init_ray(self):
        ray = require("ray", "ray", "asynchronous training")
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.ray_init_kwargs}
            if self.ray_address is None:
                # Local workers import what the driver can: its sys.path travels as PYTHONPATH.
                paths = [os.getcwd(), *[p for p in sys.path if p and os.path.isdir(p)]]
                env_vars = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
                runtime_env = kwargs.setdefault("runtime_env", {})
                runtime_env.setdefault("env_vars", {}).update(env_vars)
                # Ray starts workers at niceness 15; here they share the machine with the learner as equals.
                os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address=self.ray_address, **kwargs)
        return ray

    def start(self) -> None:
        """Start Ray (if needed) and the workers, and wait until each has built its agent and envs."""
        ray = self.init_ray()
        if not self.workers:
            Worker = ray.remote(num_cpus=self.worker_cpus)(RolloutWorker)
            self.workers = [Worker.remote(self.make_agent, self.make_env, self.seed + i + 1, self.worker_threads)
                            for i in range(self.num_workers)]
            ray.get([w.ready.remote() for w in self.workers])

    def close(self) -> None:
        """Stop the workers; tasks in flight are dropped."""
        if self.workers:
            import ray

            for w in self.workers:
                ray.kill(w)
            self.workers = []
            self.pending = {}

    def publish(self, policy, version: int) -> None:
        """Make ``policy``'s adapter and heads, as ``version``, the weights of the next tasks."""
        import ray

        state = trainable_state(policy)
        self.published[version] = checksum(state)
        self._weights = (version, ray.put(state))

    def launch(self, workers=None) -> None:
        """Give a task with the last published weights to each of ``workers`` (default: every idle one)."""
        version, weights = self._weights
        busy = set(self.pending.values())
        for w in self.workers if workers is None else workers:
            if workers is not None or w not in busy:
                self.pending[w.collect.remote(self.episodes_per_task, version, weights)] = w

    def next_result(self) -> tuple[Any, dict[str, Any]]:
        """Wait for the first task to finish; returns its worker and what it played."""
        import ray

        (ref,), _ = ray.wait(list(self.pending), num_returns=1)
        return self.pending.pop(ref), ray.get(ref)


class AsyncTrainer:
    """The learner: the agent's :class:`~rllama.trainer.Trainer`, fed by a :class:`RayCollector` of
    ``num_workers`` rollout workers instead of the agent's own loop.

    Args:
        make_agent: ``make_agent(seed)`` returns a fresh agent; called once here (the learner) and once
            in each worker. Its algorithm must be on-policy without groups (PPO, A2C, REINFORCE).
        make_env: ``make_env()`` returns the env (single or vector) a worker plays.
        num_workers: rollout workers (Ray actors of ``worker_cpus`` CPUs each).
        episodes_per_task: episodes a worker plays between two weight refreshes.
        max_staleness: episodes acted by weights more than this many updates old are dropped.
        seed: the learner's agent gets ``seed``; worker ``i`` gets ``seed + i + 1``.
        worker_threads: torch threads in each worker.
        worker_cpus: CPUs Ray reserves for each worker.
        ray_address: passed to ``ray.init`` (``None``: a local Ray; ``"auto"``: a running cluster); ignored
            if Ray is already initialised.
        ray_init_kwargs: more ``ray.init`` arguments.
    """

    def __init__(self, make_agent: Callable[[int], Any], make_env: Callable[[], Any], *, num_workers: int = 2,
                 episodes_per_task: int = 8, max_staleness: int = 1, seed: int = 0, worker_threads: int | None = 1,
                 worker_cpus: float = 1.0, ray_address: str | None = None,
                 ray_init_kwargs: dict[str, Any] | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}; expected at least 1")
        if episodes_per_task < 1:
            raise ValueError(f"episodes_per_task={episodes_per_task}; expected at least 1")
        if max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness}; expected 0 or more")
        self.agent = make_agent(int(seed))
        algorithm = self.agent.algorithm
        if not isinstance(algorithm, OnPolicyAlgorithm) or int(getattr(algorithm, "group_size", 1)) > 1:
            raise RLlamaError(f"asynchronous training needs an on-policy algorithm without groups (ppo, a2c, "
                              f"reinforce); the agent's is {algorithm.name!r}")
        self.max_staleness = int(max_staleness)
        self.collector = RayCollector(
            make_agent, make_env, num_workers=int(num_workers), episodes_per_task=int(episodes_per_task),
            seed=int(seed), worker_threads=worker_threads, worker_cpus=float(worker_cpus), ray_address=ray_address,
            ray_init_kwargs=dict(ray_init_kwargs or {}),
        )
        self.stats = AsyncStats()
        self.tasks: list[dict[str, Any]] = []  # per finished task: version, checksum, episodes, lag, dropped

    @property
    def workers(self) -> list:
        """The Ray actors playing episodes (empty before :meth:`start` and after :meth:`close`)."""
        return self.collector.workers

    @property
    def published(self) -> dict[int, float]:
        """Version -> checksum of the weights published as it."""
        return self.collector.published

    def _init_ray(self):
        return self.collector.init_ray()

    def start(self) -> AsyncTrainer:
        """Start Ray (if needed) and the workers, and wait until each has built its agent and envs.
        ``train`` calls it; call it first to keep start-up out of a timed run."""
        self.collector.start()
        return self

    def close(self) -> None:
        """Stop the workers (Ray itself keeps running; ``ray.shutdown()`` stops it)."""
        self.collector.close()

    def __enter__(self) -> AsyncTrainer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def train(self, n_episodes: int, *, progress: bool = True,
              callback: CallbackLike = None, on_update: CallbackLike = None) -> list[dict[str, float]]:
        """Train on ``n_episodes`` more accepted episodes; returns each update's statistics.

        ``callback``: as in :meth:`RLlamaAgent.train` (a :class:`~rllama.callbacks.Callback`, a function of
        an update's statistics, or a list); ``False`` from any stops the run after that update.
        ``on_update`` is its older name.
        """
        hooks = update_hooks(callback) + update_hooks(on_update)
        if n_episodes < 1:
            raise ValueError(f"n_episodes={n_episodes}; expected at least 1")
        self.start()
        target = self.stats.episodes + n_episodes  # counters run across calls
        trainer, algorithm, collector = self.agent.trainer, self.agent.algorithm, self.collector
        bar = None
        if progress:
            from tqdm.auto import tqdm

            from rllama.loops import BAR_FORMAT

            bar = tqdm(total=n_episodes, desc="train (async)", unit="ep", dynamic_ncols=True, bar_format=BAR_FORMAT)
        history: list[dict[str, float]] = []
        start = time.perf_counter()
        collector.publish(self.agent.policy, algorithm.num_updates)
        collector.launch()
        accepted_at_update = 0
        returns: list[float] = []
        try:
            while self.stats.episodes < target and collector.pending:
                worker, result = collector.next_result()
                accepted_before = self.stats.episodes
                lag = self._take(result, target, returns)
                if bar is not None:
                    bar.update(self.stats.episodes - accepted_before)
                # Relaunch at once (the worker acts while the learner updates), unless what is in flight covers
                # the rest of the run.
                if self.stats.episodes + len(collector.pending) * collector.episodes_per_task < target:
                    collector.launch([worker])
                if trainer.ready():
                    stats = trainer.update()
                    collector.publish(self.agent.policy, algorithm.num_updates)
                    elapsed = time.perf_counter() - start
                    stats.update({
                        "async/episodes": float(self.stats.episodes), "async/dropped": float(self.stats.dropped),
                        "async/env_steps": float(self.stats.env_steps), "async/lag_of_last_task": float(lag),
                        "async/env_steps_per_s": self.stats.env_steps / max(elapsed, 1e-9),
                        "async/train_return": float(sum(returns[accepted_at_update:]) /
                                                    max(1, len(returns) - accepted_at_update)),
                    })
                    accepted_at_update = len(returns)
                    history.append(stats)
                    if bar is not None:  # the fields of the synchronous bars (docs/experiments.md, "Logging")
                        recent = returns[-100:]
                        bar.set_postfix({"ret100": f"{sum(recent) / max(1, len(recent)):+.3f}",
                                         "ep/s": f"{len(returns) / max(elapsed, 1e-9):.2f}",
                                         "steps/s": f"{stats['async/env_steps_per_s']:.1f}",
                                         "upd": str(algorithm.num_updates), "dropped": str(self.stats.dropped)},
                                        refresh=False)
                    if wants_stop(hooks, stats):
                        break
        finally:
            if bar is not None:
                bar.close()
        if bar is not None and returns:
            import sys

            from rllama.loops import phase_summary

            bar.write(phase_summary("train (async)", returns, time.perf_counter() - start, window=100,
                                    extra=f"{self.stats.env_steps} env steps, {algorithm.num_updates} updates in "
                                          f"all, {self.stats.dropped} stale episodes dropped"), file=sys.stderr)
        return history

    def _take(self, result: dict[str, Any], target: int, returns: list[float]) -> int:
        """Hand a finished task's episodes to the trainer, unless too stale or past ``target``; returns
        the task's lag (learner updates since its weights)."""
        trainer = self.agent.trainer
        self.stats.tasks += 1
        self.stats.env_steps += int(result["steps"])
        self.agent.actor.add_reply_counts(*result["replies"])
        lag = self.agent.algorithm.num_updates - result["version"]
        self.tasks.append({"version": result["version"], "checksum": result["checksum"], "lag": lag,
                           "episodes": len(result["episodes"]), "dropped": lag > self.max_staleness,
                           "wall_s": result["wall_s"]})
        for data, ret in zip(result["episodes"], result["returns"]):
            if self.stats.episodes >= target:
                break
            if lag > self.max_staleness:
                self.stats.dropped += 1
                continue
            trainer.count_steps(len(data["steps"]))
            trainer.add_episode(episode_from_dict(data))
            self.stats.episodes += 1
            returns.append(float(ret))
        return lag
