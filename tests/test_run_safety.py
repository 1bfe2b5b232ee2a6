"""Run folders as a hostile user or a crashing machine would leave them (issue 23): code named by a
config runs only when asked; pointers, progress records and metrics that are damaged give errors
naming the file; final/ is replaced whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rllama import CorruptFileError
from rllama.experiment import ConfigError, RunConfig, read_metrics, resume, train
from rllama.experiment.plotting import plot_run
from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]

AGENT_FILE = '''
from pathlib import Path
Path(__file__).with_name("ran.txt").write_text("the file ran")
from tests.conftest import ChoiceAgent


class Planted(ChoiceAgent):
    pass
'''


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rllama.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir):
    train(tiny_run_config(tmp_path, tiny_model_dir, episodes=8, eval_episodes=0, eval_every=0))
    return tmp_path / "runs" / "run"


def plant(run: Path) -> Path:
    """Make the run folder's config name a file of code, as someone else's run folder could."""
    (run / "planted.py").write_text(AGENT_FILE)
    config = RunConfig.from_yaml(run / "config.yaml").with_overrides(
        {"agent": f"{run / 'planted.py'}:Planted", "env": "Blackjack-v1", "env_kwargs": {}})
    config.to_yaml(run / "config.yaml")
    return run / "ran.txt"


def test_a_run_folder_naming_code_runs_none_of_it_unless_allowed(finished_run):
    ran = plant(finished_run)
    with pytest.raises(ConfigError, match="names code to run.*--allow-code"):
        resume(finished_run, overrides={"episodes": 12})
    for command in (["eval", str(finished_run), "--episodes", "2", "--quiet"],
                    ["train", "--resume", str(finished_run), "--quiet"]):
        out = run_cli(*command)
        assert out.returncode == 2 and "--allow-code" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not ran.exists()


def test_a_config_file_naming_code_needs_the_flag_but_a_typed_class_does_not(tmp_path, tiny_model_dir):
    config = tiny_run_config(tmp_path, tiny_model_dir, episodes=4, eval_episodes=0, eval_every=0,
                             segment_episodes=4, checkpoint_every=4)
    config.to_yaml(tmp_path / "run.yaml")
    out = run_cli("train", "--config", str(tmp_path / "run.yaml"), "--quiet")
    assert out.returncode == 2 and "agent='tests.conftest:ChoiceAgent'" in out.stderr, out.stderr
    out = run_cli("train", "--config", str(tmp_path / "run.yaml"), "--quiet", "--agent", "tests.conftest:ChoiceAgent",
                  "--env", "tests.conftest:ChoiceEnv")
    assert out.returncode == 0, out.stderr


def test_a_file_without_the_class_is_not_run_even_when_allowed(tmp_path):
    from rllama.experiment import resolve_agent_class

    (tmp_path / "other.py").write_text(AGENT_FILE.replace("class Planted", "class Something"))
    with pytest.raises(ConfigError, match="defines no class 'Planted'"):
        resolve_agent_class(f"{tmp_path / 'other.py'}:Planted", allow_code=True)
    assert not (tmp_path / "ran.txt").exists()


@pytest.mark.parametrize("pointer", [{"segment": 2}, {"checkpoint": "../../elsewhere"}, {"checkpoint": "/etc"},
                                     {"checkpoint": "segment-999999"}, [1, 2]])
def test_a_damaged_latest_pointer_is_named(finished_run, pointer):
    (finished_run / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    with pytest.raises(CorruptFileError, match="latest.json"):
        resume(finished_run, overrides={"episodes": 12}, allow_code=True)


def test_progress_missing_from_a_checkpoint_is_named(finished_run):
    from rllama.fileio import write_manifest

    checkpoint = finished_run / "checkpoints" / json.loads((finished_run / "checkpoints" / "latest.json")
                                                           .read_text())["checkpoint"]
    state = json.loads((checkpoint / "state.json").read_text())
    del state["extra"]["segment"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    write_manifest(checkpoint)
    with pytest.raises(CorruptFileError, match=r"state.json: the run's progress .*segment"):
        resume(finished_run, overrides={"episodes": 12}, allow_code=True)


def test_metrics_lines_that_are_not_records_are_skipped(finished_run):
    with open(finished_run / "metrics.jsonl", "a") as f:
        f.write('5\n"text"\n{"kind": "eval", "episodes": "x"}\n[1]\n')
    assert all(isinstance(r, dict) for r in read_metrics(finished_run))
    assert plot_run(finished_run).stat().st_size > 0
    summary = resume(finished_run, overrides={"episodes": 12}, allow_code=True)
    assert summary["episodes"] == 12


def test_a_trajectory_log_outside_the_run_folder_is_refused(tmp_path, tiny_model_dir):
    for where in ("/tmp/elsewhere.jsonl", "../outside.jsonl"):
        config = tiny_run_config(tmp_path, tiny_model_dir, agent_kwargs={"trajectory_log": where})
        with pytest.raises(ConfigError, match="inside the run folder"):
            train(config)
    config = tiny_run_config(tmp_path, tiny_model_dir, name="logged", episodes=4, eval_episodes=0, eval_every=0,
                             agent_kwargs={"trajectory_log": "episodes.jsonl"})
    train(config)
    assert (tmp_path / "runs" / "logged" / "episodes.jsonl").stat().st_size > 0


def test_final_is_replaced_whole_or_not_at_all(finished_run, monkeypatch):
    import shutil

    from rllama.experiment import runner

    before = sorted(p.relative_to(finished_run / "final") for p in (finished_run / "final").rglob("*"))
    real = shutil.copytree

    def killed(src, dst, *args, **kw):
        real(src, dst, *args, **kw)
        if Path(src).name.startswith("segment-"):  # the whole checkpoint copied, not yet in place
            raise KeyboardInterrupt("killed while copying final/")

    monkeypatch.setattr(runner.shutil, "copytree", killed)
    with pytest.raises(KeyboardInterrupt):
        resume(finished_run, overrides={"episodes": 12}, allow_code=True)
    monkeypatch.undo()
    assert sorted(p.relative_to(finished_run / "final") for p in (finished_run / "final").rglob("*")) == before
    assert not [p for p in finished_run.iterdir() if p.name.startswith(".final")]
    out = run_cli("eval", str(finished_run), "--episodes", "2", "--quiet", "--allow-code")
    assert out.returncode == 0, out.stderr
