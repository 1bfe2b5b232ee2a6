"""Ready-made agents (also what the CLI's built-in agent names refer to).

- ``blackjack``: :class:`BlackjackAgent` for Gymnasium's ``Blackjack-v1``.
- ``textworld``: :class:`TextWorldAgent` for ``rllama/TextWorld-v0``.
- ``frozenlake``: :class:`FrozenLakeAgent` for ``rllama/FrozenLake-v0``.
- ``sokoban``: :class:`SokobanAgent` for ``rllama/Sokoban-v0``.
"""

from rllama.agents.blackjack import BlackjackAgent
from rllama.agents.frozenlake import FrozenLakeAgent
from rllama.agents.sokoban import SokobanAgent
from rllama.agents.textworld import TextWorldAgent

BUILTIN_AGENTS = {"blackjack": BlackjackAgent, "textworld": TextWorldAgent, "frozenlake": FrozenLakeAgent,
                  "sokoban": SokobanAgent}

__all__ = ["BUILTIN_AGENTS", "BlackjackAgent", "FrozenLakeAgent", "SokobanAgent", "TextWorldAgent"]
