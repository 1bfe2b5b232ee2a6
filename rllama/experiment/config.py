"""Run configuration: one dataclass, read from YAML and overridden by flags.

A YAML file holds any subset of :class:`RunConfig`'s fields::

    env: Blackjack-v1
    env_kwargs: {sab: true}
    agent: blackjack                 # a built-in name, "package.module:Class" or "path/to/file.py:Class"
    algorithm: ppo
    algorithm_config: {learning_rate: 3.0e-5}
    episodes: 640
    memory: {episodic: {k: 4}, working: {max_tokens: 256}}

and ``--set algorithm_config.learning_rate=1e-4`` (dotted keys, YAML values) overrides any field
from the command line. Unknown keys are errors that name the key and the known ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rllama.errors import RLlamaError
from rllama.experiment.loggers import LOGGERS


class ConfigError(RLlamaError):
    """A run configuration is invalid (unknown key, wrong type, impossible value)."""


@dataclass
class RunConfig:
    """Everything that defines a training run.

    Attributes:
        env: a Gymnasium env id (``"Blackjack-v1"``, ``"rllama/TextWorld-v0"``, ...).
        env_kwargs: keyword arguments of ``gym.make`` for each env (``Blackjack-v1`` gets
            ``sab=True``, the rules of the exact reference returns, unless set here).
        num_envs: environments in the (synchronous) vector env.
        agent: ``"blackjack"`` / ``"textworld"`` (:mod:`rllama.agents`), ``"module:Class"`` or
            ``"file.py:Class"``.
        agent_kwargs: extra keyword arguments of the agent's constructor.
        model: ``None`` (embedded default), a local folder or a hub id.
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        algorithm: a registered algorithm name.
        algorithm_config: fields of the algorithm's config dataclass.
        memory: ``{"episodic": {EpisodicMemory kwargs}, "working": {WorkingMemory kwargs}}`` (either optional).
        episodes: training episodes in total.
        segment_episodes: episodes per segment. Each segment starts by resetting the envs with a
            seed derived from ``seed`` and the segment's index and ends when all its episodes are
            done; checkpoints and evaluations happen between segments.
        eval_every: episodes between evaluations (a multiple of ``segment_episodes``; 0: only at
            the start and the end).
        eval_episodes: greedy evaluation episodes (0: no evaluation).
        eval_seed: env seed of evaluation episodes (the same episodes every time).
        checkpoint_every: episodes between checkpoints (a multiple of ``segment_episodes``).
        keep_checkpoints: checkpoints kept on disk (oldest removed first; the final one always stays).
        seed: seeds the agent, the algorithm and the env resets.
        output_dir: folder under which the run folder is made.
        name: the run folder's name (default: ``<agent>-<algorithm>-seed<seed>``).
        loggers: any of ``"console"``, ``"jsonl"``, ``"wandb"``, ``"mlflow"``.
        wandb: ``wandb.init`` keyword arguments (``project``, ``group``, ``mode``, ``tags``, ...).
        mlflow: :class:`~rllama.experiment.loggers.MLflowLogger` arguments (``tracking_uri``,
            ``experiment``, ``run_name``, ``tags``); by default a local ``mlruns/`` folder.
        threads: torch threads: ``"auto"`` (default) half the cores this process may use, at least one
            (:func:`auto_threads`; on 2 cores one thread was as fast as two alone and 3× faster beside
            another busy process, ``benchmarks/README.md``), a number, or ``0`` (or ``None``) for torch's
            default (one per core).
        progress: show progress bars.
    """

    env: str = "Blackjack-v1"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    num_envs: int = 16
    agent: str = "blackjack"
    agent_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    precision: str = "auto"
    algorithm: str = "ppo"
    algorithm_config: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] | None = None
    episodes: int = 640
    segment_episodes: int = 64
    eval_every: int = 320
    eval_episodes: int = 200
    eval_seed: int = 10_000
    checkpoint_every: int = 64
    keep_checkpoints: int = 2
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    wandb: dict[str, Any] = field(default_factory=lambda: {"project": "rllama"})
    mlflow: dict[str, Any] = field(default_factory=dict)
    threads: int | str | None = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "str": str, "bool": bool}.get(str(f.type))
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{f.name}={value!r}: expected an integer")
            if expected is str and not isinstance(value, str):
                raise ConfigError(f"{f.name}={value!r}: expected a string")
        for name in ("num_envs", "episodes", "segment_episodes", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected at least 1")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value < 0 or value % self.segment_episodes:
                raise ConfigError(f"{name}={value}: expected 0 or a multiple of segment_episodes="
                                  f"{self.segment_episodes}")
        if self.eval_episodes < 0:
            raise ConfigError(f"eval_episodes={self.eval_episodes}: expected >= 0")
        if not (self.threads is None or self.threads == "auto"
                or (isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads >= 0)):
            raise ConfigError(f"threads={self.threads!r}: expected 'auto', a number of threads, or 0 (torch's "
                              "default)")
        unknown = set(self.loggers) - set(LOGGERS)
        if unknown:
            raise ConfigError(f"loggers {sorted(unknown)} unknown; choose from {', '.join(LOGGERS)}")
        mlflow_keys = {"tracking_uri", "experiment", "run_name", "tags"}
        bad = set(self.mlflow) - mlflow_keys if isinstance(self.mlflow, dict) else ()
        if bad:
            raise ConfigError(f"mlflow: unknown keys {sorted(bad)}; expected tracking_uri, experiment, run_name, tags")
        if self.memory is not None:
            if not isinstance(self.memory, dict) or set(self.memory) - {"episodic", "working"}:
                raise ConfigError(f"memory={self.memory!r}: expected a dict with keys 'episodic' and/or 'working'")
        for name in ("env_kwargs", "agent_kwargs", "algorithm_config", "wandb", "mlflow"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a mapping")
        self._check_algorithm()

    def _check_algorithm(self) -> None:
        from rllama.algorithms import available
        from rllama.algorithms.registry import get_algorithm_class

        if self.algorithm not in available():
            raise ConfigError(f"algorithm={self.algorithm!r} is not registered; available: {', '.join(available())}")
        known = {f.name for f in dataclasses.fields(get_algorithm_class(self.algorithm).config_class)}
        unknown = set(self.algorithm_config) - known
        if unknown:
            raise ConfigError(f"algorithm_config keys {sorted(unknown)} are not fields of {self.algorithm}'s config; "
                              f"known: {sorted(known)}")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.agent.split(':')[-1].lower()}-{self.algorithm}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def plan(self) -> str:
        """One line saying what the run will do: its training episodes, and how many evaluation episodes
        come with them (they can outnumber a short run's training episodes)."""
        import math

        segments = math.ceil(self.episodes / self.segment_episodes)
        evals = 0
        if self.eval_episodes:
            evals = 1 + sum(1 for k in range(segments) if k == segments - 1
                            or (self.eval_every and (k + 1) * self.segment_episodes % self.eval_every == 0))
        when = "at the start, " + (f"every {self.eval_every} episodes and " if self.eval_every else "") + "at the end"
        evaluation = (f"{evals} greedy evaluations of {self.eval_episodes} episodes ({when}: "
                      f"{evals * self.eval_episodes} episodes)" if evals else "no evaluation")
        plural = "s" if segments > 1 else ""
        threads = resolve_threads(self.threads)
        threads = f"{threads} torch thread{'s' if threads != 1 else ''}" if threads else "torch's default threads"
        return (f"{self.episodes} training episodes ({self.agent}, {self.algorithm}, {self.num_envs} envs) in "
                f"{segments} segment{plural} of {self.segment_episodes}; {evaluation}; {threads}; run folder "
                f"{self.run_dir}")

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, not {type(values).__name__}")
        try:
            return cls.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        """Write the config to ``path`` as YAML (atomically: a crash leaves the old file or this one)."""
        from rllama.fileio import atomic_write

        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with dotted keys set (``{"algorithm_config.learning_rate": 1e-4}``)."""
        values = self.to_dict()
        for key, value in overrides.items():
            set_dotted(values, key, value)
        return type(self).from_dict(values)


def set_dotted(values: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"bad override key {key!r}")
    target = values
    for part in parts[:-1]:
        if target.get(part) is None:
            target[part] = {}
        if not isinstance(target[part], dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a mapping")
        target = target[part]
    target[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a.b": 1, "c": [1, 2]}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return out


CODE_HELP = ("rllama runs code named in a configuration file or a run folder only when asked: pass --allow-code "
             "on the command line (or name it there with --agent/--env), allow_code=True in Python")


def code_specs(config: RunConfig) -> list[tuple[str, str]]:
    """The ``(field, spec)`` pairs of ``config`` that name code to import or run: an agent that is not
    built in, an env given as ``"module:Class"`` or ``"module:EnvId"``."""
    from rllama.agents import BUILTIN_AGENTS

    found = []
    if config.agent not in BUILTIN_AGENTS:
        found.append(("agent", config.agent))
    if ":" in config.env:
        found.append(("env", config.env))
    return found


def check_code(config: RunConfig, allow_code: bool | Collection[str], source: str) -> None:
    """Refuse a config from ``source`` that names code, unless ``allow_code`` is ``True`` or lists the
    spec (an allow-list of the specs the user typed)."""
    if allow_code is True:
        return
    allowed = set() if allow_code is False else set(allow_code)
    refused = [(f, spec) for f, spec in code_specs(config) if spec not in allowed]
    if refused:
        named = ", ".join(f"{f}={spec!r}" for f, spec in refused)
        raise ConfigError(f"{source} names code to run ({named}); {CODE_HELP}")


def resolve_agent_class(spec: str, allow_code: bool = True):
    """The agent class for a built-in name, ``"module:Class"`` or ``"path/to/file.py:Class"`` (these two
    only with ``allow_code``; a file must define the class at its top level, checked before it runs)."""
    from rllama.agent import RLlamaAgent
    from rllama.agents import BUILTIN_AGENTS

    if spec in BUILTIN_AGENTS:
        return BUILTIN_AGENTS[spec]
    if ":" not in spec:
        raise ConfigError(
            f"agent={spec!r}: expected one of {sorted(BUILTIN_AGENTS)}, 'module:Class' or 'file.py:Class'"
        )
    if not allow_code:
        raise ConfigError(f"agent={spec!r} names code to run; {CODE_HELP}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"agent={spec!r}: {where} does not exist")
        _check_defines_class(path, name, spec)
        module_name = f"rllama_user_agent_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"agent={spec!r}: cannot import {where!r} ({exc})") from exc
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, RLlamaAgent)):
        raise ConfigError(f"agent={spec!r}: {name!r} is not an RLlamaAgent subclass in {where}")
    return cls


def _check_defines_class(path: Path, name: str, spec: str) -> None:
    """Refuse, without running it, a file that does not define class ``name`` at its top level."""
    import ast

    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(f"agent={spec!r}: {path} is not valid Python ({exc})") from None
    if not any(isinstance(node, ast.ClassDef) and node.name == name for node in tree.body):
        raise ConfigError(f"agent={spec!r}: {path} defines no class {name!r} at its top level")


def auto_threads() -> int:
    """Torch threads for ``threads="auto"``: half the cores this process may use, at least one. On
    small CPUs one thread per model process is as fast as more and does not stall beside another busy
    process (``benchmarks/README.md``, "Torch threads on 2 cores")."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def resolve_threads(value: int | str | None) -> int | None:
    """The thread count a ``threads`` setting asks for (``None``: leave torch's default alone)."""
    return auto_threads() if value == "auto" else value or None


def apply_threads(value: int | str | None) -> None:
    """Set torch's threads as a ``threads`` setting asks (nothing for torch's default)."""
    threads = resolve_threads(value)
    if threads:
        import torch

        torch.set_num_threads(threads)
