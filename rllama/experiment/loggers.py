"""Callbacks and loggers of a run (in the spirit of Stable-Baselines3's callbacks).

A :class:`Callback` gets the run's events; every logger is one. The runner sends records (dicts)
with a ``"kind"``:

- ``"update"``: an algorithm update's statistics (``loss/...``, ``policy/...``, ``rollout/...``);
- ``"segment"``: after each segment: training return and success rate of its episodes, env steps/s;
- ``"eval"``: a greedy evaluation: ``eval/mean_return``, ``eval/stderr``, ``eval/success_rate``,
  and a ``sample`` (the last prompt and reply);

each with ``episodes`` and ``steps`` (training episodes and env steps so far) and ``segment``.
``on_update`` / ``on_segment`` may return ``False`` to stop the run after the current segment.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class Callback:
    """Receives a run's events; override what you need."""

    def on_run_start(self, config: dict[str, Any], run_dir: Path, resumed_from: Path | None) -> None: ...

    def on_update(self, record: dict[str, Any]) -> bool | None: ...

    def on_segment(self, record: dict[str, Any]) -> bool | None: ...

    def on_eval(self, record: dict[str, Any]) -> None: ...

    def on_checkpoint(self, path: Path, record: dict[str, Any]) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None: ...


class ConsoleLogger(Callback):
    """Prints evaluations and segment summaries (one line each)."""

    def on_run_start(self, config, run_dir, resumed_from):
        how = f"resuming from {resumed_from}" if resumed_from else "starting"
        print(f"[rllama] {how}: {config['agent']} / {config['algorithm']} on {config['env']}, "
              f"{config['episodes']} episodes -> {run_dir}", flush=True)

    def on_segment(self, record):
        print(f"[rllama] episodes {record['episodes']:6d}  steps {record['steps']:7d}  "
              f"train return {record['train/mean_return']:+.3f}  {record['time/env_steps_per_s']:.1f} steps/s",
              flush=True)

    def on_eval(self, record):
        print(f"[rllama] eval at {record['episodes']:6d} episodes: return {record['eval/mean_return']:+.3f} "
              f"± {record['eval/stderr']:.3f}, success {record['eval/success_rate']:.2f}", flush=True)

    def on_run_end(self, summary):
        print(f"[rllama] done: {json.dumps({k: v for k, v in summary.items() if k != 'curve'})}", flush=True)


class JSONLLogger(Callback):
    """Appends every record to ``<run_dir>/metrics.jsonl`` (one JSON object a line, flushed)."""

    filename = "metrics.jsonl"

    def on_run_start(self, config, run_dir, resumed_from):
        self.path = Path(run_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_finite(record)) + "\n")
            f.flush()

    def on_update(self, record):
        self._write(record)

    def on_segment(self, record):
        self._write(record)

    def on_eval(self, record):
        self._write(record)


class WandbLogger(Callback):
    """Logs to Weights & Biases; offline (``WANDB_MODE=offline``) unless an API key is configured.

    Args:
        init_kwargs: ``wandb.init`` arguments (``project``, ``group``, ``mode``, ``tags``, ...).
    """

    def __init__(self, **init_kwargs) -> None:
        self.init_kwargs = init_kwargs
        self.run = None

    def on_run_start(self, config, run_dir, resumed_from):
        import wandb

        kwargs = dict(self.init_kwargs)
        kwargs.setdefault("mode", wandb_mode())
        kwargs.setdefault("name", Path(run_dir).name)
        kwargs.setdefault("dir", str(run_dir))
        kwargs.setdefault("config", config)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(reinit="finish_previous", **kwargs)
        self._wandb = wandb

    def _log(self, record):
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(metrics, step=int(record["steps"]))

    def on_update(self, record):
        self._log(record)

    def on_segment(self, record):
        self._log(record)

    def on_eval(self, record):
        self._log(record)
        sample = record.get("sample")
        if sample:
            table = self._wandb.Table(columns=["episodes", "prompt", "reply"],
                                      data=[[record["episodes"], sample.get("prompt", ""), sample.get("reply", "")]])
            self.run.log({"samples": table}, step=int(record["steps"]))

    def on_run_end(self, summary):
        if self.run is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float, str)):
                    self.run.summary[key] = value
            self.run.finish()
            self.run = None


def wandb_mode() -> str:
    """``"online"`` when W&B can reach an account (an API key in the environment or netrc), else ``"offline"``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def make_loggers(names: list[str], wandb_kwargs: dict[str, Any] | None = None) -> list[Callback]:
    out: list[Callback] = []
    for name in names:
        if name == "console":
            out.append(ConsoleLogger())
        elif name == "jsonl":
            out.append(JSONLLogger())
        elif name == "wandb":
            out.append(WandbLogger(**(wandb_kwargs or {})))
        else:
            raise ValueError(f"unknown logger {name!r}; choose from console, jsonl, wandb")
    return out


def _finite(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
