"""Running a configured experiment: training in segments, evaluations, checkpoints that resume exactly.

A run folder (``<output_dir>/<name>/``) holds::

    config.yaml              the run's configuration
    metrics.jsonl            every update, segment and evaluation record (see rllama.experiment.loggers)
    checkpoints/segment-N/   the latest checkpoints (rllama.checkpoint), and latest.json naming the newest
    final/                   the final checkpoint (load the policy with agent.load("final/policy"))
    learning_curve.png       training and evaluation return against training episodes
    wandb/                   the offline wandb run, with the wandb logger
    mlflow_run_id            the MLflow run this folder logs to, with the mlflow logger (a resume continues it)

Training runs in segments of ``segment_episodes`` episodes; segment ``k`` starts by resetting the
envs with seed ``seed * 100003 + k`` and ends when its episodes are all done. Evaluations and
checkpoints happen between segments, so a run resumed from a checkpoint (``resume(run_dir)``)
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from rllama.checkpoint import load_training_state, save_training_state
from rllama.errors import CorruptFileError, RLlamaError
from rllama.experiment.config import ConfigError, RunConfig, apply_threads, check_code, resolve_agent_class
from rllama.experiment.loggers import Callback, make_loggers
from rllama.fileio import atomic_write, read_json, recover_dir, writing_dir

CONFIG_FILE = "config.yaml"
LATEST = "latest.json"


def segment_seed(config: RunConfig, k: int) -> int:
    return config.seed * 100_003 + k


def make_env(config: RunConfig, allow_code: bool | Collection[str] = True):
    """The run's vector env: ``gym.make_vec`` of the env id, or a ``"module:Class"`` env built directly
    (a module is imported only with ``allow_code``: :func:`~rllama.experiment.config.check_code`)."""
    import importlib

    import gymnasium as gym

    import rllama.envs  # noqa: F401  (registers rllama/TextWorld-v0)

    check_code(config, allow_code, "the run configuration")

    kwargs = dict(config.env_kwargs)
    if ":" in config.env:
        module_name, class_name = config.env.rsplit(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"env={config.env!r}: cannot import {module_name!r} ({exc})") from exc
        cls = getattr(module, class_name, None)
        if isinstance(cls, type) and issubclass(cls, gym.Env):
            return gym.vector.SyncVectorEnv([lambda: cls(**kwargs) for _ in range(config.num_envs)])
        # otherwise Gymnasium's own "module:EnvId" form: the module registers the id
    if config.env == "Blackjack-v1":
        kwargs.setdefault("sab", True)
    try:
        return gym.make_vec(config.env, num_envs=config.num_envs, vectorization_mode="sync", **kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"env={config.env!r} with env_kwargs={config.env_kwargs}: {exc}") from exc


def make_agent(config: RunConfig, allow_code: bool | Collection[str] = True):
    """The run's agent, built from its configuration (a class named by a module or file is imported only
    with ``allow_code``). A ``trajectory_log`` in ``agent_kwargs`` is a path inside the run folder."""
    from rllama.memory import EpisodicMemory, WorkingMemory

    check_code(config, allow_code, "the run configuration")
    cls = resolve_agent_class(config.agent)
    kwargs: dict[str, Any] = dict(config.agent_kwargs)
    if kwargs.get("trajectory_log") is not None:
        kwargs["trajectory_log"] = str(inside(config.run_dir, kwargs["trajectory_log"], "agent_kwargs.trajectory_log"))
    if config.memory is not None:
        memory = []
        if config.memory.get("episodic") is not None:
            memory.append(EpisodicMemory(**config.memory["episodic"]))
        if config.memory.get("working") is not None:
            memory.append(WorkingMemory(**config.memory["working"]))
        kwargs["memory"] = memory
    return cls(config.model, seed=config.seed, algorithm=config.algorithm, algorithm_config=config.algorithm_config,
               precision=config.precision, **kwargs)


def inside(folder: Path, name: str | os.PathLike, what: str) -> Path:
    """``folder / name``, refused when ``name`` is absolute or leads out of ``folder``."""
    relative = Path(name)
    target = (folder / relative).resolve()
    if relative.is_absolute() or folder.resolve() not in target.parents:
        raise ConfigError(f"{what}={str(name)!r}: expected a path inside the run folder {folder}")
    return folder / relative


class Experiment:
    """One training run (see the module docstring).

    Args:
        config: the run's configuration.
        callbacks: extra :class:`Callback` objects besides the configured loggers.
        allow_code: whether the agent or env the config names may be imported from a module or file
            (``True``, ``False``, or the specs allowed: :func:`~rllama.experiment.config.check_code`).
    """

    def __init__(self, config: RunConfig, callbacks: list[Callback] | None = None,
                 allow_code: bool | Collection[str] = True) -> None:
        self.config = config
        self.allow_code = allow_code
        self.run_dir = config.run_dir
        self.callbacks = make_loggers(config.loggers, config.wandb, config.mlflow) + list(callbacks or [])
        self.agent = None
        self.envs = None

    # ------------------------------------------------------------------ entry points
    def run(self, resume_from: str | os.PathLike | None = None) -> dict[str, Any]:
        """Train (from scratch, or from the checkpoint ``resume_from``); returns a summary."""
        cfg = self.config
        apply_threads(cfg.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and (self.run_dir / "checkpoints" / LATEST).exists():
            raise RLlamaError(f"{self.run_dir} already holds a run; resume it (rllama train --resume {self.run_dir}) "
                              "or choose another --name / --output-dir")
        check_code(cfg, self.allow_code, f"the configuration of {self.run_dir}")
        cfg.to_yaml(self.run_dir / CONFIG_FILE)
        self.agent = make_agent(cfg, self.allow_code)
        self.envs = make_env(cfg, self.allow_code)
        state = {"segment": 0, "episodes": 0, "evals": [], "wall_s": 0.0}
        if resume_from is not None:
            state = _check_progress(load_training_state(self.agent, resume_from), Path(resume_from))
            _truncate_metrics(self.run_dir / "metrics.jsonl", state["segment"])
        for cb in self.callbacks:
            cb.on_run_start(cfg.to_dict(), self.run_dir, Path(resume_from) if resume_from else None)
        try:
            summary = self._train(state)
        finally:
            self.envs.close()
        for cb in self.callbacks:
            cb.on_run_end(summary)
        return summary

    # ------------------------------------------------------------------ the loop
    def _train(self, state: dict[str, Any]) -> dict[str, Any]:
        cfg, agent = self.config, self.agent
        n_segments = math.ceil(cfg.episodes / cfg.segment_episodes)
        started = time.perf_counter() - state["wall_s"]
        if state["segment"] == 0 and cfg.eval_episodes:
            state["evals"].append(self._evaluate(segment=-1))
        stop = False
        for k in range(state["segment"], n_segments):
            n = min(cfg.segment_episodes, cfg.episodes - k * cfg.segment_episodes)
            # Every segment starts with nothing kept by the engine, as a run resumed here does: what is
            # kept decides how a forward pass is split, and so its last bits.
            agent.policy.invalidate()
            t0, steps0 = time.perf_counter(), agent.total_steps

            def on_update(stats: dict, k=k) -> bool:
                record = {"kind": "update", "segment": k, "episodes": agent.total_episodes, "steps": agent.total_steps,
                          **stats}
                return not any(cb.on_update(record) is False for cb in self.callbacks)

            returns, _ = agent.trainer.collect(self.envs, n, seed=segment_seed(cfg, k), callback=on_update,
                                               progress=cfg.progress, desc=f"train {k + 1}/{n_segments}")
            elapsed = time.perf_counter() - t0
            state["episodes"] += len(returns)
            record = {"kind": "segment", "segment": k, "episodes": agent.total_episodes, "steps": agent.total_steps,
                      "train/mean_return": float(np.mean(returns)),
                      "train/success_rate": float(np.mean(np.asarray(returns) > 0)),
                      "time/env_steps_per_s": (agent.total_steps - steps0) / max(elapsed, 1e-9),
                      "time/segment_s": elapsed}
            stop = any(cb.on_segment(record) is False for cb in self.callbacks) or len(returns) < n
            last = k == n_segments - 1 or stop
            done_episodes = (k + 1) * cfg.segment_episodes
            if cfg.eval_episodes and (last or (cfg.eval_every and done_episodes % cfg.eval_every == 0)):
                state["evals"].append(self._evaluate(segment=k))
            state["segment"] = k + 1
            state["wall_s"] = time.perf_counter() - started
            if last or (cfg.checkpoint_every and done_episodes % cfg.checkpoint_every == 0):
                self._checkpoint(state, final=last, record=record)
            if stop:
                break
        return self._summary(state, time.perf_counter() - started)

    def _evaluate(self, segment: int) -> dict[str, Any]:
        cfg, agent = self.config, self.agent
        result = agent.evaluate(self.envs, cfg.eval_episodes, seed=cfg.eval_seed, progress=cfg.progress)
        returns = np.asarray(result["returns"])
        record = {"kind": "eval", "segment": segment, "episodes": agent.total_episodes, "steps": agent.total_steps,
                  "eval/mean_return": result["mean_return"], "eval/stderr": result["stderr"],
                  "eval/success_rate": float(np.mean(returns > 0)),
                  "sample": {"prompt": agent.last_prompt or "", "reply": agent.last_reply or ""}}
        for cb in self.callbacks:
            cb.on_eval(record)
        return {k: v for k, v in record.items() if k not in ("kind", "sample")}

    def _checkpoint(self, state: dict[str, Any], final: bool, record: dict[str, Any]) -> Path:
        folder = self.run_dir / "checkpoints"
        path = save_training_state(self.agent, folder / f"segment-{state['segment']:06d}", extra=dict(state))
        atomic_write(folder / LATEST, json.dumps({"checkpoint": path.name, "segment": state["segment"],
                                                  "episodes": state["episodes"], "final": final}))
        kept = sorted(p for p in folder.glob("segment-*") if p.is_dir())
        for old in kept[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        if final:  # a copy written beside final/ and renamed into place: final/ is never half there
            with writing_dir(self.run_dir / "final") as tmp:
                shutil.copytree(path, tmp, dirs_exist_ok=True)
        for cb in self.callbacks:
            cb.on_checkpoint(path, record)
        return path

    def _summary(self, state: dict[str, Any], wall_s: float) -> dict[str, Any]:
        evals = state["evals"]
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "episodes": self.agent.total_episodes,
                                   "steps": self.agent.total_steps, "wall_s": wall_s}
        if evals:
            summary["eval/mean_return"] = evals[-1]["eval/mean_return"]
            summary["eval/success_rate"] = evals[-1]["eval/success_rate"]
            summary["eval/initial_mean_return"] = evals[0]["eval/mean_return"]
            summary["eval/best_mean_return"] = max(e["eval/mean_return"] for e in evals)
        try:
            from rllama.experiment.plotting import plot_run

            summary["plot"] = str(plot_run(self.run_dir))
        except Exception as exc:  # a missing plot must not lose a finished run
            summary["plot_error"] = f"{type(exc).__name__}: {exc}"
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(config: RunConfig, callbacks: list[Callback] | None = None,
          allow_code: bool | Collection[str] = True) -> dict[str, Any]:
    """Run ``config`` from scratch; returns the summary (``allow_code``: see :class:`Experiment`)."""
    return Experiment(config, callbacks, allow_code).run()


def resume(run_dir: str | os.PathLike, callbacks: list[Callback] | None = None,
           overrides: dict[str, Any] | None = None, allow_code: bool | Collection[str] = False) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its latest checkpoint (``overrides``: e.g. more ``episodes``).

    The run folder's configuration may name an agent or env class in a module or file; it is imported
    only with ``allow_code=True`` (opening someone else's run folder runs none of their code)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RLlamaError(f"{run_dir} is not a run folder ({CONFIG_FILE} is missing)")
    config = RunConfig.from_yaml(run_dir / CONFIG_FILE)
    allowed = {"episodes", "loggers", "progress", "threads", "wandb", "mlflow", "keep_checkpoints"}
    bad = set(overrides or {}) - allowed
    if bad:
        raise ConfigError(f"cannot change {sorted(bad)} when resuming (only {sorted(allowed)}): the run would differ")
    config = config.with_overrides(overrides or {})
    # the run folder is where it is now, whatever output_dir said when it was made
    config = config.with_overrides({"output_dir": str(run_dir.parent), "name": run_dir.name})
    check_code(config, allow_code, str(run_dir / CONFIG_FILE))
    return Experiment(config, callbacks, allow_code).run(resume_from=latest_checkpoint(run_dir))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint folder ``checkpoints/latest.json`` names, checked to be one inside the run folder."""
    folder = Path(run_dir) / "checkpoints"
    latest = folder / LATEST
    if not latest.is_file():
        raise RLlamaError(f"{run_dir} has no checkpoint to resume from ({latest} is missing)")
    name = read_json(latest).get("checkpoint")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CorruptFileError(f"{latest}: 'checkpoint' is {name!r}; expected the name of a folder in {folder}")
    checkpoint = recover_dir(folder / name)
    if not checkpoint.is_dir():
        raise CorruptFileError(f"{latest} names {name!r}, but {checkpoint} does not exist")
    return checkpoint


def _check_progress(state: Any, checkpoint: Path) -> dict[str, Any]:
    """The runner's progress saved with a checkpoint, checked."""
    kinds = {"segment": int, "episodes": int, "evals": list, "wall_s": (int, float)}
    bad = [k for k, kind in kinds.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if bad:
        raise CorruptFileError(f"{checkpoint / 'state.json'}: the run's progress (extra) lacks or mangles {bad}")
    return state


def _truncate_metrics(path: Path, segment: int) -> None:
    """Drop records written after the checkpoint being resumed (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the crash
        at = record.get("segment", -1) if isinstance(record, dict) else None
        if isinstance(at, int) and at < segment:
            keep.append(line)
    atomic_write(path, "".join(line + "\n" for line in keep))
