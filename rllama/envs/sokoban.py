"""Sokoban with one box on generated 6×6 levels, observed as text: ``rllama/Sokoban-v0``.

The settings follow RAGEN's ``SimpleSokoban`` (the peer that publishes LLM figures on it, Table 3 of
its paper): a 6×6 room walled all round, one box, at most 10 actions an episode. The reward is the
one RAGEN takes from gym-sokoban: −0.1 a step, +1 when the box is pushed onto the target, +10 more
when the puzzle is solved (so the solving push earns 10.9 in all); gym-sokoban's −1 for pushing a
box off a target cannot happen with one box, since the episode ends once it is on the target.
Observations are the grid in RAGEN's symbols, one character a cell, cells separated by a space
(RAGEN pads each cell to three characters, ``" # "``), rows by newlines:

    #  wall       _  floor       O  target      X  box
    √  the box on the target     P  the player  S  the player on the target

Actions are RAGEN's order, from 0: up, down, left, right (:data:`ACTIONS`). Walking into a wall,
or pushing the box into a wall, costs the step and changes nothing.

Levels are generated from seeds by reverse play (:func:`generate_level`): a random walk carves the
floor, the box is set on its target, and the player then *pulls* it backwards a few times, which
keeps every level solvable. A breadth-first search over (player, box) positions (:func:`solve`)
gives the level's shortest solution; only levels solvable in 1 to ``max_steps`` actions are kept.
``levels=range(0, 1000)`` trains on those levels and ``levels=range(10_000, 10_100)`` holds out
others; without ``levels`` each episode draws a fresh seed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rllama.envs.moves import check_move

Cell = tuple[int, int]  # (row, column)

ACTIONS = ("up", "down", "left", "right")
"""Move names in action order (RAGEN's order; RAGEN numbers them from 1)."""

MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # the (row, column) change of each action

WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", "_", "O", "X", "√", "P", "S"
SYMBOLS = WALL + FLOOR + TARGET + BOX + BOX_ON_TARGET + PLAYER + PLAYER_ON_TARGET
CHARSET = SYMBOLS + " \n"  # the observation space's characters

STEP_REWARD = -0.1
BOX_ON_TARGET_REWARD = 1.0
SOLVED_REWARD = 10.0

GENERATION_TRIES = 1000  # levels drawn from one seed before giving up
MAX_PULLS = 4  # pulls of the box away from its target while generating a level
# What each step of the floor-carving walk opens around its cell, as (row, column) offsets: a row of
# three, a column of three, two corners and a square.
_SHAPES = (((0, -1), (0, 0), (0, 1)), ((-1, 0), (0, 0), (1, 0)), ((0, -1), (0, 0), (1, 0)),
           ((0, 0), (0, 1), (1, 0)), ((0, -1), (0, 0), (1, -1), (1, 0)))


@dataclass(frozen=True)
class Level:
    """A Sokoban level with one box: the floor cells (everything else is wall), the target, and where
    the box and the player start. ``seed`` is the seed it was generated from (``None`` if drawn by hand).

    Frozen and hashable, so solutions are cached per level; two levels are equal when their boards are,
    whatever their seeds.
    """

    dim: tuple[int, int]
    floor: frozenset[Cell]
    target: Cell
    box: Cell
    player: Cell
    seed: int | None = field(default=None, compare=False)

    def render(self, box: Cell | None = None, player: Cell | None = None) -> str:
        """The board as text (see the module docstring), with the box and the player at their start or
        at the positions given."""
        box = self.box if box is None else box
        player = self.player if player is None else player
        rows = []
        for r in range(self.dim[0]):
            cells = []
            for c in range(self.dim[1]):
                cell, on_target = (r, c), (r, c) == self.target
                if cell == player:
                    cells.append(PLAYER_ON_TARGET if on_target else PLAYER)
                elif cell == box:
                    cells.append(BOX_ON_TARGET if on_target else BOX)
                elif cell in self.floor:
                    cells.append(TARGET if on_target else FLOOR)
                else:
                    cells.append(WALL)
            rows.append(" ".join(cells))
        return "\n".join(rows)

    @classmethod
    def parse(cls, text: str) -> Level:
        """The level drawn in ``text`` (as :meth:`render` writes it; spaces between cells optional), so
        tests and users can write levels by hand. The border must be wall; one box, target and player."""
        rows = [line.split() if " " in line.strip() else list(line.strip()) for line in text.strip().splitlines()]
        if not rows or any(len(row) != len(rows[0]) for row in rows):
            raise ValueError(f"a level is a rectangle of cells; got rows of lengths {[len(r) for r in rows]}")
        floor, targets, boxes, players = set(), [], [], []
        for r, row in enumerate(rows):
            for c, symbol in enumerate(row):
                if symbol not in SYMBOLS:
                    raise ValueError(f"unknown symbol {symbol!r} at row {r}, column {c}; expected one of {SYMBOLS}")
                if symbol == WALL:
                    continue
                floor.add((r, c))
                if symbol in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET):
                    targets.append((r, c))
                if symbol in (BOX, BOX_ON_TARGET):
                    boxes.append((r, c))
                if symbol in (PLAYER, PLAYER_ON_TARGET):
                    players.append((r, c))
        dim = (len(rows), len(rows[0]))
        if any(r in (0, dim[0] - 1) or c in (0, dim[1] - 1) for r, c in floor):
            raise ValueError("the border of a level must be wall (#)")
        if (len(targets), len(boxes), len(players)) != (1, 1, 1):
            raise ValueError(f"a level has exactly one target, box and player; found {len(targets)} target(s), "
                             f"{len(boxes)} box(es), {len(players)} player(s)")
        return cls(dim, frozenset(floor), targets[0], boxes[0], players[0])


