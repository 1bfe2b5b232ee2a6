"""Exceptions raised by rllama.

Every error names the value that was wrong and what was expected, so a user sees the problem at
the line where it entered rather than a traceback from deep inside torch.
"""

from __future__ import annotations


class RLlamaError(Exception):
    """Base class of the errors rllama raises on purpose."""


class HookError(RLlamaError):
    """A user hook (``format_observation``, ``extract_action`` ...) raised or returned a bad value."""


class ModelNotFoundError(RLlamaError, FileNotFoundError):
    """A model path does not exist, or the embedded default model is not installed."""


class InvalidActionError(RLlamaError, ValueError):
    """``extract_action`` returned an action outside the environment's action space."""


class AgentStateError(RLlamaError, RuntimeError):
    """A loop method was called out of order (for example ``assign_reward`` before ``act``)."""
