"""Loggers of a run: each is a :class:`~rllama.callbacks.Callback` (defined in :mod:`rllama.callbacks`).

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
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from rllama.callbacks import Callback
from rllama.errors import require


class RecordLogger(Callback, ABC):
    """A logger that writes update, segment and evaluation records alike (``_log``); ``on_eval`` also
    gets the evaluation's sample through ``_log_sample``."""

    @abstractmethod
    def _log(self, record: dict[str, Any]) -> None:
        """Write one record's numbers."""

    def _log_sample(self, record: dict[str, Any], sample: dict[str, str]) -> None:  # noqa: B027
        """Write an evaluation's sample prompt and reply (default: nothing)."""

    def on_update(self, record):
        self._log(record)

    def on_segment(self, record):
        self._log(record)

    def on_eval(self, record):
        self._log(record)
        if record.get("sample"):
            self._log_sample(record, record["sample"])


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


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


class WandbLogger(RecordLogger):
    """Logs to Weights & Biases; offline (``WANDB_MODE=offline``) unless an API key is configured.

    Args:
        init_kwargs: ``wandb.init`` arguments (``project``, ``group``, ``mode``, ``tags``, ...).
    """

    def __init__(self, **init_kwargs) -> None:
        self.init_kwargs = init_kwargs
        self.run = None

    def on_run_start(self, config, run_dir, resumed_from):
        wandb = require("wandb", "wandb", "the wandb logger")
        kwargs = dict(self.init_kwargs)
        kwargs.setdefault("mode", wandb_mode())
        kwargs.setdefault("name", Path(run_dir).name)
        kwargs.setdefault("dir", str(run_dir))
        kwargs.setdefault("config", config)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(reinit="finish_previous", **kwargs)
        self._wandb = wandb

    def _log(self, record):
        self.run.log(_numbers(record), step=int(record["steps"]))

    def _log_sample(self, record, sample):
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


class MLflowLogger(RecordLogger):
    """Logs to MLflow: the config as params, every record's numbers as metrics (step = env steps),
    evaluation samples as text, and at the end the run's ``config.yaml``, ``metrics.jsonl``,
    ``summary.json`` and learning curve as artifacts.

    Offline by default: the tracking URI is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a
    local ``mlruns/`` folder (MLflow's file store; ``mlflow ui --backend-store-uri mlruns`` shows it).
    A resumed run continues the same MLflow run (its id is kept in the run folder).

    Args:
        tracking_uri: where to log (a folder, ``file:``, ``sqlite:`` or ``http(s):`` URI).
        experiment: MLflow experiment name (made if missing).
        run_name: MLflow run name (default: the run folder's name).
        tags: MLflow tags of the run.
    """

    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "rllama", run_name: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.client = None
        self.run_id: str | None = None

    def on_run_start(self, config, run_dir, resumed_from):
        require("mlflow", "mlflow", "the mlflow logger")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        uri = mlflow_tracking_uri(self.tracking_uri)
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the offline default here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.run_dir = Path(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        id_file = self.run_dir / self.RUN_ID_FILE
        if resumed_from is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_name or self.run_dir.name,
                                     tags={"rllama.run_dir": str(self.run_dir), **self.tags})
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _log(self, record):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), float(v), now, int(record["steps"])) for k, v in _numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def _log_sample(self, record, sample):
        text = f"prompt:\n{sample.get('prompt', '')}\n\nreply:\n{sample.get('reply', '')}\n"
        self.client.log_text(self.run_id, text, f"samples/eval-{int(record['episodes']):07d}.txt")

    def on_run_end(self, summary):
        if self.client is None or self.run_id is None:
            return
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "learning_curve.png"):
            path = self.run_dir / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.client.log_metric(self.run_id, "summary/" + _mlflow_key(key), float(value),
                                       step=int(summary.get("steps", 0)))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None


def mlflow_tracking_uri(uri: str | os.PathLike | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``file:`` + the absolute path of ``./mlruns``;
    a plain folder path becomes a ``file:`` URI."""
    uri = str(uri) if uri else os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if "://" in uri or uri.startswith("file:"):
        return uri
    return "file:" + str(Path(uri).resolve())


def _mlflow_key(key: str) -> str:
    # MLflow keys allow letters, digits, and _ - . space / : only
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in key)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


LOGGERS = ("console", "jsonl", "wandb", "mlflow")


def make_loggers(names: list[str], wandb_kwargs: dict[str, Any] | None = None,
                 mlflow_kwargs: dict[str, Any] | None = None) -> list[Callback]:
    out: list[Callback] = []
    for name in names:
        if name == "console":
            out.append(ConsoleLogger())
        elif name == "jsonl":
            out.append(JSONLLogger())
        elif name == "wandb":
            out.append(WandbLogger(**(wandb_kwargs or {})))
        elif name == "mlflow":
            out.append(MLflowLogger(**(mlflow_kwargs or {})))
        else:
            raise ValueError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    return out


def _finite(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
