"""A ready-made agent for ``rllama/Sokoban-v0`` (:mod:`rllama.envs.sokoban`): the grid as text, the
four moves as candidates."""

from __future__ import annotations

import re

from rllama.agent import RLlamaAgent
from rllama.envs.sokoban import ACTIONS


class SokobanAgent(RLlamaAgent):
    """Solves one-box Sokoban shown as a grid; scores the moves ``up``, ``down``, ``left``, ``right``.

    The grid is the whole state (the room, the box and the player), so prompts show no earlier turns
    (``keep_history = False``).
    """

    keep_history = False

    def get_system_prompt(self) -> str:
        return (
            "You are playing Sokoban, shown as a grid. P is you, X is the box, O is the target, # is a wall, "
            "_ is floor; S is you on the target and √ the box on the target. Push the box onto the target: "
            "walk into the box to push it one cell. You cannot pull it, and a box pushed into a corner is stuck. "
            "Each turn, reply with one move: up, down, left or right."
        )

    def format_observation(self, observation) -> str:
        return f"{observation}\nYour move?"

    def get_valid_actions(self, observation) -> list[str]:
        return list(ACTIONS)

    def extract_action(self, response: str) -> int:
        for word in re.findall(r"[a-z]+", response.lower()):
            if word in ACTIONS:
                return ACTIONS.index(word)
        raise ValueError(f"no move ({', '.join(ACTIONS)}) in {response!r}")
