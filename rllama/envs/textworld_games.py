"""Generating families of TextWorld games offline, cached so later runs reuse them.

A :class:`GameFamily` fixes the shape of the games (rooms, objects, quest length, theme); each seed
gives one game of that family. :func:`make_games` generates the games that are not in the cache yet
with TextWorld's own generator (about 2–5 s a game on one core) and returns their paths::

    from rllama.envs.textworld_games import GameFamily, make_games

    family = GameFamily(nb_rooms=3, nb_objects=4, quest_length=2)
    train = make_games(family, seeds=range(0, 16))
    held_out = make_games(family, seeds=range(1000, 1008))

The cache is ``$RLLAMA_CACHE/textworld/<family>/`` (default ``~/.cache/rllama``). Each game is
generated in a temporary folder and moved into place when complete, so an interrupted run never
leaves a half-written game behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from rllama.errors import require
from rllama.policy.loading import cache_dir


def require_textworld():
    """The ``textworld`` module, or an error saying how to install it (it builds jericho from source: gcc and
    make must be present)."""
    return require("textworld", "textworld", "TextWorld (it builds jericho from source and needs gcc and make)")


@dataclass(frozen=True)
class GameFamily:
    """The shape of a family of generated games.

    Attributes:
        nb_rooms: rooms in the world.
        nb_objects: objects placed in the world (besides the quest's).
        quest_length: commands in the shortest winning walkthrough.
        quest_breadth: parallel sub-quests (1 = one chain of commands).
        theme: TextWorld's theme (``"house"``).
    """

    nb_rooms: int = 3
    nb_objects: int = 4
    quest_length: int = 2
    quest_breadth: int = 1
    theme: str = "house"

    def __post_init__(self) -> None:
        for name in ("nb_rooms", "quest_length", "quest_breadth"):
            if getattr(self, name) < 1:
                raise ValueError(f"GameFamily.{name}={getattr(self, name)}; expected at least 1")
        if self.nb_objects < 0:
            raise ValueError(f"GameFamily.nb_objects={self.nb_objects}; expected >= 0")

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return (f"r{self.nb_rooms}-o{self.nb_objects}-q{self.quest_length}-b{self.quest_breadth}-"
                f"{self.theme}-{digest}")


DEFAULT_FAMILY = GameFamily()
DEFAULT_SEEDS = range(8)


def game_path(family: GameFamily, seed: int, root: Path | None = None) -> Path:
    """Where the game of ``family`` and ``seed`` is cached."""
    return (root or cache_dir() / "textworld") / family.name / f"game_{int(seed)}.z8"


def make_games(family: GameFamily = DEFAULT_FAMILY, seeds: Iterable[int] = DEFAULT_SEEDS,
               root: str | Path | None = None, progress: bool = False) -> list[Path]:
    """Paths of the games of ``family`` for ``seeds``, generating those not cached yet."""
    root = Path(root) if root is not None else None
    paths = []
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("make_games needs at least one seed")
    missing = [s for s in seeds if not game_path(family, s, root).exists()]
    if missing:
        tw = require_textworld()
        for i, seed in enumerate(missing):
            if progress:
                print(f"generating TextWorld game {i + 1}/{len(missing)} ({family.name}, seed {seed})", flush=True)
            _generate(tw, family, seed, game_path(family, seed, root))
    for seed in seeds:
        paths.append(game_path(family, seed, root))
    return paths


def _generate(tw, family: GameFamily, seed: int, target: Path) -> None:
    from textworld import GameOptions

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".tmp-{seed}-") as tmp:
        options = GameOptions()
        options.seeds = seed
        options.nb_rooms = family.nb_rooms
        options.nb_objects = family.nb_objects
        options.quest_length = family.quest_length
        options.quest_breadth = family.quest_breadth
        options.theme = family.theme
        options.file_ext = ".z8"
        options.path = str(Path(tmp) / target.name)
        options.force_recompile = True
        game_file, _ = tw.make(options)
        produced = Path(game_file)
        sidecar = produced.with_suffix(".json")
        if sidecar.exists():
            shutil.move(str(sidecar), str(target.with_suffix(".json")))
        shutil.move(str(produced), str(target))  # last: the .z8 marks the game as complete
