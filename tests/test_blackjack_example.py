"""The Blackjack example agent: its hooks, and a short run on Blackjack-v1 with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

from examples.blackjack import BlackjackAgent
from tests.conftest import make_tiny_lm


@pytest.fixture
def agent(tokenizer):
    return BlackjackAgent(make_tiny_lm(), tokenizer, seed=0,
                          algorithm_config={"batch_episodes": 8, "minibatch_size": 8, "learning_starts": 0})


def test_observation_text(agent):
    assert agent.format_observation((14, 10, 0)) == "Your hand totals 14. The dealer shows 10. Hit or stick?"
    assert agent.format_observation((13, 1, 1)) == (
        "Your hand totals 13 (with a usable ace). The dealer shows an ace. Hit or stick?")


@pytest.mark.parametrize("text,action", [("hit", 1), ("stick", 0), ("I will hit.", 1), ("Stand", 0), ("stay!", 0)])
def test_extract_action(agent, text, action):
    assert agent.extract_action(text) == action


def test_extract_action_rejects_other_text(agent):
    with pytest.raises(ValueError, match="no 'hit' or 'stick'"):
        agent.extract_action("maybe")


def test_candidates_map_to_the_action_space(agent):
    space = gym.make("Blackjack-v1").action_space
    assert [agent.extract_action(c) for c in agent.get_valid_actions((12, 2, 0))] == [0, 1]
    assert all(space.contains(agent.extract_action(c)) for c in agent.get_valid_actions((12, 2, 0)))


def test_short_training_run_on_blackjack_vector_env(agent):
    envs = gym.make_vec("Blackjack-v1", num_envs=4, vectorization_mode="sync", sab=True)
    history = agent.train(envs, 16, seed=0, progress=False)
    assert len(history) >= 1 and all("loss/policy" in h for h in history)
    result = agent.evaluate(envs, 8, seed=1)
    assert result["n_episodes"] == 8 and -1.0 <= result["mean_return"] <= 1.5


@pytest.mark.timeout(420)
def test_async_example_runs_end_to_end(tiny_model_dir):
    """``examples/async_blackjack.py`` as a user runs it: Ray workers, the learner, greedy returns printed."""
    pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "examples/async_blackjack.py", "--model", str(tiny_model_dir),
                           "--episodes", "32", "--workers", "2"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "untrained: greedy return" in proc.stdout
    assert "trained on 32 episodes" in proc.stdout and "updates)" in proc.stdout
    assert "rollout/mean_staleness" in proc.stdout  # the learner trained on what the workers sent


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end_prints_the_policy_map_and_saves_a_run_rllama_eval_reads(tiny_model_dir, tmp_path):
    """``examples/blackjack.py`` (``make demo``) as a user runs it, on a tiny model and a short budget."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    run = tmp_path / "blackjack-demo"
    proc = subprocess.run([sys.executable, "examples/blackjack.py", "--model", str(tiny_model_dir), "--episodes", "16",
                           "--eval-episodes", "8", "--envs", "4", "--save", str(run)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "untrained: mean return" in proc.stdout and "trained:   mean return" in proc.stdout
    assert "agreement with the optimal policy" in proc.stdout and "dealer: A 2 3 4 5 6 7 8 9 10" in proc.stdout
    assert f"rllama eval {run}" in proc.stdout
    evaluated = subprocess.run([sys.executable, "-m", "rllama.cli", "eval", str(run), "--episodes", "8", "--quiet"],
                               cwd=root, env=env, capture_output=True, text=True, timeout=280)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["n_episodes"] == 8