def move(level: Level, box: Cell, player: Cell, action: int) -> tuple[Cell, Cell]:
    """``(box, player)`` after ``action`` from ``(box, player)``: the player steps onto free floor, or
    pushes the box when the cell behind it is floor; otherwise nothing moves."""
    dr, dc = MOVES[action]
    ahead = (player[0] + dr, player[1] + dc)
    if ahead not in level.floor:
        return box, player
    if ahead == box:
        beyond = (box[0] + dr, box[1] + dc)
        if beyond not in level.floor:
            return box, player
        return beyond, ahead
    return box, ahead


@lru_cache(maxsize=16384)
def shortest_solution(level: Level) -> tuple[int, ...] | None:
    """The actions of a shortest solution of ``level`` (breadth-first search over the (box, player)
    positions), ``()`` if the box starts on its target, ``None`` if it cannot be solved."""
    start = (level.box, level.player)
    if level.box == level.target:
        return ()
    parent: dict[tuple[Cell, Cell], tuple[tuple[Cell, Cell], int]] = {start: (start, -1)}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for action in range(len(MOVES)):
            nxt = move(level, *state, action)
            if nxt in parent:
                continue
            parent[nxt] = (state, action)
            if nxt[0] == level.target:
                path = []
                while nxt != start:
                    nxt, a = parent[nxt]
                    path.append(a)
                return tuple(reversed(path))
            queue.append(nxt)
    return None


def solve(level: Level) -> int | None:
    """The length of a shortest solution of ``level`` (0 if already solved), ``None`` if unsolvable."""
    path = shortest_solution(level)
    return None if path is None else len(path)


def _reachable(floor: frozenset[Cell], box: Cell, start: Cell) -> list[Cell]:
    """The floor cells the player can walk to from ``start`` without moving the box, in a fixed order."""
    seen, queue = {start}, deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            cell = (r + dr, c + dc)
            if cell in floor and cell != box and cell not in seen:
                seen.add(cell)
                queue.append(cell)
    return sorted(seen)


def _carve_floor(rng: np.random.Generator, dim: tuple[int, int]) -> frozenset[Cell]:
    """Floor cells carved by a random walk inside the walls, as in gym-sokoban's generator (which RAGEN
    uses): ``1.7 * (rows + columns)`` steps that keep their direction or turn with probability 0.35,
    each carving a small shape of :data:`_SHAPES` at the cell reached. The shapes overlap the walk's
    consecutive cells, so the floor is connected."""
    rows, cols = dim
    position = (int(rng.integers(1, rows - 1)), int(rng.integers(1, cols - 1)))
    direction = MOVES[int(rng.integers(4))]
    floor = set()
    for _ in range(int(1.7 * (rows + cols))):
        if rng.random() < 0.35:
            direction = MOVES[int(rng.integers(4))]
        position = (min(max(position[0] + direction[0], 1), rows - 2),
                    min(max(position[1] + direction[1], 1), cols - 2))
        for dr, dc in _SHAPES[int(rng.integers(len(_SHAPES)))]:
            cell = (position[0] + dr, position[1] + dc)
            if 0 < cell[0] < rows - 1 and 0 < cell[1] < cols - 1:
                floor.add(cell)
    return frozenset(floor)


def _draw_level(rng: np.random.Generator, dim: tuple[int, int]) -> Level | None:
    """One attempt at a level by reverse play: the box starts on its target and is pulled away from it
    1 to :data:`MAX_PULLS` times; then the player wanders anywhere it can reach. ``None`` when the box
    could not leave the target."""
    floor = _carve_floor(rng, dim)
    if len(floor) < 3:
        return None
    cells = sorted(floor)
    target = cells[int(rng.integers(len(cells)))]
    others = [c for c in cells if c != target]
    box, player = target, others[int(rng.integers(len(others)))]
    for _ in range(int(rng.integers(1, MAX_PULLS + 1))):
        # A pull in direction d: the player stands at box + d and steps back to box + 2d, the box following.
        reachable = set(_reachable(floor, box, player))
        pulls = []
        for dr, dc in MOVES:
            stand, back = (box[0] + dr, box[1] + dc), (box[0] + 2 * dr, box[1] + 2 * dc)
            if stand in reachable and back in floor:
                pulls.append((stand, back))
        if not pulls:
            break
        box, player = pulls[int(rng.integers(len(pulls)))]
    if box == target:
        return None
    spots = _reachable(floor, box, player)
    return Level(dim, floor, target, box, spots[int(rng.integers(len(spots)))])


