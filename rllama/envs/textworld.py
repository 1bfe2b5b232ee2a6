"""TextWorld as a Gymnasium env: ``gym.make("rllama/TextWorld-v0", games=...)``.

TextWorld (Microsoft) generates and compiles text adventure games offline; its own ``textworld.gym``
envs use a 4-tuple API. :class:`TextWorldEnv` is a real Gymnasium env:

- ``reset(seed=..., options={"game": i})`` picks one of its games (at random from the seed, or game
  ``i``) and starts it; ``step(command)`` returns the 5-tuple. The reward is the change of the game's
  score (plus ``intermediate_reward_weight`` times TextWorld's intermediate reward, 0 by default).
  ``terminated`` when the game is won or lost. ``gym.make`` wraps it in Gymnasium's ``TimeLimit``
  (50 commands; ``gym.make(..., max_episode_steps=20)`` to change); the class made directly
  truncates after ``max_steps`` commands if given.
- Observation: the game's text (``spaces.Text``), cleaned of the interpreter's banner and status
  line. With ``admissible_commands_in_observation=True`` it is a dict ``{"text": ..., "admissible_commands":
  (...)}`` instead, so an agent's ``get_valid_actions(observation)`` can score the admissible commands.
- Action: a command string (``spaces.Text``). Any string is accepted: backslashes and control
  characters are removed and the command is cut to ``max_command_length`` characters before it
  reaches the interpreter; an empty command gets the game's own "I beg your pardon?".
- ``info``: ``admissible_commands``, ``score``, ``max_score``, ``won``, ``lost``, ``moves``,
  ``objective``, ``walkthrough`` (the winning commands from the start), ``game`` (the file), ``command``
  (the command as sent).

Games come from :func:`rllama.envs.textworld_games.make_games` (generated once, then cached), or any
list of TextWorld game files (``.z8`` / ``.ulx``).
"""

from __future__ import annotations

import os
import re
import string
import warnings
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rllama.envs.textworld_games import DEFAULT_FAMILY, make_games, require_textworld
from rllama.errors import RLlamaError

CHARSET = frozenset(string.printable)
MAX_ENGINE_COMMAND = 190  # jericho truncates commands longer than 198 bytes, with a warning
_STATUS_LINE = re.compile(r"\n?>\s[^\n]*$")  # the interpreter's prompt and status bar at the end


