"""Hyperparameter sweeps described by a wandb sweep YAML, run on W&B or, offline, on Optuna.

A sweep file is an ordinary `wandb sweep configuration
<https://docs.wandb.ai/guides/sweeps/sweep-config-keys>`_ whose parameter names are dotted
:class:`~rllama.experiment.config.RunConfig` keys::

    method: bayes                    # grid | random | bayes
    metric: {name: eval/mean_return, goal: maximize}
    run_cap: 8
    parameters:
      algorithm_config.learning_rate: {distribution: log_uniform_values, min: 1.0e-5, max: 3.0e-4}
      algorithm_config.kl_coef: {values: [0.0, 0.05, 0.2]}
      episodes: {value: 320}

With a W&B API key (``mode="online"``) the sweep runs on ``wandb.sweep`` / ``wandb.agent``. Without
one (``mode="offline"``) the same search runs on Optuna: grid -> ``GridSampler``, random ->
``RandomSampler``, bayes -> ``TPESampler``, seeded with the base config's ``seed``. Either way the
sweep folder ``<output_dir>/<sweep name>/`` holds::

    sweep.yaml               the sweep spec
    trials.jsonl             one line per finished trial: number, params, value, run_dir
    summary.json             the best trial and all trials, best first
    <run name>-trialNNN/     each trial's run folder (see rllama.experiment.runner)

and with the ``wandb`` logger each offline trial is an offline wandb run in the group named after the sweep.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import yaml

from rllama.errors import RLlamaError, require
from rllama.experiment.config import ConfigError, RunConfig, check_code
from rllama.experiment.loggers import Callback, WandbLogger, wandb_mode

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
SPEC_KEYS = {"method", "metric", "parameters", "name", "description", "run_cap", "count", "project", "entity",
             "program", "command", "early_terminate", "controller"}
PARAMETER_KEYS = {"values", "value", "min", "max", "distribution", "q", "mu", "sigma", "probabilities", "a", "b",
                  "parameters"}
#: every distribution wandb knows; offline sweeps support those in ``OFFLINE_DISTRIBUTIONS``
DISTRIBUTIONS = {"constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
                 "q_log_uniform", "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values", "normal",
                 "q_normal", "log_normal", "q_log_normal", "beta", "q_beta"}
OFFLINE_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                         "log_uniform_values")
RANGE_DISTRIBUTIONS = {"int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values", "q_log_uniform",
                       "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values"}
SET_BY_SWEEP = ("name", "output_dir")


# ---------------------------------------------------------------------- the spec
def load_sweep(sweep: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read (a YAML path) and validate a wandb sweep spec; returns a copy of it.

    Raises:
        ConfigError: naming the bad key (unknown method or distribution, a metric without a name, a
            parameter without ``values`` / ``value`` / ``min`` and ``max``, ``min >= max``, a parameter
            name that is no RunConfig key ...).
    """
    if isinstance(sweep, (str, Path)):
        path = Path(sweep)
        if not path.is_file():
            raise ConfigError(f"sweep file {str(path)!r} does not exist")
        try:
            sweep = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(sweep, dict):
        raise ConfigError(f"a sweep spec must be a mapping, not {type(sweep).__name__}")
    spec = copy.deepcopy(sweep)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep keys {sorted(unknown)}; known keys: {sorted(SPEC_KEYS)}")
    if spec.get("method") not in METHODS:
        raise ConfigError(f"method={spec.get('method')!r}: expected one of {', '.join(METHODS)}")
    metric = spec.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
        raise ConfigError(f"metric={metric!r}: expected a mapping with a name, e.g. "
                          "{name: eval/mean_return, goal: maximize}")
    if metric.get("goal", "minimize") not in GOALS:
        raise ConfigError(f"metric.goal={metric['goal']!r}: expected maximize or minimize")
    for key in ("run_cap", "count"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r}: expected a positive integer")
    if not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
        raise ConfigError(f"parameters={spec.get('parameters')!r}: expected a mapping of RunConfig keys to "
                          "parameter specs, e.g. {algorithm_config.learning_rate: {values: [1.0e-5, 1.0e-4]}}")
    for name, param in flat_parameters(spec).items():
        _check_name(name)
        _check_parameter(name, param)
    if spec["method"] == "grid":
        grid_space(spec)
    return spec


