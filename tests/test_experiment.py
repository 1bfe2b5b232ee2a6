"""Experiments: run folders, configs, loggers, the CLI, and runs that crash and resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rllama.experiment import ConfigError, RunConfig, read_metrics, resume, train
from rllama.experiment.loggers import Callback
from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, tiny_model_dir, **kw) -> RunConfig:
    return tiny_run_config(tmp_path, tiny_model_dir, **kw)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "final" / "policy").rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_run_writes_a_complete_run_folder(tmp_path, tiny_model_dir):
    summary = train(tiny_config(tmp_path, tiny_model_dir))
    run = tmp_path / "runs" / "run"
    assert summary["episodes"] == 16 and summary["run_dir"] == str(run)
    assert yaml.safe_load((run / "config.yaml").read_text())["algorithm"] == "ppo"
    records = read_metrics(run)
    kinds = [r["kind"] for r in records]
    assert kinds.count("segment") == 4 and kinds.count("eval") == 3 and kinds.count("update") == 4
    assert [r["episodes"] for r in records if r["kind"] == "eval"] == [0, 8, 16]
    updates = [r for r in records if r["kind"] == "update"]
    assert all(r["time/update_tokens_per_s"] > 0 and "loss/policy" in r and "policy/entropy" in r for r in updates)
    assert all(r["time/env_steps_per_s"] > 0 for r in records if r["kind"] == "segment")
    assert all(r["sample"]["prompt"] and r["sample"]["reply"] in ("left", "right")
               for r in records if r["kind"] == "eval")
    assert (run / "final" / "policy").is_dir() and (run / "learning_curve.png").stat().st_size > 0
    assert len(list((run / "checkpoints").glob("segment-*"))) == 2  # keep_checkpoints
    assert json.loads((run / "summary.json").read_text())["eval/mean_return"] == summary["eval/mean_return"]
    with pytest.raises(Exception, match="already holds a run"):
        train(tiny_config(tmp_path, tiny_model_dir))


class CrashAfter(Callback):
    def __init__(self, segment):
        self.segment = segment

    def on_segment(self, record):
        if record["segment"] == self.segment:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("algorithm,config", [
    ("ppo", {"batch_episodes": 4, "minibatch_size": 4, "learning_starts": 8}),  # a policy head, fitted mid-run
    ("ppo", {"batch_episodes": 4, "minibatch_size": 4, "policy_head": 0}),  # the adapter trains
    ("dqn", {"batch_episodes": 2, "learning_starts": 2, "minibatch_size": 4}),
])
def test_crashed_run_resumes_exactly(tmp_path, tiny_model_dir, algorithm, config):
    straight = train(tiny_config(tmp_path, tiny_model_dir, name="straight", algorithm=algorithm,
                                 algorithm_config=config))
    cfg = tiny_config(tmp_path, tiny_model_dir, name="crashed", algorithm=algorithm, algorithm_config=config)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[CrashAfter(segment=2)])  # dies mid-run: segments 0-1 checkpointed
    resumed = resume(tmp_path / "runs" / "crashed", allow_code=True)
    a, b = final_params(Path(straight["run_dir"])), final_params(Path(resumed["run_dir"]))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert comparable(read_metrics(straight["run_dir"])) == comparable(read_metrics(resumed["run_dir"]))
    assert sum(r["kind"] == "update" for r in read_metrics(straight["run_dir"])) >= 3  # it trained
    assert straight["eval/mean_return"] == resumed["eval/mean_return"]


def test_crashed_run_with_the_prefix_cache_resumes_exactly(tmp_path, tokenizer):
    from tests.test_prefix_cache import make_deep_lm

    model_dir = tmp_path / "deep-model"
    make_deep_lm(layers=10).save_pretrained(model_dir)  # the default LoRA adapts the top 8: 2 blocks cached
    tokenizer.save_pretrained(model_dir)
    config = {"batch_episodes": 4, "minibatch_size": 4, "policy_head": 0}  # the adapter trains through the cache
    straight = train(tiny_config(tmp_path, model_dir, name="straight", algorithm_config=config))
    cfg = tiny_config(tmp_path, model_dir, name="crashed", algorithm_config=config)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[CrashAfter(segment=2)])
    resumed = resume(tmp_path / "runs" / "crashed", allow_code=True)
    a, b = final_params(Path(straight["run_dir"])), final_params(Path(resumed["run_dir"]))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight["eval/mean_return"] == resumed["eval/mean_return"]


def test_resume_can_extend_a_finished_run(tmp_path, tiny_model_dir):
    train(tiny_config(tmp_path, tiny_model_dir, episodes=8))
    summary = resume(tmp_path / "runs" / "run", overrides={"episodes": 12}, allow_code=True)
    assert summary["episodes"] == 12
    with pytest.raises(ConfigError, match="cannot change"):
        resume(tmp_path / "runs" / "run", overrides={"algorithm": "a2c"}, allow_code=True)


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown config keys \\['episods'\\]"):
        RunConfig.from_dict({"episods": 3})
    with pytest.raises(ConfigError, match="multiple of segment_episodes"):
        RunConfig(eval_every=10, segment_episodes=4)
    with pytest.raises(ConfigError, match="episodes=.*integer"):
        RunConfig(episodes="many")
    with pytest.raises(ConfigError, match="loggers"):
        RunConfig(loggers=["tensorboard"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.from_yaml(bad)
    cfg = RunConfig().with_overrides({"algorithm_config.learning_rate": 1e-4, "env_kwargs.sab": False})
    assert cfg.algorithm_config == {"learning_rate": 1e-4} and cfg.env_kwargs == {"sab": False}
    with pytest.raises(ConfigError, match="not fields of ppo's config"):
        RunConfig(algorithm_config={"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match="not registered"):
        RunConfig(algorithm="trpo")
    from rllama.experiment import make_env

    with pytest.raises(ConfigError, match="cannot import"):
        make_env(RunConfig(env="no_such_module:Env"))
    from rllama.experiment import resolve_agent_class

    with pytest.raises(ConfigError, match="not an RLlamaAgent subclass"):
        resolve_agent_class("tests.conftest:ChoiceEnv")
    with pytest.raises(ConfigError, match="expected one of"):
        resolve_agent_class("poker")


def run_cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rllama.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def cli_flags(tmp_path, tiny_model_dir, name):
    config = tiny_config(tmp_path, tiny_model_dir, name=name, episodes=40, eval_every=0, eval_episodes=4)
    path = tmp_path / f"{name}.yaml"
    config.to_yaml(path)
    return ["train", "--config", str(path), "--quiet", "--allow-code"]


def test_cli_run_killed_mid_way_resumes_to_the_same_parameters(tmp_path, tiny_model_dir):
    done = run_cli(*cli_flags(tmp_path, tiny_model_dir, "straight"))
    assert done.returncode == 0, done.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "rllama.cli", *cli_flags(tmp_path, tiny_model_dir, "killed")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "runs" / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["segment"] >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not json.loads(latest.read_text())["final"]
    resumed = run_cli("train", "--resume", str(tmp_path / "runs" / "killed"), "--quiet", "--allow-code")
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_params(tmp_path / "runs" / "straight"), final_params(tmp_path / "runs" / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_cli_eval_plot_and_errors(tmp_path, tiny_model_dir):
    train(tiny_config(tmp_path, tiny_model_dir, episodes=8))
    run = tmp_path / "runs" / "run"
    out = run_cli("eval", str(run), "--episodes", "4", "--quiet", "--allow-code")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n_episodes"] == 4 and 0 <= result["success_rate"] <= 1
    out = run_cli("plot", str(run), "--output", str(tmp_path / "curve.png"))
    assert out.returncode == 0 and (tmp_path / "curve.png").stat().st_size > 0
    out = run_cli("train", "--set", "episods=3")
    assert out.returncode == 2 and "unknown config keys" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("eval", str(tmp_path))
    assert out.returncode == 2 and "no config.yaml" in out.stderr


@pytest.mark.parametrize("command", ["train", "eval", "sweep", "plot"])
def test_cli_help(command):
    from rllama.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0


def _mlflow_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rllama-test")
    return client, client.search_runs([experiment.experiment_id])


def test_mlflow_logs_params_metrics_and_artifacts_offline(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # the default store is ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = train(tiny_config(tmp_path, tiny_model_dir, loggers=["jsonl", "mlflow"],
                                mlflow={"experiment": "rllama-test", "tags": {"who": "test"}}))
    assert (tmp_path / "mlruns").is_dir()
    client, runs = _mlflow_runs("file:" + str(tmp_path / "mlruns"))
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run" and run.data.tags["who"] == "test"
    assert run.data.params["algorithm"] == "ppo" and run.data.params["algorithm_config.batch_episodes"] == "4"
    # every eval the JSONL logger wrote is in MLflow, at the same env step
    evals = [r for r in read_metrics(summary["run_dir"]) if r["kind"] == "eval"]
    history = client.get_metric_history(run.info.run_id, "eval/mean_return")
    assert sorted((m.step, m.value) for m in history) == sorted((r["steps"], r["eval/mean_return"]) for r in evals)
    assert client.get_metric_history(run.info.run_id, "loss/policy")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "learning_curve.png", "samples"} <= artifacts


def test_mlflow_run_continues_after_a_resume(tmp_path, tiny_model_dir):
    pytest.importorskip("mlflow")
    uri = str(tmp_path / "store")  # a folder path is taken as a file store
    cfg = tiny_config(tmp_path, tiny_model_dir, loggers=["jsonl", "mlflow"],
                      mlflow={"experiment": "rllama-test", "tracking_uri": uri})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[CrashAfter(segment=2)])
    client, runs = _mlflow_runs("file:" + uri)
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    resume(tmp_path / "runs" / "run", allow_code=True)
    client, runs = _mlflow_runs("file:" + uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # what was logged after the last checkpoint is logged again by the resumed run, with the same values
    logged = {(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "eval/mean_return")}
    evals = [r for r in read_metrics(tmp_path / "runs" / "run") if r["kind"] == "eval"]
    assert logged == {(r["steps"], r["eval/mean_return"]) for r in evals} and len(evals) == 3


def test_mlflow_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="mlflow: unknown keys \\['uri'\\]"):
        RunConfig.from_dict({"mlflow": {"uri": "x"}})
    with pytest.raises(ConfigError, match="choose from console, jsonl, wandb, mlflow"):
        RunConfig.from_dict({"loggers": ["mlfow"]})
