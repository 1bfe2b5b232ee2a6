"""The TextWorld example agent: hooks, scoring and generate modes, a short run on a tiny model."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import pytest

from rllama.memory import WorkingMemory
from tests.conftest import make_tiny_lm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("textworld") is None, reason="textworld not installed")


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    from rllama.envs.textworld_games import GameFamily, make_games

    return make_games(GameFamily(nb_rooms=2, nb_objects=2, quest_length=2), seeds=[0, 1],
                      root=tmp_path_factory.mktemp("tw"))


def agent(tokenizer, **kw):
    from examples.textworld import TextWorldAgent

    return TextWorldAgent(make_tiny_lm(), tokenizer, seed=0, precision="fp32",
                          algorithm_config={"batch_episodes": 2, "minibatch_size": 4}, **kw)


def test_hooks(tokenizer):
    a = agent(tokenizer)
    obs = {"text": "-= Kitchen =-\n\n\nYou see a key.", "admissible_commands": ("look", "take key")}
    assert a.format_observation(obs) == "-= Kitchen =-\nYou see a key."
    assert a.get_valid_actions(obs) == ["look", "take key"]
    assert a.extract_action("Take key.\nmore text") == "take key"
    assert a.extract_action("> 'open chest'") == "open chest"
    with pytest.raises(ValueError, match="no command"):
        a.extract_action("   ")
    assert isinstance(a.working_memory, WorkingMemory)
    g = agent(tokenizer, generate=True)
    assert g.get_valid_actions(obs) is None
    assert g.format_observation(obs).endswith("Commands you can use: look, take key")


@pytest.mark.parametrize("generate", [False, True])
def test_short_training_run_on_a_textworld_vector_env(tokenizer, games, generate):
    from examples.textworld import play_each_game

    a = agent(tokenizer, generate=generate)
    envs = gym.make_vec("rllama/TextWorld-v0", num_envs=2, vectorization_mode="sync", games=games,
                        admissible_commands_in_observation=True, max_episode_steps=4)
    stats = a.train(envs, 4, seed=0, progress=False)
    assert stats and all(s["rollout/total_episodes"] > 0 for s in stats)
    env = gym.make("rllama/TextWorld-v0", games=games, admissible_commands_in_observation=True, max_episode_steps=3)
    result = play_each_game(a, env)
    assert len(result["won"]) == 2 and 0.0 <= result["success"] <= 1.0
    envs.close()
    env.close()
