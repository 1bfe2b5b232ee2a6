"""A ready-made agent for ``rllama/Sokoban-v0`` (:mod:`rllama.envs.sokoban`): the grid as text, the
four moves as candidates."""

from __future__ import annotations

import re

from rllama.agents.grid import GridAgent
from rllama.envs.sokoban import ACTIONS, MOVES, Level, move


class SokobanAgent(GridAgent):
    """Solves one-box Sokoban shown as a grid; scores the moves ``up``, ``down``, ``left``, ``right``.

    The grid is the whole state (the room, the box and the player), so prompts show no earlier turns
    (``keep_history = False``). With ``describe=True`` (the default) each candidate move also says
    what it does, as a reader of the grid would see it: blocked by a wall, a walk closer to or
    farther from the box, a push of the box closer to or farther from the target, onto the target,
    into a corner (where it is stuck), or a push the box cannot follow (``"left: push the box closer
    to the target"``). ``describe=False`` shows the grid alone and the bare move names, as RAGEN's
    prompt does.

    With described moves the model's own scores are left out of the policy
    (``score_normalization="none"`` unless given): the policy is the algorithm's head on the
    candidates' features, uniform before training. The model's likelihood of those sentences says
    how it likes the wording, not the move (untrained, it puts 54 % of its mass on "blocked by a
    wall" and 2.5 % on "walk closer to the box"), and the head had to unlearn that preference
    before learning anything: after 1,000 GiGPO episodes, held-out success was 27.0 % with the
    model's scores and 49.5 % without (seed 0; 45.0 % over seeds 0-2; ``benchmarks/README.md``,
    "The peers' tasks").

    Args:
        describe: name what each move does in its candidate text.
        **kwargs: :class:`~rllama.agent.RLlamaAgent`'s arguments.
    """

    def get_system_prompt(self) -> str:
        return (
            "You are playing Sokoban, shown as a grid. P is you, X is the box, O is the target, # is a wall, "
            "_ is floor; S is you on the target and √ the box on the target. Push the box onto the target: "
            "walk into the box to push it one cell. You cannot pull it, and a box pushed into a corner is stuck. "
            "Each turn, reply with one move: up, down, left or right."
        )

    def get_valid_actions(self, observation) -> list[str]:
        return describe_moves(str(observation)) if self.describe else list(ACTIONS)

    def extract_action(self, response: str) -> int:
        for word in re.findall(r"[a-z]+", response.lower()):
            if word in ACTIONS:
                return ACTIONS.index(word)
        raise ValueError(f"no move ({', '.join(ACTIONS)}) in {response!r}")


def describe_moves(grid: str) -> list[str]:
    """Each move (in ``ACTIONS`` order) with what it does on the board drawn in ``grid``; the bare
    names when the grid is not a one-box board (for instance, already solved)."""
    try:
        level = Level.parse(grid)
    except ValueError:
        return list(ACTIONS)
    box, player, target = level.box, level.player, level.target

    def distance(a, b) -> int:
        return abs(a[0] - b[0]) + abs(a[1] - b[1])

    def cornered(cell) -> bool:
        walls = [(cell[0] + dr, cell[1] + dc) not in level.floor for dr, dc in MOVES]  # up, down, left, right
        return cell != target and (walls[0] or walls[1]) and (walls[2] or walls[3])

    moves = []
    for index, name in enumerate(ACTIONS):
        new_box, new_player = move(level, box, player, index)
        ahead = (player[0] + MOVES[index][0], player[1] + MOVES[index][1])
        if new_player == player:
            what = "the box cannot move" if ahead == box else "blocked by a wall"
        elif new_box == target:
            what = "push the box onto the target"
        elif new_box != box:
            closer = distance(new_box, target) < distance(box, target)
            what = ("push the box into a corner" if cornered(new_box) else
                    f"push the box {'closer to' if closer else 'farther from'} the target")
        else:
            closer = distance(new_player, box) < distance(player, box)
            what = f"walk {'closer to' if closer else 'farther from'} the box"
        moves.append(f"{name}: {what}")
    return moves
