"""The check the grid envs share: an action must be one of their named moves."""

from __future__ import annotations

from collections.abc import Sequence

from rllama.errors import InvalidActionError


def check_move(space, action, names: Sequence[str]) -> None:
    """Raise :class:`~rllama.errors.InvalidActionError` naming the valid moves unless ``action`` is in ``space``."""
    if not space.contains(action):
        raise InvalidActionError(f"action {action!r} is not one of the {len(names)} moves: "
                                 + ", ".join(f"{i} ({name})" for i, name in enumerate(names)))
