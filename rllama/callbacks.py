"""One callback convention for every training entry point (in the spirit of Stable-Baselines3's callbacks).

A :class:`Callback` receives a run's events; override what you need. ``agent.train``,
:class:`~rllama.async_rl.AsyncTrainer` and the experiment runner (``rllama train``, where every
logger is a callback) all take callbacks; where only updates happen (``agent.train``,
``AsyncTrainer.train``) only :meth:`Callback.on_update` is called. A plain function
``fn(stats) -> bool | None`` is accepted as a shorthand for a callback with that ``on_update``.
``on_update`` (and ``on_segment``) returning ``False`` stops training after the current update
(segment).

This module imports nothing of rllama: it sits at the bottom of the import graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class Callback:
    """Receives a run's events; override what you need.

    The experiment runner sends records (dicts) with a ``"kind"``: ``"update"`` (an update's
    statistics), ``"segment"`` (after each segment of episodes) and ``"eval"`` (a greedy
    evaluation); see :mod:`rllama.experiment.loggers`.
    """

    def on_run_start(self, config: dict[str, Any], run_dir: Path, resumed_from: Path | None) -> None: ...

    def on_update(self, record: dict[str, Any]) -> bool | None: ...

    def on_segment(self, record: dict[str, Any]) -> bool | None: ...

    def on_eval(self, record: dict[str, Any]) -> None: ...

    def on_checkpoint(self, path: Path, record: dict[str, Any]) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None: ...


UpdateHook = Callable[[dict[str, Any]], bool | None]
CallbackLike = Callback | UpdateHook | Iterable[Callback | UpdateHook] | None


def update_hooks(callbacks: CallbackLike) -> list[UpdateHook]:
    """The ``on_update`` functions of ``callbacks``: ``None``, a :class:`Callback`, a function taking an update's
    statistics, or a list of these. Anything else is an error naming what was passed."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or callable(callbacks) or hasattr(callbacks, "on_update"):
        callbacks = [callbacks]
    elif not isinstance(callbacks, Iterable):
        raise TypeError(f"callback {callbacks!r}: expected a rllama Callback, a function of an update's statistics, "
                        "or a list of these")
    hooks = []
    for cb in callbacks:
        if isinstance(cb, Callback) or (not callable(cb) and callable(getattr(cb, "on_update", None))):
            hooks.append(cb.on_update)
        elif callable(cb):
            hooks.append(cb)
        else:
            raise TypeError(f"callback {cb!r}: expected a rllama Callback or a function of an update's statistics")
    return hooks


def wants_stop(hooks: list[UpdateHook], stats: dict[str, Any]) -> bool:
    """Call every hook with ``stats`` (all of them, even after one asked to stop); whether any returned ``False``."""
    answers = [hook(stats) for hook in hooks]
    return any(answer is False for answer in answers)
