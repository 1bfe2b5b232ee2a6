"""What episodic memory holds: :class:`Experience`, one remembered step. It has a module of its own,
below both :mod:`rllama.memory.episodic` (which stores and retrieves experiences) and
:mod:`rllama.memory.store` (which writes them to disk and reads them back), so that the store needs
nothing from the memory it saves. ``rllama.memory`` and ``rllama.memory.episodic`` re-export it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Experience:
    """One remembered step.

    Attributes:
        observation: the observation text the agent saw (what retrieval matches against).
        action: the action text it chose.
        reward: the reward of that step.
        return_to_go: the discounted return from this step to the episode's end.
        episode_return: the episode's undiscounted total return.
        outcome: a short word for how the episode ended (``"won"``, ``"lost"``, ``"truncated"``, ...).
        lesson: optional free text (written by the agent's ``episode_lesson`` hook or by hand).
        metadata: anything JSON-serialisable.
        id: assigned by the memory on insertion (increasing; also the insertion order).
    """

    observation: str
    action: str
    reward: float = 0.0
    return_to_go: float = 0.0
    episode_return: float = 0.0
    outcome: str | None = None
    lesson: str | None = None
    metadata: dict = field(default_factory=dict)
    id: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.observation, str) or not isinstance(self.action, str):
            raise TypeError(
                f"Experience needs observation and action as str, got {type(self.observation).__name__} and "
                f"{type(self.action).__name__}"
            )
        for name in ("reward", "return_to_go", "episode_return"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"Experience.{name}={value} is not finite")
            setattr(self, name, value)
