"""FrozenLake on random maps, observed as text: ``rllama/FrozenLake-v0``.

Gymnasium's ``FrozenLake-v1`` observes only the player's cell number, so a model cannot see the map;
here every observation is the grid itself, and every episode may be played on another map. The
settings follow RAGEN's FrozenLake (the peer that publishes LLM figures on it): 4×4 maps from
Gymnasium's own generator (each cell frozen with probability ``p = 0.8``, a path from start to
goal guaranteed), slippery ice (the intended move with probability 1/3, each perpendicular one with
1/3, Gymnasium's rule), at most 20 actions an episode, and RAGEN's symbols:

    P  the player        _  frozen ice        O  a hole
    G  the goal          X  the player in a hole   √  the player on the goal

The reward is Gymnasium's: 1 on reaching the goal, 0 otherwise. Actions are Gymnasium's
(0 left, 1 down, 2 right, 3 up).

Maps come from seeds: ``maps=range(0, 1000)`` trains on those maps and ``maps=range(10_000, 10_100)``
holds out others; without ``maps`` each episode draws a fresh seed. :func:`optimal_success` gives,
by value iteration over the map's transition probabilities, the best success rate any policy can
reach within the step limit: the upper bound of a benchmark on held-out maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map

from rllama.envs.moves import check_move

ACTIONS = ("left", "down", "right", "up")
"""Move names in Gymnasium's action order."""

SYMBOLS = {"S": "_", "F": "_", "H": "O", "G": "G"}  # the map's cells; the player's cell is drawn over them
CHARSET = "PGOX√_\n"


def make_map(seed: int, size: int = 4, p: float = 0.8) -> tuple[str, ...]:
    """The map of ``seed``: rows of ``S`` (start), ``F`` (frozen), ``H`` (hole), ``G`` (goal)."""
    return tuple(generate_random_map(size=size, p=p, seed=int(seed)))


@lru_cache(maxsize=4096)
def optimal_success(desc: tuple[str, ...], is_slippery: bool, max_steps: int) -> float:
    """The highest probability of reaching the goal within ``max_steps`` moves from the start, over
    all policies (finite-horizon value iteration on the map's exact transitions)."""
    env = FrozenLakeEnv(desc=list(desc), is_slippery=is_slippery)
    n = env.observation_space.n
    goal = np.array([c == "G" for row in desc for c in row])
    value = goal.astype(np.float64)  # with no move left, only standing on the goal counts
    for _ in range(max_steps):
        new = value.copy()
        for s in range(n):
            if goal[s] or desc[s // len(desc[0])][s % len(desc[0])] == "H":
                continue
            new[s] = max(sum(p * value[s2] for p, s2, _r, _d in env.P[s][a]) for a in range(4))
        value = new
    return float(value[0])


class FrozenLakeText(gym.Env):
    """FrozenLake with the grid as the observation and a map per episode.

    Args:
        size: the side of the square map (2 to 12).
        p: the probability that a generated cell is frozen (not a hole).
        is_slippery: Gymnasium's slippery ice (the intended move one time in three).
        max_steps: actions before an episode is truncated.
        maps: the seeds of the maps to play (each reset draws one); ``None`` draws any map.
        render_mode: ``None`` or ``"ansi"`` (the observation text).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, size: int = 4, p: float = 0.8, is_slippery: bool = True, max_steps: int = 20,
                 maps: Sequence[int] | None = None, render_mode: str | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 2 <= size <= 12:
            raise ValueError(f"size={size!r}: expected an integer from 2 to 12 (a size x size map)")
        if not 0 < p <= 1:
            raise ValueError(f"p={p!r}: expected the probability of a frozen cell, in (0, 1]")
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r}: expected at least 1")
        if maps is not None and len(maps) == 0:
            raise ValueError("maps is empty; pass map seeds, or None for a fresh map every episode")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r}: expected None or 'ansi'")
        self.size, self.p, self.is_slippery, self.max_steps = int(size), float(p), bool(is_slippery), int(max_steps)
        self.maps = None if maps is None else [int(m) for m in maps]
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(4)
        self.observation_space = spaces.Text(max_length=self.size * (self.size + 1), charset=CHARSET)
        self.desc: tuple[str, ...] | None = None
        self.map_seed: int | None = None
        self._lake: FrozenLakeEnv | None = None
        self._position = 0
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "map" in options:
            self.map_seed = int(options["map"])
        elif self.maps is not None:
            self.map_seed = self.maps[int(self.np_random.integers(len(self.maps)))]
        else:
            self.map_seed = int(self.np_random.integers(2**31))
        self.desc = make_map(self.map_seed, self.size, self.p)
        self._lake = FrozenLakeEnv(desc=list(self.desc), is_slippery=self.is_slippery)
        self._position, _ = self._lake.reset(seed=int(self.np_random.integers(2**31)))
        self._steps = 0
        return self._render_text(), self._info(False)

    def step(self, action):
        if self._lake is None:
            raise RuntimeError("step() before reset()")
        check_move(self.action_space, action, ACTIONS)
        self._position, reward, terminated, _truncated, _ = self._lake.step(int(action))
        self._steps += 1
        truncated = not terminated and self._steps >= self.max_steps
        success = bool(terminated and reward > 0)
        return self._render_text(), float(reward), bool(terminated), truncated, self._info(success)

    def _info(self, success: bool) -> dict:
        return {"map": self.map_seed, "success": success}

    def optimal_success(self) -> float:
        """The best success rate on the current map within ``max_steps`` (:func:`optimal_success`)."""
        if self.desc is None:
            raise RuntimeError("optimal_success() before reset()")
        return optimal_success(self.desc, self.is_slippery, self.max_steps)

    def _render_text(self) -> str:
        rows = []
        for r, row in enumerate(self.desc):
            cells = []
            for c, cell in enumerate(row):
                if r * self.size + c == self._position:
                    cells.append({"H": "X", "G": "√"}.get(cell, "P"))
                else:
                    cells.append(SYMBOLS[cell])
            rows.append("".join(cells))
        return "\n".join(rows)

    def render(self):
        if self.render_mode == "ansi":
            return self._render_text()
        return None
