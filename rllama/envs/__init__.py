"""Environments rllama ships, and vector-env helpers.

Importing ``rllama`` registers these with Gymnasium (each env's module is imported only when the env
is made, TextWorld's package only then too):

- ``rllama/TextWorld-v0``: text adventures generated offline (:mod:`rllama.envs.textworld`);
- ``rllama/FrozenLake-v0``: FrozenLake on random maps, the grid as text (:mod:`rllama.envs.frozenlake`);
- ``rllama/Sokoban-v0``: Sokoban 6×6 with one box on generated levels (:mod:`rllama.envs.sokoban`).

``gym.make("rllama/FrozenLake-v0", maps=range(100))`` then works after ``import rllama``.
"""

from gymnasium.envs.registration import register, registry

from rllama.envs.vector import make_vector_env, unbatch

ENVS = {
    "rllama/TextWorld-v0": {"entry_point": "rllama.envs.textworld:TextWorldEnv", "max_episode_steps": 50},
    "rllama/FrozenLake-v0": {"entry_point": "rllama.envs.frozenlake:FrozenLakeText"},  # truncates itself
    "rllama/Sokoban-v0": {"entry_point": "rllama.envs.sokoban:SokobanEnv"},  # truncates itself
}
"""The ids rllama registers, with their registration arguments."""


def register_envs() -> None:
    """Register every env of :data:`ENVS` with Gymnasium (those already registered are left alone)."""
    for env_id, kwargs in ENVS.items():
        if env_id not in registry:
            register(id=env_id, **kwargs)


register_envs()

__all__ = ["ENVS", "make_vector_env", "register_envs", "unbatch"]
