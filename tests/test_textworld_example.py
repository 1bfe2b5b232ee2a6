"""The TextWorld example agent: hooks, scoring and generate modes, a short run on a tiny model."""

from __future__ import annotations

import contextlib
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
                          algorithm_config={"batch_episodes": 2, "minibatch_size": 4, "learning_starts": 4}, **kw)


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


class _WalkthroughPlayer:
    """A stand-in agent that wins the games in ``winning`` (by their walkthrough) and idles in the others."""

    def __init__(self, walkthroughs: dict[str, list[str]], winning: set[str]):
        self.walkthroughs, self.winning = walkthroughs, winning
        self.plans: dict[int, list[str]] = {}
        self.ended = 0

    @contextlib.contextmanager
    def evaluating(self, greedy=True):
        yield self

    def act_batch(self, observations, env_ids):
        actions = []
        for obs, env_id in zip(observations, env_ids):
            if env_id not in self.plans:  # first step: the opening text names the game
                text = obs["text"]
                self.plans[env_id] = list(self.walkthroughs[text]) if text in self.winning else []
            plan = self.plans[env_id]
            actions.append(plan.pop(0) if plan else "look")
        return actions

    def assign_rewards(self, rewards, env_ids):
        pass

    def terminate_episodes(self, env_ids, truncated):
        for env_id in env_ids:
            del self.plans[env_id]
            self.ended += 1


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batched_evaluation_keeps_each_result_with_its_game(games, batch):
    """Episodes played side by side (and refilled as they end) report each (game, k) result in order."""
    from examples.textworld import play_each_game

    env = gym.make("rllama/TextWorld-v0", games=games, admissible_commands_in_observation=True, max_episode_steps=8)
    openings = []
    walkthroughs = {}
    for game in range(len(games)):
        obs, info = env.reset(seed=0, options={"game": game})
        openings.append(obs["text"])
        walkthroughs[obs["text"]] = info["walkthrough"]
    assert len(set(openings)) == len(games)
    player = _WalkthroughPlayer(walkthroughs, winning={openings[1]})
    result = play_each_game(player, env, episodes_per_game=2, batch=batch)
    assert result["won"] == [0.0, 0.0, 1.0, 1.0]
    assert result["score"] == 0.5 and result["n"] == 4
    assert player.ended == 4 and not player.plans
    env.close()