def flat_parameters(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{dotted RunConfig key: parameter spec}``; nested ``parameters`` blocks become dotted keys."""

    def walk(params: dict, prefix: str) -> dict[str, dict[str, Any]]:
        out = {}
        for name, param in params.items():
            key = f"{prefix}{name}"
            if not isinstance(param, dict):
                raise ConfigError(f"parameters.{key}={param!r}: expected a mapping such as {{values: [...]}}, "
                                  "{value: x} or {min: a, max: b}")
            if "parameters" in param:
                if not isinstance(param["parameters"], dict) or not param["parameters"]:
                    raise ConfigError(f"parameters.{key}.parameters: expected a non-empty mapping")
                out.update(walk(param["parameters"], f"{key}."))
            else:
                out[key] = param
        return out

    return walk(spec["parameters"], "")


def distribution(param: dict[str, Any]) -> str:
    """A parameter's distribution, inferred as wandb does when it is not given."""
    if "distribution" in param:
        return param["distribution"]
    if "values" in param:
        return "categorical"
    if "value" in param:
        return "constant"
    if _is_int(param.get("min")) and _is_int(param.get("max")):
        return "int_uniform"
    return "uniform"


def _check_name(name: str) -> None:
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    head, *rest = name.split(".")
    if not all(name.split(".")):
        raise ConfigError(f"parameters.{name}: bad parameter name")
    if head not in fields:
        raise ConfigError(f"parameters.{name}: {head!r} is not a RunConfig key; known keys: {sorted(fields)}")
    if head in SET_BY_SWEEP:
        raise ConfigError(f"parameters.{name}: {head!r} is set by the sweep for each trial")
    if rest and "dict" not in str(fields[head].type):
        raise ConfigError(f"parameters.{name}: {head!r} is not a mapping, so it has no key {'.'.join(rest)!r}")


def _check_parameter(name: str, param: dict[str, Any]) -> None:
    where = f"parameters.{name}"
    unknown = set(param) - PARAMETER_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known keys: {sorted(PARAMETER_KEYS)}")
    dist = distribution(param)
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}.distribution={dist!r}: unknown; choose from {sorted(DISTRIBUTIONS)}")
    if dist == "categorical":
        if not isinstance(param.get("values"), list) or not param["values"]:
            raise ConfigError(f"{where}: expected a non-empty list of values, got values={param.get('values')!r}")
    elif dist == "constant":
        if "value" not in param:
            raise ConfigError(f"{where}: the constant distribution needs a value")
    elif dist in RANGE_DISTRIBUTIONS:
        if "min" not in param or "max" not in param:
            raise ConfigError(f"{where}: expected values: [...], value: x, or both min and max "
                              f"(distribution {dist} needs min and max)")
        low, high = param["min"], param["max"]
        for key, value in (("min", low), ("max", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{key}={value!r}: expected a number")
        if low >= high:
            raise ConfigError(f"{where}: min={low} must be less than max={high}")
        if dist == "int_uniform" and not (_is_int(low) and _is_int(high)):
            raise ConfigError(f"{where}: int_uniform needs integer min and max, got {low} and {high}")
        if dist.endswith("log_uniform_values") and low <= 0:
            raise ConfigError(f"{where}: {dist} needs min > 0, got {low}")
        q = param.get("q", 1)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or q <= 0:
            raise ConfigError(f"{where}.q={q!r}: expected a positive number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def grid_space(spec: dict[str, Any]) -> dict[str, list]:
    """The grid of a grid sweep: ``{name: choices}`` (constants left out; ``int_uniform`` enumerated)."""
    space = {}
    for name, param in flat_parameters(spec).items():
        dist = distribution(param)
        if dist == "categorical":
            space[name] = _choices(param["values"])
        elif dist == "int_uniform":
            space[name] = list(range(param["min"], param["max"] + 1))
        elif dist != "constant":
            raise ConfigError(f"parameters.{name}: a grid sweep needs values: [...] (or an int_uniform range), "
                              f"not a {dist} distribution")
    return space


def _choices(values: list) -> list:
    """Optuna's categorical choices: the values themselves, or their indices when some is not a scalar."""
    if all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
        return list(values)
    return list(range(len(values)))


def suggest_params(spec: dict[str, Any], trial) -> dict[str, Any]:
    """The parameters of one trial: ``{dotted RunConfig key: value}`` suggested by an Optuna ``trial``."""
    params = {}
    for name, param in flat_parameters(spec).items():
        dist = distribution(param)
        if dist == "constant":
            value = param["value"]
        elif dist == "categorical":
            choices = _choices(param["values"])
            value = trial.suggest_categorical(name, choices)
            if choices != param["values"]:
                value = param["values"][value]
        elif dist == "int_uniform":
            value = trial.suggest_int(name, param["min"], param["max"])
        elif dist == "uniform":
            value = trial.suggest_float(name, param["min"], param["max"])
        elif dist == "q_uniform":
            value = trial.suggest_float(name, param["min"], param["max"], step=param.get("q", 1))
        elif dist == "log_uniform":  # wandb: min and max are natural logarithms
            value = trial.suggest_float(name, math.exp(param["min"]), math.exp(param["max"]), log=True)
        elif dist == "log_uniform_values":
            value = trial.suggest_float(name, param["min"], param["max"], log=True)
        else:
            raise ConfigError(f"parameters.{name}: distribution {dist} is not supported by offline sweeps "
                              f"(supported: {', '.join(OFFLINE_DISTRIBUTIONS)})")
        params[name] = value
    return params


def make_sampler(spec: dict[str, Any], seed: int):
    """The Optuna sampler of the sweep's method, seeded."""
    optuna = require("optuna", "sweep", "a sweep")

    if spec["method"] == "grid":
        return optuna.samplers.GridSampler(grid_space(spec), seed=seed)
    if spec["method"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def direction(spec: dict[str, Any]) -> str:
    """``"maximize"`` or ``"minimize"`` (wandb's default)."""
    return spec["metric"].get("goal", "minimize")


def trial_count(spec: dict[str, Any], trials: int | None = None) -> int:
    """``trials``, else the spec's ``run_cap`` / ``count``, else a grid's size."""
    n = trials if trials is not None else spec.get("run_cap", spec.get("count"))
    if n is None and spec["method"] == "grid":
        n = math.prod(len(v) for v in grid_space(spec).values())
    if n is None:
        raise ConfigError(f"how many trials? a {spec['method']} sweep has no end: pass trials= (--trials N) "
                          "or set run_cap in the sweep file")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"trials={n!r}: expected a positive integer")
    return n


# ---------------------------------------------------------------------- running
def run_sweep(sweep: str | Path | dict[str, Any], base_config: RunConfig, trials: int | None = None,
              mode: str = "auto", callbacks: list[Callback] | None = None,
              allow_code: bool | Collection[str] = True) -> dict[str, Any]:
    """Run a sweep: each trial trains ``base_config`` with the trial's parameters set.

    Args:
        sweep: a wandb sweep spec, or the path of its YAML file.
        base_config: the configuration every trial starts from (its ``output_dir`` holds the sweep folder).
        trials: the number of trials (default: the spec's ``run_cap`` / ``count``, or a grid's size).
        mode: ``"online"`` (``wandb.sweep`` / ``wandb.agent``; needs a W&B API key), ``"offline"``
            (Optuna) or ``"auto"`` (online when :func:`~rllama.experiment.loggers.wandb_mode` is).
        callbacks: extra callbacks of every trial's run.
        allow_code: whether trials may import an agent or env named by a module or file (``True``,
            ``False`` or the specs allowed: :func:`~rllama.experiment.config.check_code`).

    Returns:
        ``{"name", "method", "metric", "direction", "sweep_dir", "best", "trials"}``; ``trials`` are the
        finished trials (``number``, ``params``, ``value``, ``run_dir``), best first, and ``best`` the first.
    """
    spec = load_sweep(sweep)
    if mode not in ("auto", "online", "offline"):
        raise ConfigError(f"mode={mode!r}: expected auto, online or offline")
    if mode == "online" and wandb_mode() != "online":
        raise ConfigError("online sweeps need a W&B API key (set WANDB_API_KEY or run `wandb login`, and unset "
                          "WANDB_MODE); run offline sweeps on Optuna with mode='offline' (--offline)")
    if mode == "auto":
        mode = "online" if wandb_mode() == "online" else "offline"
    n = trial_count(spec, trials)
    if mode == "offline":
        unsupported = {k: distribution(p) for k, p in flat_parameters(spec).items()
                       if distribution(p) not in OFFLINE_DISTRIBUTIONS}
        if unsupported:
            raise ConfigError(f"offline sweeps (Optuna) support the distributions "
                              f"{', '.join(OFFLINE_DISTRIBUTIONS)}; not {unsupported}")
    _check_algorithm_keys(spec, base_config)
    check_code(base_config, allow_code, "the sweep's base configuration")
    for key in ("agent", "env"):
        parameter = flat_parameters(spec).get(key)
        for value in [] if parameter is None else parameter.get("values", [parameter.get("value")]):
            if isinstance(value, str):  # each trial is checked again when it starts
                check_code(base_config.with_overrides({key: value}), allow_code, f"the sweep's {key} values")
    metric = spec["metric"]["name"]
    if metric.startswith("eval/") and not base_config.eval_episodes and "eval_episodes" not in flat_parameters(spec):
        raise ConfigError(f"the sweep metric {metric!r} needs evaluations, but eval_episodes=0")
    name = spec.get("name") or f"sweep-{spec['method']}"
    sweep_dir = Path(base_config.output_dir) / name
    if (sweep_dir / "trials.jsonl").exists():
        raise RLlamaError(f"{sweep_dir} already holds a sweep; set another name in the sweep file or "
                          "another --output-dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    record = _recorder(sweep_dir / "trials.jsonl")
    try:
        if mode == "online":
            _run_online(spec, base_config, name, sweep_dir, n, record, callbacks, allow_code)
        else:
            _run_offline(spec, base_config, name, sweep_dir, n, record, callbacks, allow_code)
    finally:  # a failed or interrupted sweep keeps the summary of its finished trials
        summary = _summarize(spec, name, sweep_dir)
    return summary


def _check_algorithm_keys(spec: dict[str, Any], base_config: RunConfig) -> None:
    """``algorithm_config.X`` parameters must be fields of the algorithm's config (caught before any trial runs)."""
    import dataclasses

    from rllama.algorithms import get_algorithm_class

    names = flat_parameters(spec)
    if "algorithm" in names:
        return
    cls = get_algorithm_class(base_config.algorithm).config_class
    known = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        head, _, rest = name.partition(".")
        if head == "algorithm_config" and rest.split(".")[0] not in known:
            raise ConfigError(f"parameters.{name}: {rest.split('.')[0]!r} is not a {cls.__name__} field "
                              f"(algorithm={base_config.algorithm!r}); known fields: {sorted(known)}")


def trial_config(base_config: RunConfig, params: dict[str, Any], sweep_name: str, sweep_dir: Path,
                 number: int) -> RunConfig:
    """The run configuration of trial ``number``: ``base_config`` with ``params`` set, run in ``sweep_dir``."""
    overrides = dict(params)
    overrides.update(name=_trial_name(base_config, number), output_dir=str(sweep_dir))
    if "wandb" in base_config.loggers:
        overrides["wandb.group"] = sweep_name
    return base_config.with_overrides(overrides)


def _trial_name(base_config: RunConfig, number: int) -> str:
    return f"{base_config.run_name}-trial{number:03d}"


def metric_value(summary: dict[str, Any], metric: str) -> float:
    """The sweep metric in a run's summary."""
    value = summary.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise RLlamaError(f"the sweep metric {metric!r} is not in the run's summary (has it evaluations? "
                          f"eval_episodes > 0); the summary has {numeric}")
    return float(value)


def _recorder(path: Path) -> Callable[[dict[str, Any]], None]:
    def record(trial: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(trial) + "\n")
        value = "not finite" if trial["value"] is None else f"{trial['value']:.4g}"
        print(f"[rllama] sweep trial {trial['number']}: {value}  {json.dumps(trial['params'])}", flush=True)

    return record


def _run_offline(spec, base_config, name, sweep_dir, n, record, callbacks, allow_code) -> None:
    optuna = require("optuna", "sweep", "a sweep")

    from rllama.experiment.runner import train

    metric = spec["metric"]["name"]

    def objective(trial) -> float:
        params = suggest_params(spec, trial)
        summary = train(trial_config(base_config, params, name, sweep_dir, trial.number), callbacks, allow_code)
        value = metric_value(summary, metric)
        record({"number": trial.number, "params": params, "value": value if math.isfinite(value) else None,
                "run_dir": summary["run_dir"]})
        return value

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=make_sampler(spec, base_config.seed), direction=direction(spec),
                                    study_name=name)
        study.optimize(objective, n_trials=n)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run_online(spec, base_config, name, sweep_dir, n, record, callbacks, allow_code) -> None:
    wandb = require("wandb", "wandb", "an online (wandb) sweep")

    from rllama.experiment.runner import train

    metric, names = spec["metric"]["name"], list(flat_parameters(spec))
    project = base_config.wandb.get("project", "rllama")
    entity = base_config.wandb.get("entity")
    counter = itertools.count()

    def function() -> None:
        number = next(counter)
        run_dir = sweep_dir / _trial_name(base_config, number)
        run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(dir=str(run_dir))  # joins the run wandb.agent started
        params = {k: _lookup(dict(run.config), k) for k in names}
        config = trial_config(base_config, params, name, sweep_dir, number)
        config = config.with_overrides({"loggers": [x for x in config.loggers if x != "wandb"]})
        summary = train(config, [_AgentRunLogger()] + list(callbacks or []), allow_code)
        value = metric_value(summary, metric)
        record({"number": number, "params": params, "value": value if math.isfinite(value) else None,
                "run_dir": summary["run_dir"]})

    sweep_id = wandb.sweep({k: v for k, v in spec.items() if k != "count"}, project=project, entity=entity)
    wandb.agent(sweep_id, function=function, count=n, project=project, entity=entity)


def _lookup(values: dict[str, Any], key: str) -> Any:
    """``values[key]``, or the nested ``values[a][b]`` for ``key = "a.b"``."""
    if key in values:
        return values[key]
    for part in key.split("."):
        values = values[part]
    return values


class _AgentRunLogger(WandbLogger):
    """Logs to the run ``wandb.agent`` started, instead of starting one."""

    def on_run_start(self, config, run_dir, resumed_from):
        wandb = require("wandb", "wandb", "an online (wandb) sweep")
        self.run, self._wandb = wandb.run, wandb
        self.run.config.update({"rllama": config}, allow_val_change=True)


def _summarize(spec: dict[str, Any], name: str, sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / "trials.jsonl"
    trials = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    goal = direction(spec)
    finished = sorted((t for t in trials if t["value"] is not None), key=lambda t: t["value"],
                      reverse=goal == "maximize")
    summary = {"name": name, "method": spec["method"], "metric": spec["metric"]["name"], "direction": goal,
               "sweep_dir": str(sweep_dir), "best": finished[0] if finished else None,
               "trials": finished + [t for t in trials if t["value"] is None]}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary), flush=True)
    return summary


def format_table(summary: dict[str, Any], top: int = 5) -> str:
    """The best ``top`` trials of a sweep summary as a text table."""
    trials = [t for t in summary["trials"] if t["value"] is not None][:top]
    head = (f"[rllama] sweep {summary['name']}: {len(summary['trials'])} trials, best {len(trials)} by "
            f"{summary['metric']} ({summary['direction']}) -> {summary['sweep_dir']}")
    if not trials:
        return head + "\n(no finished trials)"
    names = list(dict.fromkeys(k for t in trials for k in t["params"]))
    rows = [["rank", "trial", summary["metric"], *names, "run"]]
    for rank, t in enumerate(trials, 1):
        rows.append([str(rank), str(t["number"]), f"{t['value']:.4g}",
                     *(_short(t["params"].get(k)) for k in names), Path(t["run_dir"]).name])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i < 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([head, *(line.rstrip() for line in lines)])


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
