"""Every policy-gradient algorithm learns the two-armed text bandit; algorithm-specific pieces."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from rllama import AgentStateError
from rllama.algorithms import GRPO, Episode, Step
from rllama.algorithms.grpo import group_advantages
from tests.conftest import ChoiceEnv, right_probability

POLICY_GRADIENT = ["ppo", "a2c", "reinforce", "grpo"]
FAST = {"batch_episodes": 8, "minibatch_size": 8, "learning_rate": 1e-3, "kl_coef": 0.0, "ent_coef": 0.0}


@pytest.mark.parametrize("algorithm", POLICY_GRADIENT)
@pytest.mark.parametrize("reward_right", [1.0, -1.0])
def test_one_update_moves_probability_toward_the_rewarded_action(make_agent, algorithm, reward_right):
    config = dict(FAST)
    if algorithm == "grpo":
        config["group_size"] = 4
    agent = make_agent(algorithm=algorithm, algorithm_config=config)
    observations = [0, 3, 5, 9]
    before = [right_probability(agent, o) for o in observations]
    history = agent.train(ChoiceEnv(reward_right=reward_right), 8, seed=0, progress=False)
    assert len(history) == 1
    after = [right_probability(agent, o) for o in observations]
    for b, a in zip(before, after):
        assert (a > b + 0.01) if reward_right > 0 else (a < b - 0.01), (algorithm, before, after)


@pytest.mark.parametrize("algorithm", POLICY_GRADIENT)
def test_vector_env_training_runs(make_agent, algorithm):
    config = dict(FAST, batch_episodes=4)
    if algorithm == "grpo":
        config["group_size"] = 2
    agent = make_agent(algorithm=algorithm, algorithm_config=config)
    envs = gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=2) for _ in range(3)])
    history = agent.train(envs, 8, seed=0, progress=False)
    assert history and all(np.isfinite(h["loss/total"]) for h in history)


def _episode(group, ret):
    return Episode([Step([1], reward=ret)], info={"group": group})


def test_grpo_advantages_are_zero_mean_within_each_group():
    episodes = [_episode(0, 1.0), _episode(0, -1.0), _episode(0, 0.0), _episode(1, 5.0), _episode(1, 7.0)]
    adv = np.array(group_advantages(episodes, eps=1e-6))
    assert abs(adv[:3].mean()) < 1e-9 and abs(adv[3:].mean()) < 1e-9
    np.testing.assert_allclose(adv[3:], [-1.0, 1.0], atol=1e-5)
    assert group_advantages([_episode(2, 3.0), _episode(2, 3.0)], eps=1e-4) == [0.0, 0.0]


class SeedRecordingEnv(ChoiceEnv):
    """Observation = the reset seed (so a group's episodes start from the same observation)."""

    def __init__(self):
        super().__init__(steps=1)
        self.observation_space = spaces.Discrete(2**31)
        self.seeds = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seeds.append(seed)
        return (seed or 0) % 1000, {}


@pytest.mark.parametrize("vector", [False, True])
def test_grpo_groups_start_from_the_same_state(make_agent, vector):
    agent = make_agent(algorithm="grpo", algorithm_config=dict(FAST, batch_episodes=8, group_size=4))
    seen = []
    original = agent.algorithm.add_episode

    def spy(episode):
        seen.append((episode.info["group"], episode.steps[0].prompt_ids))
        original(episode)

    agent.algorithm.add_episode = spy
    env = gym.vector.SyncVectorEnv([SeedRecordingEnv for _ in range(3)]) if vector else SeedRecordingEnv()
    agent.train(env, 12, seed=0, progress=False)
    groups: dict[int, list] = {}
    for group, prompt in seen:
        groups.setdefault(group, []).append(prompt)
    assert sorted(len(p) for p in groups.values()) == [4, 4, 4]
    for prompts in groups.values():
        assert all(p == prompts[0] for p in prompts)  # same start state
    assert len({tuple(p[0]) for p in groups.values()}) == 3  # different groups, different starts


def test_grpo_trains_on_whole_groups_only(make_agent):
    agent = make_agent(algorithm="grpo", algorithm_config=dict(FAST, batch_episodes=4, group_size=2))
    algo = agent.algorithm
    for k, group in enumerate([0, 1, 0, 2]):
        agent.act(k)
        agent.assign_reward(float(k))
        agent.terminate_episode(group=group)
    # groups 0 complete (2 episodes), 1 and 2 incomplete: not ready
    assert not algo.ready() and algo.buffer.num_episodes == 4
    agent.act(9)
    agent.assign_reward(1.0)
    stats = agent.terminate_episode(group=1)
    assert stats and stats["rollout/episodes"] == 4  # groups 0 and 1
    assert [e.info["group"] for e in algo.buffer.episodes] == [2]


def test_grpo_without_groups_explains(make_agent):
    agent = make_agent(algorithm="grpo")
    agent.act(1)
    agent.assign_reward(1.0)
    with pytest.raises(AgentStateError, match="groups that start from the same state"):
        agent.terminate_episode()


def test_grpo_batch_must_hold_whole_groups():
    from rllama.algorithms import GRPOConfig

    with pytest.raises(ValueError, match="multiple of group_size"):
        GRPOConfig(batch_episodes=10, group_size=4)


def test_grpo_has_no_value_head_loss(make_agent):
    agent = make_agent(algorithm="grpo", algorithm_config=dict(FAST, group_size=4))
    assert isinstance(agent.algorithm, GRPO)
    stats = agent.train(ChoiceEnv(), 8, seed=0, progress=False)[0]
    assert "loss/value" not in stats


@pytest.mark.parametrize("baseline", ["value", "mean", "none"])
def test_reinforce_baselines(make_agent, baseline):
    agent = make_agent(algorithm="reinforce", algorithm_config=dict(FAST, baseline=baseline))
    before = right_probability(agent, 3)
    stats = agent.train(ChoiceEnv(steps=2), 16, seed=0, progress=False)
    assert len(stats) == 2
    assert ("loss/value" in stats[0]) == (baseline == "value")
    assert right_probability(agent, 3) > before
    if baseline == "mean":
        assert agent.algorithm.running_mean is not None


def test_reinforce_uses_monte_carlo_returns(make_agent):
    agent = make_agent(algorithm="reinforce", algorithm_config=dict(FAST, baseline="none", gamma=0.5))
    episode = Episode([Step([1], reward=1.0), Step([1], reward=0.0), Step([1], reward=4.0)])
    batch_adv, returns = agent.algorithm.compute_targets(None, [episode])
    torch.testing.assert_close(returns, torch.tensor([2.0, 2.0, 4.0]))
    torch.testing.assert_close(batch_adv, returns)
