"""Hard requirements only for the core path: a feature whose extra is missing names the extra; an agent
trains with none of them installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rllama import MissingExtraError

OPTIONAL = ["faiss", "sentence_transformers", "wandb", "optuna", "matplotlib", "mlflow", "ray", "textworld", "trl"]


def _missing(monkeypatch, *modules):
    for name in modules:  # a None entry makes `import name` raise ImportError
        monkeypatch.setitem(sys.modules, name, None)


def _wandb_logger(tmp_path):
    from rllama.experiment.loggers import WandbLogger

    WandbLogger().on_run_start({}, tmp_path, None)


def _mlflow_logger(tmp_path):
    from rllama.experiment.loggers import MLflowLogger

    MLflowLogger(tracking_uri=str(tmp_path / "mlruns")).on_run_start({}, tmp_path, None)


def _plot(tmp_path):
    from rllama.experiment.plotting import plot_runs

    plot_runs([tmp_path], tmp_path / "curve.png")


def _sweep(tmp_path):
    from rllama.experiment.sweep import make_sampler

    make_sampler({"method": "random", "parameters": {"lr": {"values": [1, 2]}}}, seed=0)


def _embedder(tmp_path):
    from rllama.memory.embedding import SentenceEmbedder

    SentenceEmbedder()


def _episodic(tmp_path):
    from rllama.memory import EpisodicMemory
    from rllama.memory.embedding import HashingEmbedder

    EpisodicMemory(HashingEmbedder(32))


@pytest.mark.parametrize("use, modules, extra", [
    (_wandb_logger, ["wandb"], "wandb"),
    (_mlflow_logger, ["mlflow", "mlflow.entities", "mlflow.tracking"], "mlflow"),
    (_plot, ["matplotlib"], "plot"),
    (_sweep, ["optuna"], "sweep"),
    (_embedder, ["sentence_transformers"], "memory"),
    (_episodic, ["faiss"], "memory"),
])
def test_a_missing_extra_is_named(use, modules, extra, tmp_path, monkeypatch):
    _missing(monkeypatch, *modules)
    with pytest.raises(MissingExtraError, match=rf"pip install 'rllama\[{extra}\]'") as info:
        use(tmp_path)
    assert isinstance(info.value, ImportError)  # code catching ImportError keeps working


def test_an_agent_trains_with_no_optional_package_installed(tiny_model_dir):
    blocked = repr(OPTIONAL)
    script = textwrap.dedent(f"""
        import sys

        for name in {blocked}:  # as if not installed: imports fail, importlib.util.find_spec says None
            sys.modules[name] = None
        import gymnasium as gym
        import rllama
        from rllama.agents import BlackjackAgent

        agent = BlackjackAgent({str(tiny_model_dir)!r}, seed=0, precision="fp32",
                               algorithm_config={{"batch_episodes": 4, "minibatch_size": 4, "learning_starts": 4,
                                                  "policy_head": 0}})
        envs = gym.make_vec("Blackjack-v1", num_envs=4, vectorization_mode="sync", sab=True)
        history = agent.train(envs, 8, seed=0, progress=False)
        assert history, "no update ran"
        loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in {blocked})
        assert not loaded, loaded
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
