"""Sweeps: wandb sweep specs validated, run offline on Optuna, trials logged as offline wandb runs."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from rllama.errors import RLlamaError
from rllama.experiment import ConfigError, RunConfig
from rllama.experiment.sweep import load_sweep, make_sampler, run_sweep, suggest_params, trial_count
from tests.conftest import tiny_run_config


def base_config(tmp_path, model_dir, **kw) -> RunConfig:
    values = dict(env_kwargs={"steps": 1}, episodes=8, eval_every=4)
    values.update(kw)
    return tiny_run_config(tmp_path, model_dir, **values)


GRID = {"method": "grid", "metric": {"name": "eval/mean_return", "goal": "maximize"},
        "parameters": {"algorithm_config.learning_rate": {"values": [1e-4, 1e-2]},
                       "algorithm_config.kl_coef": {"values": [0.0, 0.1]},
                       "eval_episodes": {"value": 4}}}


def test_offline_grid_sweep_runs_every_trial_and_ranks_them(tmp_path, tiny_model_dir, capsys):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(GRID))
    summary = run_sweep(spec_path, base_config(tmp_path, tiny_model_dir), mode="offline")  # 4 trials: the grid
    sweep_dir = tmp_path / "runs" / "sweep-grid"
    assert summary["sweep_dir"] == str(sweep_dir) and summary["direction"] == "maximize"
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) == GRID

    lines = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and sorted(t["number"] for t in lines) == [0, 1, 2, 3]
    grid = {(t["params"]["algorithm_config.learning_rate"], t["params"]["algorithm_config.kl_coef"]) for t in lines}
    assert grid == {(1e-4, 0.0), (1e-4, 0.1), (1e-2, 0.0), (1e-2, 0.1)}
    for t in lines:
        run_dir = sweep_dir / f"run-trial{t['number']:03d}"
        assert t["run_dir"] == str(run_dir) and (run_dir / "final").is_dir()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["algorithm_config"]["learning_rate"] == t["params"]["algorithm_config.learning_rate"]
        assert config["algorithm_config"]["batch_episodes"] == 4  # the base config's other keys stay
        run_summary = json.loads((run_dir / "summary.json").read_text())
        assert t["value"] == run_summary["eval/mean_return"]

    saved = json.loads((sweep_dir / "summary.json").read_text())
    values = [t["value"] for t in saved["trials"]]
    assert saved["best"]["value"] == max(t["value"] for t in lines) == values[0]
    assert values == sorted(values, reverse=True) and saved == summary
    out = capsys.readouterr().out
    assert "sweep sweep-grid: 4 trials" in out and "algorithm_config.learning_rate" in out

    with pytest.raises(RLlamaError, match="already holds a sweep"):
        run_sweep(GRID, base_config(tmp_path, tiny_model_dir), mode="offline")


def test_offline_sweep_trials_are_offline_wandb_runs_in_one_group(tmp_path, tiny_model_dir, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = {"name": "lr", "method": "random", "metric": {"name": "eval/success_rate", "goal": "maximize"},
            "parameters": {"algorithm_config.learning_rate": {"distribution": "log_uniform_values",
                                                              "min": 1e-5, "max": 1e-3}}}
    config = base_config(tmp_path, tiny_model_dir, loggers=["jsonl", "wandb"], episodes=4, eval_every=0)
    summary = run_sweep(spec, config, trials=2)  # auto: offline without an API key
    assert len(summary["trials"]) == 2 and summary["metric"] == "eval/success_rate"
    for t in summary["trials"]:
        run_dir = tmp_path / "runs" / "lr" / f"run-trial{t['number']:03d}"
        assert 1e-5 <= t["params"]["algorithm_config.learning_rate"] <= 1e-3
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["wandb"]["group"] == "lr"


def test_a_metric_missing_from_the_summary_is_an_error(tmp_path, tiny_model_dir):
    spec = {**GRID, "metric": {"name": "eval/mean_return"},
            "parameters": {"algorithm_config.learning_rate": {"values": [1e-4, 1e-2]}}}
    with pytest.raises(ConfigError, match="needs evaluations, but eval_episodes=0"):
        run_sweep(spec, base_config(tmp_path, tiny_model_dir, eval_episodes=0), mode="offline")
    spec = {**spec, "metric": {"name": "loss/policy"}}
    with pytest.raises(RLlamaError, match="'loss/policy' is not in the run's summary"):
        run_sweep(spec, base_config(tmp_path, tiny_model_dir, episodes=4, eval_every=0), trials=1, mode="offline")


def test_online_sweeps_need_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(ConfigError, match="online sweeps need a W&B API key"):
        run_sweep(GRID, RunConfig(output_dir=str(tmp_path)), mode="online")
    assert not (tmp_path / "sweep-grid").exists()


@pytest.mark.parametrize("change, message", [
    ({"method": "hyperband"}, "method='hyperband'"),
    ({"metric": {"goal": "maximize"}}, "metric=.*expected a mapping with a name"),
    ({"metric": {"name": "eval/mean_return", "goal": "up"}}, "metric.goal='up'"),
    ({"parameters": {"algorithm_config.learning_rate": {"distribution": "uniform"}}},
     "parameters.algorithm_config.learning_rate: expected values"),
    ({"parameters": {"algorithm_config.learning_rate": {}}}, "parameters.algorithm_config.learning_rate"),
    ({"parameters": {"algorithm_config.learning_rate": {"values": []}}}, "non-empty list of values"),
    ({"parameters": {"algorithm_config.learning_rate": {"min": 0.1, "max": 0.01}}}, "min=0.1 must be less than max"),
    ({"parameters": {"algorithm_config.learning_rate": {"min": 1, "max": 2, "distribution": "cauchy"}}},
     "distribution='cauchy': unknown"),
    ({"parameters": {"learning_rate": {"values": [1e-4]}}}, "'learning_rate' is not a RunConfig key"),
    ({"parameters": {"episodes.x": {"values": [1]}}}, "'episodes' is not a mapping"),
    ({"parameters": {"output_dir": {"values": ["a"]}}}, "set by the sweep"),
    ({"run_cap": 0}, "run_cap=0"),
    ({"paramters": {}}, r"unknown sweep keys \['paramters'\]"),
    ({"parameters": {"algorithm_config.learning_rate": {"min": 1e-5, "max": 1e-3}}},
     "a grid sweep needs values"),
])
def test_bad_specs_are_config_errors_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep({**GRID, **change})


def test_trial_count_and_unsupported_offline_distributions(tmp_path):
    assert trial_count(load_sweep(GRID)) == 4 and trial_count(load_sweep(GRID), 3) == 3
    assert trial_count(load_sweep({**GRID, "method": "random", "run_cap": 5})) == 5
    with pytest.raises(ConfigError, match="--trials"):
        trial_count(load_sweep({**GRID, "method": "bayes"}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    spec = {**GRID, "method": "random",
            "parameters": {"algorithm_config.kl_coef": {"distribution": "normal", "mu": 0, "sigma": 1}}}
    typo = {**GRID, "parameters": {"algorithm_config.lerning_rate": {"values": [1e-4]}}}
    with pytest.raises(ConfigError, match="'lerning_rate' is not a PPOConfig field"):
        run_sweep(typo, RunConfig(output_dir=str(tmp_path)), mode="offline")
    with pytest.raises(ConfigError, match="offline sweeps"):
        run_sweep(spec, RunConfig(output_dir=str(tmp_path)), trials=1, mode="offline")


LR, KL, SEED = "algorithm_config.learning_rate", "algorithm_config.kl_coef", "seed"
SPACE = {"method": "random", "metric": {"name": "eval/mean_return", "goal": "maximize"},
         "parameters": {LR: {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
                        KL: {"min": 0.0, "max": 1.0}, SEED: {"min": 1, "max": 4},
                        "env_kwargs.sizes": {"values": [[1, 2], "x"]}, "episodes": {"value": 7},
                        "algorithm_config.clip_range": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.25},
                        "agent_kwargs": {"parameters": {"flag": {"values": [True, False]}}}}}


def sample(method: str, seed: int, n: int = 12) -> list[dict]:
    """Parameters of ``n`` trials of a fake objective (TPE takes over from random sampling after 10)."""
    spec = load_sweep({**SPACE, "method": method})
    study = optuna.create_study(sampler=make_sampler(spec, seed), direction="maximize")
    params = []

    def objective(trial):
        p = suggest_params(spec, trial)
        params.append(p)
        return p[KL] - p[LR] * p[SEED]

    study.optimize(objective, n_trials=n)
    return params


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_samplers_are_deterministic_given_the_seed(method):
    first, again, other = sample(method, 0), sample(method, 0), sample(method, 1)
    assert first == again and first != other
    for p in first:
        assert 1e-5 <= p[LR] <= 1e-2 and 0 <= p[KL] <= 1 and isinstance(p[SEED], int) and 1 <= p[SEED] <= 4
        assert p["env_kwargs.sizes"] in ([1, 2], "x") and p["episodes"] == 7
        assert p["algorithm_config.clip_range"] in (0, 0.25, 0.5, 0.75, 1.0) and p["agent_kwargs.flag"] in (True, False)
