"""A ready-made agent for ``rllama/FrozenLake-v0`` (:mod:`rllama.envs.frozenlake`): the grid as text,
the four moves as candidates."""

from __future__ import annotations

from rllama.agent import RLlamaAgent
from rllama.envs.frozenlake import ACTIONS


class FrozenLakeAgent(RLlamaAgent):
    """Crosses a frozen lake shown as a grid; scores the moves ``left``, ``down``, ``right``, ``up``.

    The grid is the whole state (the map and the player), so prompts show no earlier turns
    (``keep_history = False``).
    """

    keep_history = False

    def get_system_prompt(self) -> str:
        return (
            "You are walking on a frozen lake, shown as a grid. P is you, _ is ice, O is a hole, G is the goal. "
            "Reach G without falling into a hole. The ice is slippery: you may slide sideways. "
            "Each turn, reply with one move: left, down, right or up."
        )

    def format_observation(self, observation) -> str:
        return f"{observation}\nYour move?"

    def get_valid_actions(self, observation) -> list[str]:
        return list(ACTIONS)

    def extract_action(self, response: str) -> int:
        word = response.strip().lower()
        for index, name in enumerate(ACTIONS):
            if word.startswith(name):
                return index
        raise ValueError(f"no move ({', '.join(ACTIONS)}) in {response!r}")
