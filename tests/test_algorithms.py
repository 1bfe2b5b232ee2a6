"""Every policy-gradient algorithm learns the two-armed text bandit; algorithm-specific pieces."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from rllama.algorithms import GRPO, Episode, Step
from rllama.algorithms.grpo import group_advantages
from tests.conftest import ChoiceEnv, right_probability

POLICY_GRADIENT = ["ppo", "a2c", "reinforce", "grpo"]
# The adapter alone (no policy head), updating from the first batch.
FAST = {"batch_episodes": 8, "minibatch_size": 8, "learning_rate": 1e-3, "kl_coef": 0.0, "ent_coef": 0.0,
        "policy_head": 0}


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


def test_grpo_in_a_plain_loop_groups_episodes_by_start_state(make_agent):
    """Without group=, episodes that start from the same prompt form a group; lone ones share a batch baseline."""
    same, other, third = [1, 2], [1, 3], [1, 4]
    episodes = [Episode([Step(same, reward=r)]) for r in (1.0, -1.0, 0.0)]
    episodes += [Episode([Step(other, reward=2.0)]), Episode([Step(third, reward=0.0)])]
    adv = group_advantages(episodes, eps=0.0)
    s = np.std([1.0, -1.0, 0.0])
    np.testing.assert_allclose(adv, [1 / s, -1 / s, 0.0, 1.0, -1.0], atol=1e-9)

    agent = make_agent(algorithm="grpo", algorithm_config=dict(FAST, batch_episodes=4, group_size=2))
    history = []
    for k in range(4):
        agent.act(k % 2)
        agent.assign_reward(float(k))
        history.append(agent.terminate_episode())
    assert history[:3] == [{}, {}, {}] and history[3]["rollout/episodes"] == 4


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


# ---------------------------------------------------------------------- value-based: DQN, SAC
OFF_POLICY = {"batch_episodes": 4, "learning_starts": 8, "gradient_steps": 8, "minibatch_size": 8,
              "learning_rate": 1e-3, "head_learning_rate": 1e-2}


def greedy_q_action(agent, observation) -> int:
    messages = [{"role": "system", "content": agent.get_system_prompt()},
                {"role": "user", "content": agent.format_observation(observation)}]
    cands = [agent.chat.reply_ids(c) for c in agent.get_valid_actions(observation)]
    with torch.no_grad():
        out = agent.policy.candidate_outputs([agent.chat.prompt_ids(messages)], [cands], q_heads=("q",))
    return int(out.q["q"][0].argmax())


DQN_CASES = {  # (config, training episodes)
    "adapter": ({"train_adapter": True, "whiten_features": 0}, 16),
    "frozen-whitened": ({"learning_starts": 32}, 64),  # the default: the Q head alone, on whitened features
}


@pytest.mark.parametrize("case", list(DQN_CASES))
@pytest.mark.parametrize("reward_right", [1.0, -1.0])
def test_dqn_greedy_action_moves_to_the_rewarded_one(make_agent, reward_right, case):
    config, episodes = DQN_CASES[case]
    agent = make_agent(algorithm="dqn", algorithm_config=dict(OFF_POLICY, exploration_steps=10, **config))
    history = agent.train(ChoiceEnv(reward_right=reward_right), episodes, seed=0, progress=False)
    assert history and "loss/q" in history[0]
    want = 1 if reward_right > 0 else 0
    assert [greedy_q_action(agent, o) for o in (0, 3, 5, 9)] == [want] * 4
    result = agent.evaluate(ChoiceEnv(reward_right=reward_right), 6, seed=1)
    assert result["mean_return"] == 1.0  # greedy on Q picks the rewarded side every time


SAC_CASES = {  # (config, training episodes)
    "adapter": ({"train_adapter": True, "whiten_features": 0}, 16),
    "frozen-whitened": ({"learning_starts": 16}, 64),  # the default: a policy head and Q heads on whitened features
}


@pytest.mark.parametrize("case", list(SAC_CASES))
@pytest.mark.parametrize("reward_right", [1.0, -1.0])
def test_sac_moves_probability_toward_the_rewarded_action(make_agent, reward_right, case):
    config, episodes = SAC_CASES[case]
    agent = make_agent(algorithm="sac", algorithm_config=dict(OFF_POLICY, **config))
    before = [right_probability(agent, o) for o in (0, 3, 5, 9)]
    alpha0 = agent.algorithm.alpha
    history = agent.train(ChoiceEnv(reward_right=reward_right), episodes, seed=0, progress=False)
    assert history and "loss/critic" in history[0] and "sac/alpha" in history[0]
    after = [right_probability(agent, o) for o in (0, 3, 5, 9)]
    for b, a in zip(before, after):
        assert (a > b + 0.01) if reward_right > 0 else (a < b - 0.01), (before, after)
    assert agent.algorithm.alpha != alpha0  # the temperature is tuned


@pytest.mark.parametrize("train_adapter", [False, True])
def test_sac_train_step_computes_losses_and_steps_nothing(make_agent, train_adapter):
    config = dict(OFF_POLICY, train_adapter=train_adapter, whiten_features=0 if train_adapter else 4)
    agent = make_agent(algorithm="sac", algorithm_config=config)
    agent.train(ChoiceEnv(), 8, seed=0, progress=False)  # one update: the optimizers have state
    algo = agent.algorithm
    params = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
    log_alpha = algo.log_alpha.detach().clone()
    def optimizer_steps():
        return [[float(s["step"]) for s in opt.state.values()] for opt in (algo.optimizer, algo.alpha_optimizer)]

    steps = optimizer_steps()
    assert all(steps)
    loss, stats, auxiliary = algo.train_step(algo.replay.sample(8))
    assert all(torch.equal(p, params[n]) for n, p in agent.policy.named_parameters() if p.requires_grad)
    assert torch.equal(algo.log_alpha.detach(), log_alpha) and optimizer_steps() == steps
    assert loss.requires_grad and {"loss/critic", "loss/actor", "loss/alpha", "sac/alpha"} <= set(stats)
    [(optimizer, alpha_loss)] = auxiliary  # the temperature's loss, for the update to step
    assert optimizer is algo.alpha_optimizer and alpha_loss.item() == stats["loss/alpha"]
    algo.auxiliary_step(optimizer, alpha_loss)
    assert not torch.equal(algo.log_alpha.detach(), log_alpha)


def test_target_network_lags_then_syncs(make_agent):
    config = dict(OFF_POLICY, target_update_interval=1000, train_adapter=True)  # the target copies the adapter too
    agent = make_agent(algorithm="dqn", algorithm_config=config)
    algo = agent.algorithm
    target_before = {k: v.clone() for k, v in algo.target.items()}
    agent.train(ChoiceEnv(), 8, seed=0, progress=False)
    online = agent.policy.snapshot(heads=("q",))
    assert set(online) == set(algo.target)
    assert all(torch.equal(target_before[k], algo.target[k]) for k in algo.target)  # lagging
    assert any(not torch.equal(online[k], algo.target[k]) for k in online)
    algo.update_target()
    assert all(torch.equal(online[k], algo.target[k]) for k in online)
    assert not any("lm_head" in k and "lora" not in k for k in online)  # no base-model copy


def test_polyak_target_moves_part_way(make_agent):
    agent = make_agent(algorithm="sac", algorithm_config=dict(OFF_POLICY, tau=0.5, target_update_interval=10**6))
    algo = agent.algorithm
    name = "heads.q1.linear.weight"
    with torch.no_grad():
        dict(agent.policy.named_parameters())[name].fill_(2.0)
    old = algo.target[name].clone()
    algo.update_target()
    torch.testing.assert_close(algo.target[name], 0.5 * old + 0.5 * torch.full_like(old, 2.0))


def test_replay_samples_uniformly_and_overwrites_oldest():
    from rllama.algorithms import ReplayBuffer, Transition

    buffer = ReplayBuffer(10, torch.Generator().manual_seed(0))
    for k in range(15):
        buffer.add(Transition(Step([k]), float(k), None))
    assert len(buffer) == 10
    assert sorted(int(t.reward) for t in buffer.items) == list(range(5, 15))  # 0-4 were overwritten
    counts = np.bincount([int(t.reward) for t in buffer.sample(20_000)], minlength=15)[5:]
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 30, counts  # 9 degrees of freedom: p < 0.001 above 27.9


def test_replay_links_steps_to_next_states():
    from rllama.algorithms import ReplayBuffer

    buffer = ReplayBuffer(100, torch.Generator())
    steps = [Step([1], candidate_ids=[[1]], action_index=0, reward=r) for r in (0.0, 1.0, 2.0)]
    buffer.add_episode(Episode(steps))
    assert [t.next_step for t in buffer.items] == [steps[1], steps[2], None]
    assert [t.reward for t in buffer.items] == [0.0, 1.0, 2.0]


def test_dqn_epsilon_decays_with_env_steps(make_agent):
    agent = make_agent(algorithm="dqn", algorithm_config=dict(OFF_POLICY, exploration_steps=10,
                                                              exploration_final_eps=0.1))
    assert agent.algorithm.epsilon == 1.0
    agent.train(ChoiceEnv(), 5, seed=0, progress=False)
    assert agent.algorithm.epsilon == pytest.approx(1.0 - 0.9 * 0.5)
    agent.train(ChoiceEnv(), 10, seed=0, progress=False)
    assert agent.algorithm.epsilon == pytest.approx(0.1)


@pytest.mark.parametrize("algorithm", ["dqn", "sac"])
def test_value_based_algorithms_refuse_free_text_agents(make_agent, algorithm):
    from rllama import RLlamaError
    from tests.conftest import FreeTextAgent

    agent = make_agent(FreeTextAgent, algorithm=algorithm)
    with pytest.raises(RLlamaError, match="needs a discrete set of candidate actions"):
        agent.train(ChoiceEnv(), 1, progress=False)


def test_action_names_serve_as_candidates(make_agent):
    from rllama import RLlamaAgent

    class Named(RLlamaAgent):
        action_names = ("left", "right")

        def get_system_prompt(self):
            return "Pick a side."

        def format_observation(self, observation):
            return f"n={observation}"

        def extract_action(self, response):
            return self.action_names.index(response)

    agent = make_agent(Named, algorithm="dqn", algorithm_config=OFF_POLICY)
    agent.train(ChoiceEnv(), 2, progress=False)
    assert agent.algorithm.replay.items[0].step.text in ("left", "right")


@pytest.mark.parametrize("algorithm", ["dqn", "sac"])
def test_value_based_multi_step_episodes_bootstrap_from_targets(make_agent, algorithm):
    """Episodes of several steps exercise the target network (terminal-only episodes do not)."""
    agent = make_agent(algorithm=algorithm, algorithm_config=dict(OFF_POLICY))
    history = agent.train(ChoiceEnv(steps=3), 8, seed=0, progress=False)
    assert history and all(np.isfinite(h["loss/total"]) for h in history)
    assert any(not t.done for t in agent.algorithm.replay.items)


def test_on_policy_update_bootstraps_a_truncated_episode_from_the_current_value(make_agent):
    agent = make_agent(algorithm_config=dict(FAST, batch_episodes=99))
    with torch.no_grad():
        agent.policy.heads["value"].linear.bias.fill_(0.25)
    boot = Step([5, 6, 7])
    episodes = [Episode([Step([1])], truncated=True, bootstrap=boot), Episode([Step([1])], truncated=True),
                Episode([Step([1])])]
    values = agent.algorithm.bootstrap_values(episodes)
    assert values[1:] == [None, None]
    assert values[0] == pytest.approx(float(agent.policy.values([[5, 6, 7]])[0]), abs=1e-6)
    assert values[0] == pytest.approx(0.25, abs=1e-6)  # zero weights, the bias alone
