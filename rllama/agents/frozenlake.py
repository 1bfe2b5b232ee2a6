"""A ready-made agent for ``rllama/FrozenLake-v0`` (:mod:`rllama.envs.frozenlake`): the grid as text,
the four moves as candidates."""

from __future__ import annotations

from rllama.agents.grid import GridAgent
from rllama.envs.frozenlake import ACTIONS

_OFFSETS = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}  # in ACTIONS' order
_CELLS = {"_": "ice", "O": "a hole", "G": "the goal", "P": "ice"}


class FrozenLakeAgent(GridAgent):
    """Crosses a frozen lake shown as a grid; scores the moves ``left``, ``down``, ``right``, ``up``.

    The grid is the whole state (the map and the player), so prompts show no earlier turns
    (``keep_history = False``). With ``describe=True`` (the default) each candidate move also says
    what it leads to, as a reader of the grid would see it: the cell it aims at (ice, a hole, the
    goal, or the edge), whether that is closer to the goal, and the two cells the ice may slide the
    player onto instead (``"left: ice, closer to the goal; may slide onto a hole or ice"``), so that a
    small model need not work out positions from the grid's characters. ``describe=False`` shows the
    grid alone and the bare move names, as RAGEN's prompt does.

    With described moves the model's own scores are left out of the policy
    (``score_normalization="none"`` unless given), as :class:`~rllama.agents.sokoban.SokobanAgent`
    explains: the policy is the algorithm's head on the candidates' features, uniform before
    training.

    Args:
        describe: name what each move leads to in its candidate text.
        **kwargs: :class:`~rllama.agent.RLlamaAgent`'s arguments.
    """

    def get_system_prompt(self) -> str:
        return (
            "You are walking on a frozen lake, shown as a grid. P is you, _ is ice, O is a hole, G is the goal. "
            "Reach G without falling into a hole. The ice is slippery: you may slide sideways. "
            "Each turn, reply with one move: left, down, right or up."
        )

    def get_valid_actions(self, observation) -> list[str]:
        return describe_moves(str(observation)) if self.describe else list(ACTIONS)

    def extract_action(self, response: str) -> int:
        word = response.strip().lower()
        for index, name in enumerate(ACTIONS):
            if word.startswith(name):
                return index
        raise ValueError(f"no move ({', '.join(ACTIONS)}) in {response!r}")


def describe_moves(grid: str) -> list[str]:
    """Each move (in ``ACTIONS`` order) with what it leads to from the player's cell: the cell it aims
    at, whether that is closer to the goal, and the two cells a slide sideways would reach."""
    rows = grid.split("\n")
    found = [(r, c) for r, row in enumerate(rows) for c, cell in enumerate(row) if cell in "PX√"]
    goals = [(r, c) for r, row in enumerate(rows) for c, cell in enumerate(row) if cell in "G√"]
    if not found or not goals:
        return list(ACTIONS)
    (r, c), (gr, gc) = found[0], goals[0]

    def lands(name: str) -> tuple[str, int | None]:
        dr, dc = _OFFSETS[name]
        nr, nc = r + dr, c + dc
        if not (0 <= nr < len(rows) and 0 <= nc < len(rows[nr])):
            return "the edge", None
        return _CELLS.get(rows[nr][nc], "ice"), abs(gr - nr) + abs(gc - nc)

    moves = []
    for index, name in enumerate(ACTIONS):
        cell, distance = lands(name)
        if distance is None or cell != "ice":
            aim = cell
        else:
            aim = f"ice, {'closer to' if distance < abs(gr - r) + abs(gc - c) else 'farther from'} the goal"
        sideways = [lands(ACTIONS[(index + turn) % 4])[0] for turn in (-1, 1)]
        moves.append(f"{name}: {aim}; may slide onto {sideways[0]} or {sideways[1]}")
    return moves
