"""A ready-made agent for ``rllama/FrozenLake-v0`` (:mod:`rllama.envs.frozenlake`): the grid as text,
the four moves as candidates."""

from __future__ import annotations

from rllama.agent import RLlamaAgent
from rllama.envs.frozenlake import ACTIONS

_OFFSETS = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}
_CELLS = {"_": "ice", "O": "a hole", "G": "the goal", "P": "ice"}


class FrozenLakeAgent(RLlamaAgent):
    """Crosses a frozen lake shown as a grid; scores the moves ``left``, ``down``, ``right``, ``up``.

    The grid is the whole state (the map and the player), so prompts show no earlier turns
    (``keep_history = False``). With ``describe=True`` (the default) the prompt also says in words
    what each move leads to (ice, a hole, the goal, or the edge) and where the goal lies: what a
    reader of the grid would work out, written so that a small model need not. ``describe=False``
    shows the grid alone, as RAGEN's prompt does.

    Args:
        describe: add the neighbours and the goal's direction to the grid.
        **kwargs: :class:`~rllama.agent.RLlamaAgent`'s arguments.
    """

    keep_history = False

    def __init__(self, *args, describe: bool = True, **kwargs) -> None:
        self.describe = bool(describe)
        super().__init__(*args, **kwargs)

    def get_system_prompt(self) -> str:
        return (
            "You are walking on a frozen lake, shown as a grid. P is you, _ is ice, O is a hole, G is the goal. "
            "Reach G without falling into a hole. The ice is slippery: you may slide sideways. "
            "Each turn, reply with one move: left, down, right or up."
        )

    def format_observation(self, observation) -> str:
        text = str(observation)
        if self.describe:
            text += "\n" + describe(text)
        return f"{text}\nYour move?"

    def get_valid_actions(self, observation) -> list[str]:
        return list(ACTIONS)

    def extract_action(self, response: str) -> int:
        word = response.strip().lower()
        for index, name in enumerate(ACTIONS):
            if word.startswith(name):
                return index
        raise ValueError(f"no move ({', '.join(ACTIONS)}) in {response!r}")


def describe(grid: str) -> str:
    """What each move leads to from the player's cell, and where the goal is, in words."""
    rows = grid.split("\n")
    found = [(r, c) for r, row in enumerate(rows) for c, cell in enumerate(row) if cell in "PX√"]
    goals = [(r, c) for r, row in enumerate(rows) for c, cell in enumerate(row) if cell in "G√"]
    if not found:
        return ""
    (r, c), parts = found[0], []
    for name, (dr, dc) in _OFFSETS.items():
        nr, nc = r + dr, c + dc
        inside = 0 <= nr < len(rows) and 0 <= nc < len(rows[nr])
        parts.append(f"{name}: {_CELLS.get(rows[nr][nc], 'ice') if inside else 'the edge'}")
    text = "Moves lead to " + ", ".join(parts) + "."
    if goals:
        gr, gc = goals[0]
        down, right = gr - r, gc - c
        text += f" The goal is {down} down and {right} right of you."
    return text
