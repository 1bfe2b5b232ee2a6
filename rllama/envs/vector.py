"""Helpers for Gymnasium vector envs: splitting batched observations, making envs for the agent."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium import spaces


def unbatch(space: spaces.Space, batched: Any, n: int) -> list:
    """Split a vector env's batched observation into ``n`` per-env observations of ``space``.

    Unlike ``gymnasium.vector.utils.iterate``, this handles ``Discrete`` leaves (Blackjack's
    ``Tuple(Discrete, Discrete, Discrete)``): a tuple space gives tuples, a dict space gives dicts.
    """
    if isinstance(space, spaces.Tuple):
        parts = [unbatch(sub, batched[k], n) for k, sub in enumerate(space.spaces)]
        return [tuple(p[i] for p in parts) for i in range(n)]
    if isinstance(space, spaces.Dict):
        parts = {key: unbatch(sub, batched[key], n) for key, sub in space.spaces.items()}
        return [{key: parts[key][i] for key in parts} for i in range(n)]
    return [batched[i] for i in range(n)]


def make_vector_env(env_id: str, num_envs: int, **kwargs) -> gym.vector.VectorEnv:
    """A synchronous vector env of ``num_envs`` copies of ``env_id`` (kwargs go to ``gym.make``)."""
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs}; expected at least 1")
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", **kwargs)
