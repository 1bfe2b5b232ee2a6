"""GiGPO: step-level advantages from anchor states on top of GRPO's episode groups."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from rllama.algorithms import GRPO, Episode, GiGPO, GiGPOConfig, Step, available, get_algorithm_class, make_algorithm
from rllama.algorithms.gigpo import anchor_state, step_advantages, step_group_keys, step_returns
from rllama.checkpoint import load_training_state, save_training_state
from rllama.loops import run_episodes
from tests.conftest import ChoiceAgent, ChoiceEnv, right_probability

FAST = {"batch_episodes": 8, "minibatch_size": 8, "learning_rate": 1e-3, "kl_coef": 0.0, "ent_coef": 0.0,
        "policy_head": 0, "group_size": 4}
A, B, C, D = [1, 10], [1, 11], [1, 12], [1, 13]  # prompt ids of four states


def _episode(group, states, rewards):
    return Episode([Step(list(s), reward=r) for s, r in zip(states, rewards)], info={"group": group})


def hand_made():
    """Group 0: three episodes through A then B or C; group 1: A and D once each (gamma 0.5)."""
    return [
        _episode(0, [A, B], [0.0, 1.0]),    # G = [0.5, 1.0], R = 1
        _episode(0, [A, C], [0.0, 0.0]),    # G = [0.0, 0.0], R = 0
        _episode(0, [A, B], [0.0, -1.0]),   # G = [-0.5, -1.0], R = -1
        _episode(1, [A], [5.0]),            # A again, but in another episode group
        _episode(1, [D], [3.0]),
    ]


def test_step_returns_are_discounted_to_the_end_of_each_episode():
    np.testing.assert_allclose(step_returns(hand_made(), 0.5), [0.5, 1.0, 0.0, 0.0, -0.5, -1.0, 5.0, 3.0])
    np.testing.assert_allclose(step_returns([_episode(0, [A, B, C], [1.0, 0.0, 2.0])], 0.5), [1.5, 1.0, 2.0])


def test_identical_states_of_one_group_share_a_step_group_and_a_lone_state_gets_zero():
    episodes = hand_made()
    returns, keys = step_returns(episodes, 0.5), step_group_keys(episodes)
    # step groups: A in group 0 {0.5, 0, -0.5}, B in group 0 {1, -1}; C, A in group 1, D alone
    centred = step_advantages(returns, keys, eps=1e-4, normalize=False)
    np.testing.assert_allclose(centred, [0.5, 1.0, 0.0, 0.0, -0.5, -1.0, 0.0, 0.0], atol=1e-12)
    scaled = step_advantages(returns, keys, eps=1e-4, normalize=True)
    a_std = math.sqrt(1 / 6)  # population std of {0.5, 0, -0.5}
    np.testing.assert_allclose(scaled, [0.5 / (a_std + 1e-4), 1 / (1 + 1e-4), 0.0, 0.0,
                                        -0.5 / (a_std + 1e-4), -1 / (1 + 1e-4), 0.0, 0.0], atol=1e-12)
    # a lone step is 0 even without eps; a state met twice in one episode is one step group
    assert step_advantages(np.array([4.0]), ["x"], eps=0.0).tolist() == [0.0]
    loop = [_episode(0, [A, B, A], [1.0, 0.0, 1.0])]
    np.testing.assert_allclose(step_advantages(step_returns(loop, 1.0), step_group_keys(loop), 0.0, False),
                               [0.5, 0.0, -0.5])


def test_a_state_is_the_prompt_and_the_candidates():
    assert anchor_state(Step([1, 2])) == anchor_state(Step([1, 2], reward=3.0, text="other reply"))
    assert anchor_state(Step([1, 2])) != anchor_state(Step([1, 3]))
    assert anchor_state(Step([1, 2], candidate_ids=[[5], [6]])) != anchor_state(Step([1, 2], candidate_ids=[[5]]))
    # without group=, the episode group is the first prompt (GRPO's): steps of other starts never match
    ungrouped = [Episode([Step(A), Step(B)]), Episode([Step(C), Step(B)])]
    keys = step_group_keys(ungrouped)
    assert keys[1] != keys[3]


@pytest.fixture
def algorithms(make_agent):
    """GiGPO (omega = 0.5) and GRPO on one tiny policy, built through the registry."""
    policy = make_agent(algorithm="ppo", algorithm_config={"policy_head": 0}).policy
    config = {"policy_head": 0, "group_size": 2, "batch_episodes": 4, "std_eps": 1e-4}
    gigpo = make_algorithm("gigpo", policy, dict(config, gamma=0.5, step_weight=0.5, step_normalize=False))
    return gigpo, make_algorithm("grpo", policy, config)


def _targets(algo, episodes):
    from rllama.algorithms import RolloutBuffer

    buffer = RolloutBuffer()
    for e in episodes:
        buffer.add(e)
    return algo.compute_targets(buffer.to_batch(algo.config.gamma, algo.config.gae_lambda), episodes)


def test_advantage_is_the_episode_advantage_plus_weighted_step_advantage(algorithms):
    gigpo, grpo = algorithms
    episodes = hand_made()
    adv, returns = _targets(gigpo, episodes)
    s = math.sqrt(2 / 3)  # population std of the episode returns {1, 0, -1}
    episode = [1 / (s + 1e-4)] * 2 + [0.0] * 2 + [-1 / (s + 1e-4)] * 2 + [1.0, -1.0]
    step = [0.5, 1.0, 0.0, 0.0, -0.5, -1.0, 0.0, 0.0]
    np.testing.assert_allclose(adv.numpy(), [e + 0.5 * t for e, t in zip(episode, step)], atol=1e-4)
    np.testing.assert_allclose(returns.numpy(), [0.5, 1.0, 0.0, 0.0, -0.5, -1.0, 5.0, 3.0])
    assert gigpo._anchored == 5 / 8  # A x3 and B x2 of group 0


def test_without_the_step_weight_gigpo_is_grpo(algorithms):
    gigpo, grpo = algorithms
    gigpo.config = GiGPOConfig(**dict(vars(gigpo.config), step_weight=0.0))
    episodes = hand_made() + [Episode([Step(A, reward=2.0), Step(B, reward=1.0)])]  # and a lone ungrouped one
    assert torch.equal(_targets(gigpo, episodes)[0], _targets(grpo, episodes)[0])


def test_registry_builds_gigpo():
    assert "gigpo" in available() and get_algorithm_class("GiGPO") is GiGPO
    assert issubclass(GiGPO, GRPO) and GiGPO.config_class is GiGPOConfig


@pytest.mark.parametrize(("field", "value", "message"), [
    ("step_weight", -1.0, "GiGPOConfig.step_weight=-1.0 must be a non-negative number"),
    ("step_weight", math.inf, "GiGPOConfig.step_weight=inf must be a non-negative number"),
    ("step_weight", "1", "GiGPOConfig.step_weight='1' must be a non-negative number"),
    ("step_normalize", "yes", "GiGPOConfig.step_normalize='yes' must be True or False"),
    ("gamma", 1.5, r"GiGPOConfig.gamma=1.5 must lie in \[0, 1\]"),
    ("batch_episodes", 10, "GiGPOConfig.batch_episodes=10 must be a multiple of group_size=4"),
])
def test_bad_settings_are_rejected_where_they_enter(field, value, message):
    with pytest.raises(ValueError, match=message):
        GiGPOConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown GiGPOConfig field"):
        GiGPOConfig.from_dict({"step_advantage_w": 1.0})


@pytest.mark.parametrize("reward_right", [1.0, -1.0])
def test_one_update_moves_probability_toward_the_rewarded_action(make_agent, reward_right):
    agent = make_agent(algorithm="gigpo", algorithm_config=FAST)
    assert isinstance(agent.algorithm, GiGPO)
    observations = [0, 3, 5, 9]
    before = [right_probability(agent, o) for o in observations]
    history = agent.train(ChoiceEnv(reward_right=reward_right), 8, seed=0, progress=False)
    assert len(history) == 1 and "loss/value" not in history[0]
    after = [right_probability(agent, o) for o in observations]
    for b, a in zip(before, after):
        assert (a > b + 0.01) if reward_right > 0 else (a < b - 0.01), (before, after)


class StatelessChoiceAgent(ChoiceAgent):
    """Prompts show the current observation only, so a state reads the same whenever it is met."""

    keep_history = False


def test_train_groups_steps_by_state_within_each_start_group(make_agent):
    agent = make_agent(StatelessChoiceAgent, algorithm="gigpo", algorithm_config=dict(FAST, batch_episodes=4,
                                                                                        group_size=2))
    envs = gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=2) for _ in range(2)])
    history = agent.train(envs, 8, seed=0, progress=False)
    assert len(history) == 2 and all(np.isfinite(h["loss/total"]) for h in history)
    # a group's episodes start from one state (its first steps share a step group); the env draws the
    # same next observation whatever the action, so their second steps do too
    assert all(h["rollout/anchored_steps"] == 1.0 for h in history)


def test_a_plain_loop_groups_episodes_by_their_first_prompt(make_agent):
    agent = make_agent(StatelessChoiceAgent, algorithm="gigpo", algorithm_config=dict(FAST, batch_episodes=4,
                                                                                        group_size=2))
    history = []
    for k in range(4):
        agent.act(k % 2)       # two start states, two episodes each
        agent.assign_reward(float(k))
        history.append(agent.terminate_episode())
    assert history[:3] == [{}, {}, {}] and history[3]["rollout/episodes"] == 4
    assert history[3]["rollout/anchored_steps"] == 1.0


def test_resume_continues_bit_for_bit(make_agent, tmp_path):
    config = dict(FAST, batch_episodes=4, group_size=2, minibatch_size=4)

    def envs():
        return gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=2) for _ in range(2)])

    def play(agent, start, stop):
        for k in range(start, stop):
            run_episodes(agent, envs(), 4, seed=1000 + k)

    straight = make_agent(algorithm="gigpo", algorithm_config=config)
    play(straight, 0, 4)
    first = make_agent(algorithm="gigpo", algorithm_config=config)
    play(first, 0, 2)
    save_training_state(first, tmp_path / "ckpt")
    resumed = make_agent(algorithm="gigpo", algorithm_config=config, seed=123)  # all state comes from disk
    load_training_state(resumed, tmp_path / "ckpt")
    play(resumed, 2, 4)
    assert straight.algorithm.num_updates == resumed.algorithm.num_updates > 0
    for (name, a), b in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
