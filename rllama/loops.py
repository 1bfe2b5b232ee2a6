"""Environment loops: run an agent for a number of episodes in a single or vector Gymnasium env.

``RLlamaAgent.train`` and ``RLlamaAgent.evaluate`` use these; users may call :func:`run_episodes`
directly or write their own loop with ``act``/``assign_reward``/``terminate_episode``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from rllama.algorithms import Algorithm

logger = logging.getLogger(__name__)


class GroupScheduler(Protocol):
    """Where grouped episodes take their start states from (:meth:`rllama.trainer.Trainer.group_slots`)."""

    def group_slots(self, count: int, group_size: int,
                    seeds: np.random.Generator | None) -> list[tuple[int, int]]: ...


class LoopAgent(Protocol):
    """What :func:`run_episodes` asks of the agent it runs (:class:`rllama.RLlamaAgent` is one). Stated
    here rather than imported, so that this module needs nothing from :mod:`rllama.agent`."""

    action_space: Any  # a Gymnasium space; set from the env for the length of the loop
    algorithm: Algorithm
    trainer: GroupScheduler

    @property
    def recording(self) -> bool: ...

    @property
    def total_steps(self) -> int: ...

    def act(self, observation) -> Any: ...

    def act_batch(self, observations: Sequence, env_ids: Sequence[int] | None = None) -> list: ...

    def assign_reward(self, reward: float) -> None: ...

    def assign_rewards(self, rewards: Sequence[float], env_ids: Sequence[int] | None = None) -> None: ...

    def terminate_episode(self, truncated: bool = False, group: int | None = None,
                          final_observation=None) -> dict[str, float]: ...

    def terminate_episodes(self, env_ids: Sequence[int] | np.ndarray, truncated: Sequence[bool] | None = None,
                           groups: Sequence[int] | None = None,
                           final_observations: Sequence | None = None) -> dict[str, float]: ...

    def reset(self, env_ids: Sequence[int] | None = None) -> None: ...


def run_episodes(
    agent: LoopAgent,
    env,
    n_episodes: int,
    *,
    seed: int | None = None,
    progress: bool = False,
    desc: str = "",
    on_update: Callable[[dict], bool] | None = None,
    reseed_each_episode: bool = False,
) -> list[float]:
    """Run ``n_episodes`` episodes of ``agent`` in a single or vector env; returns their returns.

    Vector envs may use Gymnasium's ``NEXT_STEP`` (the default) or ``SAME_STEP`` autoreset. Each
    vector sub-env runs a fixed share of the episodes, so short episodes are not over-represented.

    When the agent is training with a group-relative algorithm (``algorithm.group_size > 1``,
    GRPO), episodes run in groups that start from the same state: each group's episodes reset the
    env with one seed, and every episode is labelled with its group.
    """
    import gymnasium as gym

    if n_episodes < 1:
        raise ValueError(f"n_episodes={n_episodes}; expected at least 1")
    is_vector = isinstance(env, gym.vector.VectorEnv)
    space = env.single_action_space if is_vector else env.action_space
    previous_space = agent.action_space
    agent.action_space = space
    bar = _progress(n_episodes, desc, progress, agent)
    group_size = int(getattr(agent.algorithm, "group_size", 1)) if agent.recording else 1
    try:
        if group_size > 1:
            returns = _run_grouped(agent, env, n_episodes, group_size, seed, bar, on_update)
        elif is_vector:
            returns = _run_vector(agent, env, n_episodes, seed, bar, on_update)
        else:
            returns = _run_single(agent, env, n_episodes, seed, bar, on_update, reseed_each_episode)
    finally:
        agent.action_space = previous_space
        if bar is not None:
            bar.close()
    if bar is not None:
        import sys

        bar.write(summary_line(bar, returns), file=sys.stderr)  # beside the bars, off stdout
    return returns


class ReturnStats(dict):
    """``{"mean_return", "std_return", "stderr", "n_episodes", "returns"}``: a dict whose printout is a
    one-line summary (``result["returns"]`` still holds every episode's return)."""

    def __repr__(self) -> str:
        return (f"mean return {self['mean_return']:+.4f} ± {self['stderr']:.4f} (s.e.) over {self['n_episodes']} "
                f"episodes, std {self['std_return']:.4f}; ['returns'] holds each episode's")

    __str__ = __repr__


def return_stats(returns: list[float]) -> ReturnStats:
    """:class:`ReturnStats` of episode returns."""
    arr = np.asarray(returns, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return ReturnStats(mean_return=float(arr.mean()), std_return=std, stderr=std / math.sqrt(len(arr)),
                       n_episodes=len(arr), returns=arr.tolist())


def _run_single(agent, env, n_episodes, seed, bar, on_update, reseed_each_episode) -> list[float]:
    returns = []
    for k in range(n_episodes):
        if seed is None:
            reset_seed = None
        else:
            reset_seed = seed + k if reseed_each_episode else (seed if k == 0 else None)
        obs, _info = env.reset(seed=reset_seed)
        total, done = 0.0, False
        while not done:
            action = agent.act(obs)
            obs, reward, terminated, truncated, _info = env.step(action)
            agent.assign_reward(reward)
            total += float(reward)
            done = bool(terminated or truncated)
        cut = bool(truncated and not terminated)
        stats = agent.terminate_episode(truncated=cut, final_observation=obs if cut else None)
        returns.append(total)
        _tick(bar, returns, stats)
        if stats and on_update is not None and on_update(stats) is False:
            break
    return returns


def _run_vector(agent, env, n_episodes, seed, bar, on_update) -> list[float]:
    from gymnasium.vector import AutoresetMode

    from rllama.envs.vector import unbatch

    n = env.num_envs
    declared = "autoreset_mode" in env.metadata
    mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode == AutoresetMode.DISABLED:
        raise ValueError("vector envs with autoreset_mode=DISABLED are not supported; use NEXT_STEP or SAME_STEP")
    quota = [n_episodes // n + (1 if i < n_episodes % n else 0) for i in range(n)]
    finished = [0] * n
    running = [0.0] * n
    returns: list[float] = []
    obs, _info = env.reset(seed=seed)
    resetting = np.zeros(n, dtype=bool)  # NEXT_STEP: this step only resets the env
    if seed is not None:
        env.single_action_space.seed(seed)
    filler = [env.single_action_space.sample() for _ in range(n)]
    stop = False
    while len(returns) < n_episodes and not stop:
        obs_list = unbatch(env.single_observation_space, obs, n)
        ids = [i for i in range(n) if not resetting[i] and finished[i] < quota[i]]
        acts = agent.act_batch([obs_list[i] for i in ids], env_ids=ids)
        actions = list(filler)
        for i, a in zip(ids, acts):
            actions[i] = filler[i] = a
        obs, rewards, terminated, truncated, info = env.step(_batch_actions(env, actions))
        agent.assign_rewards([rewards[i] for i in ids], env_ids=ids)
        ended = [i for i in ids if terminated[i] or truncated[i]]
        if ended and not declared:
            mode, declared = _undeclared_autoreset(env, info), True
        for i in ids:
            running[i] += float(rewards[i])
        cut = [bool(truncated[i] and not terminated[i]) for i in ended]
        stats = agent.terminate_episodes(ended, truncated=cut,
                                         final_observations=_final_observations(env, obs, info, ended, cut, mode))
        for i in ended:
            finished[i] += 1
            returns.append(running[i])
            running[i] = 0.0
            _tick(bar, returns, stats)
        if stats and on_update is not None and on_update(stats) is False:
            stop = True
        done = np.logical_or(terminated, truncated)
        resetting = done if mode == AutoresetMode.NEXT_STEP else np.zeros(n, dtype=bool)
    agent.reset(range(n))  # sub-envs stopped mid-episode by a callback leave unfinished chats behind
    return returns


def _run_grouped(agent, env, n_episodes, group_size, seed, bar, on_update) -> list[float]:
    """Episodes in groups of ``group_size`` that start from the same state (same reset seed).

    Runs in rounds: every round resets the active sub-envs explicitly, each with the seed of the
    group its slot belongs to, and plays until they have all finished.
    """
    import gymnasium as gym

    from rllama.envs.vector import unbatch

    is_vector = isinstance(env, gym.vector.VectorEnv)
    n = env.num_envs if is_vector else 1
    seeds = np.random.default_rng(seed) if seed is not None else None
    returns: list[float] = []
    space = env.single_action_space if is_vector else env.action_space
    if seed is not None:
        space.seed(seed)
    mode = env.metadata.get("autoreset_mode") if is_vector else None
    declared = not is_vector or "autoreset_mode" in env.metadata
    stop = False
    while len(returns) < n_episodes and not stop:
        active = min(n, n_episodes - len(returns))
        # a group cut by the end of one call is completed by the next (the trainer keeps it)
        slots = agent.trainer.group_slots(active, group_size, seeds)
        reset_seeds = [s for _, s in slots] + [None] * (n - active)
        obs, _ = env.reset(seed=reset_seeds if is_vector else reset_seeds[0])
        running = [0.0] * n
        playing = list(range(active))
        filler = [space.sample() for _ in range(n)]
        while playing:
            obs_list = unbatch(env.single_observation_space, obs, n) if is_vector else [obs]
            acts = agent.act_batch([obs_list[i] for i in playing], env_ids=playing)
            for i, a in zip(playing, acts):
                filler[i] = a
            if is_vector:
                obs, rewards, terminated, truncated, info = env.step(_batch_actions(env, filler))
            else:
                obs, r, te, tr, info = env.step(filler[0])
                rewards, terminated, truncated = [r], [te], [tr]
            agent.assign_rewards([rewards[i] for i in playing], env_ids=playing)
            for i in playing:
                running[i] += float(rewards[i])
            ended = [i for i in playing if terminated[i] or truncated[i]]
            cut = [bool(truncated[i] and not terminated[i]) for i in ended]
            if ended and not declared:
                mode, declared = _undeclared_autoreset(env, info), True
            finals = (_final_observations(env, obs, info, ended, cut, mode)
                      if is_vector else ([obs] if any(cut) else None))
            stats = agent.terminate_episodes(ended, truncated=cut, groups=[slots[i][0] for i in ended],
                                             final_observations=finals)
            for i in ended:
                returns.append(running[i])
                _tick(bar, returns, stats)
            playing = [i for i in playing if i not in ended]
            if stats and on_update is not None and on_update(stats) is False:
                stop = True
        agent.reset(range(n))
    return returns


def _undeclared_autoreset(env, info):
    """The autoreset mode of a vector env that does not declare ``metadata["autoreset_mode"]``, read
    off its info at the first episode end: a same-step env hands the final observation over there."""
    from gymnasium.vector import AutoresetMode

    same_step = any(key in info for key in ("final_obs", "final_info", "final_observation"))
    mode = AutoresetMode.SAME_STEP if same_step else AutoresetMode.NEXT_STEP
    logger.warning("%s does not declare metadata['autoreset_mode']; at its first episode end its info %s "
                   "final_obs, so it is read as %s. Declare it to be sure.", type(env).__name__,
                   "holds" if same_step else "holds no", mode.name)
    return mode


def _final_observations(env, obs, info, ended: list[int], cut: list[bool], mode) -> list | None:
    """The observation each ended sub-env's last step returned (``None`` where it was not truncated):
    the batched observation under NEXT_STEP autoreset, ``info["final_obs"]`` under SAME_STEP."""
    from gymnasium.vector import AutoresetMode

    from rllama.envs.vector import unbatch

    if not any(cut):
        return None
    if mode == AutoresetMode.SAME_STEP:
        source = info.get("final_obs")
        if source is None:
            return None
        return [source[i] if c else None for i, c in zip(ended, cut)]
    obs_list = unbatch(env.single_observation_space, obs, env.num_envs)
    return [obs_list[i] if c else None for i, c in zip(ended, cut)]


def _batch_actions(env, actions: list):
    from gymnasium.vector.utils import concatenate, create_empty_array

    space = env.single_action_space
    return concatenate(space, actions, create_empty_array(space, n=env.num_envs))


BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} ep [{elapsed}<{remaining}{postfix}]"
"""Progress bars' layout: tqdm's own rate flips between ep/s and s/ep, so the postfix carries rates in
fixed units instead."""


def _progress(total: int, desc: str, enabled: bool, agent=None):
    if not enabled:
        return None
    import time

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="ep", dynamic_ncols=True, bar_format=BAR_FORMAT)
    bar.rllama_start = (time.perf_counter(), agent.total_steps if agent is not None else 0, agent)
    return bar


def _tick(bar, returns: list[float], stats: dict | None = None) -> None:
    """Advance the bar by one episode and show (docs/experiments.md, "Logging"): ``ret100``, the mean return
    of the last 100 episodes while training (``ret``, of every episode so far, while evaluating: the figure
    ``evaluate`` returns), ``ep/s``, and while training ``steps/s`` (env steps), ``upd`` (updates), the
    exploration in force: ``eps`` (DQN's epsilon) or ``ent`` (the policy's entropy at the last update), and
    for an agent that generates, ``invalid``: the share of the replies generated before the last update that
    were not in the form the agent reads (``extract_action`` failed on them, or ``is_valid_reply`` said no)."""
    if bar is None:
        return
    import time

    bar.update(1)
    start, steps0, agent = getattr(bar, "rllama_start", (None, 0, None))
    elapsed = max(time.perf_counter() - start, 1e-9) if start is not None else None
    training = agent is not None and agent.recording
    recent = returns[-100:] if training else returns
    postfix = {("ret100" if training else "ret"): f"{sum(recent) / len(recent):+.3f}"}
    if elapsed is not None:
        postfix["ep/s"] = f"{bar.n / elapsed:.2f}"
    if training:
        postfix["steps/s"] = f"{(agent.total_steps - steps0) / elapsed:.1f}"
        postfix["upd"] = str(agent.algorithm.num_updates)
        if stats and "policy/entropy" in stats:
            bar.rllama_entropy = float(stats["policy/entropy"])
        if stats and "rollout/invalid_replies" in stats:
            bar.rllama_invalid = float(stats["rollout/invalid_replies"])
        epsilon = getattr(agent.algorithm, "epsilon", None)
        if isinstance(epsilon, float):
            postfix["eps"] = f"{epsilon:.3f}"
        elif getattr(bar, "rllama_entropy", None) is not None:
            postfix["ent"] = f"{bar.rllama_entropy:.3f}"
        if getattr(bar, "rllama_invalid", None) is not None:
            postfix["invalid"] = f"{bar.rllama_invalid:.0%}"
    bar.set_postfix(postfix, refresh=False)


def summary_line(bar, returns: list[float]) -> str:
    """One line closing a phase: what ran, how long it took and what it returned (training: the mean of
    the last 100 episodes; evaluating: of all of them)."""
    import time

    start, steps0, agent = getattr(bar, "rllama_start", (time.perf_counter(), 0, None))
    training = agent is not None and agent.recording
    extra = f"{agent.total_steps - steps0} env steps, {agent.algorithm.num_updates} updates in all" if training else ""
    return phase_summary(bar.desc or ("train" if training else "episodes"), returns,
                         time.perf_counter() - start, window=100 if training else None, extra=extra)


def phase_summary(phase: str, returns: list[float], elapsed: float, window: int | None = None,
                  extra: str = "") -> str:
    """``"<phase>: N episodes in <time> (<rate> ep/s); mean return <m> over the [last] <k>[; <extra>]"``: the
    mean over the last ``window`` returns (``None``: all of them)."""
    if not returns:
        return f"{phase}: no episode finished ({duration(elapsed)})"
    recent = returns[-window:] if window else returns
    which = f"last {len(recent)}" if len(recent) < len(returns) else f"{len(recent)}"
    line = (f"{phase}: {len(returns)} episodes in {duration(elapsed)} ({len(returns) / max(elapsed, 1e-9):.2f} "
            f"ep/s); mean return {sum(recent) / len(recent):+.3f} over the {which}")
    return f"{line}; {extra}" if extra else line


def duration(seconds: float) -> str:
    """Seconds under 90 s, else minutes."""
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