@lru_cache(maxsize=16384)
def generate_level(seed: int, dim: tuple[int, int] = (6, 6), max_steps: int = 10) -> Level:
    """The level of ``seed``: the first level drawn by reverse play from ``numpy.random.default_rng(seed)``
    whose shortest solution takes 1 to ``max_steps`` actions. Raises ``RuntimeError`` when
    :data:`GENERATION_TRIES` draws give none (a room too small for the box to move)."""
    rng = np.random.default_rng(int(seed))
    for _ in range(GENERATION_TRIES):
        level = _draw_level(rng, dim)
        if level is not None:
            length = solve(level)
            if length is not None and 1 <= length <= max_steps:
                return Level(level.dim, level.floor, level.target, level.box, level.player, seed=int(seed))
    raise RuntimeError(f"no level solvable in 1 to {max_steps} actions in {GENERATION_TRIES} tries from seed {seed} "
                       f"with dim={dim}; use a larger room or more steps")


class SokobanEnv(gym.Env):
    """Sokoban with one box, the grid as the observation and a generated level per episode (see the
    module docstring).

    Args:
        dim: ``(rows, columns)`` of the room, walls included (each 5 to 16; RAGEN: 6×6).
        num_boxes: boxes per level; only 1 is supported (RAGEN's SimpleSokoban).
        max_steps: actions before an episode is truncated; generated levels are solvable within it.
        levels: the seeds of the levels to play (each reset draws one); ``None`` draws any level.
        render_mode: ``None`` or ``"ansi"`` (the observation text).

    ``reset(options={"level": seed})`` plays the level of that seed, ``options={"level": Level(...)}``
    a level of your own. ``info``: ``level`` (the seed, ``None`` for a level of your own),
    ``solution_length`` (the level's shortest solution), ``steps``, ``moved`` (whether the last action
    moved the player) and ``success`` (the box is on the target).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, dim: tuple[int, int] = (6, 6), num_boxes: int = 1, max_steps: int = 10,
                 levels: Sequence[int] | None = None, render_mode: str | None = None) -> None:
        if num_boxes != 1:
            raise ValueError(f"num_boxes={num_boxes!r}: only 1 box is supported (RAGEN's SimpleSokoban)")
        if (len(dim) != 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in dim)
                or not all(5 <= d <= 16 for d in dim)):
            raise ValueError(f"dim={dim!r}: expected (rows, columns), each an integer from 5 to 16")
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r}: expected an integer of at least 1")
        if levels is not None and len(levels) == 0:
            raise ValueError("levels is empty; pass level seeds, or None for a fresh level every episode")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r}: expected None or 'ansi'")
        self.dim = (int(dim[0]), int(dim[1]))
        self.num_boxes = 1
        self.max_steps = int(max_steps)
        self.levels = None if levels is None else [int(s) for s in levels]
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(ACTIONS))
        rows, cols = self.dim
        self.observation_space = spaces.Text(min_length=1, max_length=rows * 2 * cols - 1, charset=CHARSET)
        self.level: Level | None = None
        self.solution_length = 0
        self._box: Cell = (0, 0)
        self._player: Cell = (0, 0)
        self._steps = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        chosen = (options or {}).get("level")
        if isinstance(chosen, Level):
            level = chosen
        elif chosen is not None:
            level = generate_level(int(chosen), self.dim, self.max_steps)
        elif self.levels is not None:
            level = generate_level(self.levels[int(self.np_random.integers(len(self.levels)))], self.dim,
                                   self.max_steps)
        else:
            level = generate_level(int(self.np_random.integers(2**31)), self.dim, self.max_steps)
        if level.dim != self.dim:
            raise ValueError(f"options['level'] is a {level.dim} level; this env plays {self.dim} levels")
        length = solve(level)
        if not length:  # None: unsolvable; 0: the box starts on the target
            raise ValueError(f"options['level'] must be solvable and not yet solved; its shortest solution is "
                             f"{length}:\n{level.render()}")
        self.level, self.solution_length = level, length
        self._box, self._player = level.box, level.player
        self._steps = 0
        self._done = False
        return self._render_text(), self._info(moved=False)

    def step(self, action):
        if self.level is None:
            raise RuntimeError("step() before reset()")
        check_move(self.action_space, action, ACTIONS)
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset()")
        player = self._player
        self._box, self._player = move(self.level, self._box, self._player, int(action))
        self._steps += 1
        terminated = self._box == self.level.target  # one box: on the target is solved
        reward = STEP_REWARD + (BOX_ON_TARGET_REWARD + SOLVED_REWARD if terminated else 0.0)
        truncated = not terminated and self._steps >= self.max_steps
        self._done = terminated or truncated
        return self._render_text(), reward, terminated, truncated, self._info(moved=self._player != player)

    def render(self):
        if self.render_mode == "ansi":
            return self._render_text()
        return None

    def _render_text(self) -> str:
        return self.level.render(self._box, self._player)

    def _info(self, moved: bool) -> dict:
        return {"level": self.level.seed, "solution_length": self.solution_length, "steps": self._steps,
                "moved": moved, "success": self._box == self.level.target}
