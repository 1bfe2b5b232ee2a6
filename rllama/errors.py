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


class CorruptFileError(RLlamaError):
    """A saved file is missing, damaged or malformed; the message names the file."""


class MissingExtraError(RLlamaError, ImportError):
    """An optional feature's package is not installed; the message names the extra that installs it."""


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the first frame outside rllama: the user's line that led to
    it, not the library's."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def require(module: str, extra: str, feature: str):
    """Import and return ``module``, or raise :class:`MissingExtraError` saying which ``rllama[extra]`` installs
    it (``feature`` names what needs it)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'rllama[{extra}]'") from exc
