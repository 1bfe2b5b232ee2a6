"""The algorithm registry: ``algorithm="ppo"`` names an entry; users add their own with a decorator.

Example:
    >>> from rllama.algorithms import Algorithm, register_algorithm, available
    >>> @register_algorithm("my_pg")
    ... class MyPolicyGradient(Algorithm):
    ...     def update(self):
    ...         return {}
    >>> "my_pg" in available()
    True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

_REGISTRY: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_algorithm(name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Class decorator that registers an :class:`~rllama.algorithms.base.Algorithm` under ``name``.

    Names are case-insensitive. Registering a taken name raises unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"algorithm name must be a non-empty string, got {name!r}")
    key = name.strip().lower()

    def decorator(cls: T) -> T:
        from rllama.algorithms.base import Algorithm

        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register_algorithm({name!r}) decorates {cls!r}, which is not an Algorithm subclass")
        if key in _REGISTRY and _REGISTRY[key] is not cls and not overwrite:
            raise ValueError(
                f"an algorithm named {key!r} is already registered ({_REGISTRY[key].__name__}); "
                "pass overwrite=True to replace it"
            )
        _REGISTRY[key] = cls
        cls.name = key
        return cls

    return decorator


def available() -> list[str]:
    """Names of the registered algorithms, sorted."""
    return sorted(_REGISTRY)


def get_algorithm_class(name: str) -> type:
    """The class registered under ``name``; an unknown name raises with the known ones and a suggestion."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown algorithm {name!r}. Known algorithms: {available()}.{hint}")
    return _REGISTRY[key]


def make_algorithm(algorithm, policy, config=None, seed: int | None = None, scoring: bool | None = None):
    """Build an algorithm from a registered name, a class, or return an instance unchanged.

    Args:
        algorithm: a name (``"ppo"``), an ``Algorithm`` subclass, or an instance.
        policy: the :class:`~rllama.policy.PolicyModel` to train.
        config: the algorithm's config dataclass, or a dict of its fields.
        seed: seeds the algorithm's own random generator (minibatch shuffling).
        scoring: whether the agent scores candidate actions, which decides the config's ``"auto"``
            values (:meth:`~rllama.algorithms.AlgorithmConfig.resolved`); ``None``: unknown.
    """
    from rllama.algorithms.base import Algorithm

    if isinstance(algorithm, Algorithm):
        if config is not None:
            raise ValueError("pass either an algorithm instance or algorithm_config, not both")
        return algorithm
    cls = algorithm if isinstance(algorithm, type) else get_algorithm_class(algorithm)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"algorithm={algorithm!r}: expected a registered name, an Algorithm subclass or instance")
    return cls(policy, cls.resolve_config(config, scoring), seed=seed)