def clean_text(text: str, max_length: int | None = None) -> str:
    """Game text without the interpreter's status line, with printable characters only and at most
    two consecutive newlines; cut to ``max_length`` characters."""
    text = _STATUS_LINE.sub("", text or "")
    text = "".join(c if c in CHARSET else " " for c in text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if max_length is not None and len(text) > max_length:
        text = text[: max_length - 3].rstrip() + "..."
    return text


def sanitize_command(command: str, max_length: int = 180) -> str:
    """A command safe for the interpreter: no backslashes or control characters, one line, short."""
    text = "".join(c if c in CHARSET and c not in "\\\r\n\t\x0b\x0c" else " " for c in command)
    return " ".join(text.split())[:max_length]


class TextWorldEnv(gym.Env):
    """A set of TextWorld games as one Gymnasium env (see the module docstring).

    Args:
        games: game files (``.z8`` / ``.ulx``), a folder of them, or ``None`` for the default family
            (:data:`rllama.envs.textworld_games.DEFAULT_FAMILY`, 8 games, generated on first use).
        max_steps: commands before the env itself truncates the episode (``None``: never; ``gym.make``
            adds a ``TimeLimit`` of ``max_episode_steps`` instead).
        admissible_commands_in_observation: observations are ``{"text", "admissible_commands"}`` dicts.
        intermediate_reward_weight: weight of TextWorld's intermediate reward (+1 for a step toward
            the goal, -1 for one that makes it unreachable) added to the score change.
        max_observation_length: longest observation text (the observation space's bound).
        max_command_length: longest command (the action space's bound); longer ones are cut.
        render_mode: ``"ansi"`` or ``None``.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        games: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        *,
        max_steps: int | None = None,
        admissible_commands_in_observation: bool = False,
        intermediate_reward_weight: float = 0.0,
        max_observation_length: int = 4096,
        max_command_length: int = 180,
        render_mode: str | None = None,
    ) -> None:
        self._tw = require_textworld()
        self.games = _resolve_games(games)
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps={max_steps}; expected None or at least 1")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode={render_mode!r}; TextWorldEnv supports None or 'ansi'")
        self.max_steps = None if max_steps is None else int(max_steps)
        self.admissible_commands_in_observation = bool(admissible_commands_in_observation)
        self.intermediate_reward_weight = float(intermediate_reward_weight)
        self.max_observation_length = int(max_observation_length)
        if not 1 <= max_command_length <= MAX_ENGINE_COMMAND:
            raise ValueError(f"max_command_length={max_command_length}; the interpreter takes 1..{MAX_ENGINE_COMMAND}")
        self.max_command_length = int(max_command_length)
        self.render_mode = render_mode
        text = spaces.Text(max_length=self.max_observation_length, min_length=1, charset="".join(sorted(CHARSET)))
        if self.admissible_commands_in_observation:
            command = spaces.Text(max_length=self.max_command_length, min_length=1,
                                  charset="".join(sorted(CHARSET)))
            self.observation_space = spaces.Dict({"text": text, "admissible_commands": spaces.Sequence(command)})
        else:
            self.observation_space = text
        self.action_space = spaces.Text(max_length=self.max_command_length, min_length=0,
                                        charset="".join(sorted(CHARSET)))
        self._infos = self._tw.EnvInfos(admissible_commands=True, won=True, lost=True, score=True, max_score=True,
                                        policy_commands=True, description=True, objective=True, moves=True,
                                        feedback=True, intermediate_reward=True, inventory=True)
        self._engines: dict[int, object] = {}
        self._game = -1
        self._state = None
        self._steps = 0
        self._last_text = ""
        self._done = True

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "game" in options:
            game = int(options["game"])
            if not 0 <= game < len(self.games):
                raise ValueError(f"options['game']={game}; this env has games 0..{len(self.games) - 1}")
        else:
            game = int(self.np_random.integers(len(self.games)))
        self._game = game
        engine = self._engine(game)
        try:
            self._state = engine.reset()
        except Exception as exc:  # the interpreter failed to start the game
            raise RLlamaError(f"TextWorld could not start {self.games[game]}: {type(exc).__name__}: {exc}") from exc
        self._steps = 0
        self._done = False
        objective = self._state["objective"] or ""
        text = f"{objective}\n\n{self._state['description'] or ''}" if objective else self._state.feedback
        obs = self._observation(text)
        return obs, self._info(command=None)

    def step(self, action):
        if self._state is None:
            raise RLlamaError("TextWorldEnv.step() before reset()")
        if isinstance(action, np.str_):
            action = str(action)
        if not isinstance(action, str):
            raise TypeError(f"TextWorldEnv actions are command strings, got {type(action).__name__}: {action!r:.80}")
        if self._done:
            raise RLlamaError("TextWorldEnv.step() after the episode ended; call reset()")
        command = sanitize_command(action, self.max_command_length)
        previous_score = self._state["score"] or 0
        try:
            self._state, score, done = self._engine(self._game).step(command)
        except Exception as exc:  # the interpreter died: end the episode with a clear message
            self._done = True
            self._engines.pop(self._game, None)
            text = f"[The game engine failed on the command {command!r}: {type(exc).__name__}: {exc}]"
            return self._observation(text), 0.0, True, False, dict(self._info(command), engine_error=str(exc))
        self._steps += 1
        reward = float((score or 0) - previous_score)
        if self.intermediate_reward_weight:
            reward += self.intermediate_reward_weight * float(self._state["intermediate_reward"] or 0)
        terminated = bool(self._state["won"] or self._state["lost"] or done)
        truncated = not terminated and self.max_steps is not None and self._steps >= self.max_steps
        self._done = terminated or truncated
        return self._observation(self._state.feedback), reward, terminated, truncated, self._info(command)

    def render(self):
        if self.render_mode == "ansi":
            return self._last_text
        return None

    def close(self) -> None:
        for engine in self._engines.values():
            try:
                engine.close()
            except Exception:
                pass
        self._engines.clear()
        super().close()

    # ------------------------------------------------------------------ helpers
    def _engine(self, game: int):
        engine = self._engines.get(game)
        if engine is None:
            with warnings.catch_warnings():  # jericho warns that TextWorld's own games are "not fully supported"
                warnings.filterwarnings("ignore", message=".*not fully supported.*")
                engine = self._tw.start(str(self.games[game]), request_infos=self._infos)
            self._engines[game] = engine
        return engine

    def _observation(self, text: str):
        text = clean_text(text, self.max_observation_length) or "(nothing happens)"
        self._last_text = text
        if not self.admissible_commands_in_observation:
            return text
        return {"text": text, "admissible_commands": tuple(self._admissible())}

    def _admissible(self) -> list[str]:
        commands = (self._state["admissible_commands"] or []) if self._state is not None else []
        return sorted({sanitize_command(c, self.max_command_length) for c in commands} - {""})

    def _info(self, command: str | None) -> dict:
        s = self._state
        return {
            "admissible_commands": self._admissible(),
            "score": int(s["score"] or 0),
            "max_score": int(s["max_score"] or 0),
            "won": bool(s["won"]),
            "lost": bool(s["lost"]),
            "moves": int(s["moves"] or 0),
            "objective": s["objective"] or "",
            "walkthrough": list(s["policy_commands"] or []) if command is None else [],
            "game": str(self.games[self._game]),
            "command": command,
        }


def _resolve_games(games) -> list[Path]:
    if games is None:
        return make_games(DEFAULT_FAMILY)
    if isinstance(games, (str, os.PathLike)):
        path = Path(games).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".z8", ".ulx"))
            if not found:
                raise FileNotFoundError(f"no TextWorld game files (.z8, .ulx) in {path}")
            return found
        games = [path]
    out = [Path(g).expanduser() for g in games]
    if not out:
        raise ValueError("games is empty; pass game files, a folder of them, or None for the default family")
    missing = [str(p) for p in out if not p.exists()]
    if missing:
        raise FileNotFoundError(f"TextWorld game files not found: {missing[:3]}")
    bad = [str(p) for p in out if p.suffix not in (".z8", ".ulx")]
    if bad:
        raise ValueError(f"not TextWorld game files (.z8 or .ulx): {bad[:3]}")
    return out
