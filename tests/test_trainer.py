"""Trainer: one schedule for the plain loop, agent.train, the runner and the asynchronous learner;
Recorder: one Step list per environment."""

from __future__ import annotations

import gymnasium as gym

from tests.conftest import ChoiceEnv

PPO = {"batch_episodes": 2, "learning_starts": 0, "policy_head": 0, "minibatch_size": 4}


def _play(agent, env, episodes: int) -> list[dict]:
    history = []
    for _ in range(episodes):
        obs, _ = env.reset()
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
            agent.assign_reward(reward)
            done = terminated or truncated
        history.append(agent.terminate_episode())
    return history


def test_the_plain_loop_updates_through_the_trainer_and_tells_the_backend(make_agent):
    agent = make_agent(algorithm="ppo", algorithm_config=PPO)
    told = []
    agent.backend.after_update = lambda policy: told.append(policy)
    stats = _play(agent, ChoiceEnv(steps=2), 4)
    assert [bool(s) for s in stats] == [False, True, False, True]
    assert told == [agent.policy, agent.policy]
    assert agent.algorithm.num_updates == 2
    assert stats[-1]["rollout/total_episodes"] == 4 and stats[-1]["rollout/total_steps"] == 8
    assert agent.total_episodes == agent.trainer.total_episodes == 4


def test_without_auto_update_episodes_wait_and_can_be_taken(make_agent):
    agent = make_agent(algorithm="ppo", algorithm_config=PPO)
    agent.trainer.auto_update = False
    assert _play(agent, ChoiceEnv(steps=3), 3) == [{}, {}, {}]
    assert agent.algorithm.num_updates == 0
    episodes = agent.trainer.take_episodes()
    assert [len(e.steps) for e in episodes] == [3, 3, 3]
    assert agent.trainer.take_episodes() == [] and agent.total_steps == 9


def test_episodes_fed_from_elsewhere_train_like_the_agents_own(make_agent):
    """What the asynchronous learner does: count, add, update (with the backend told)."""
    worker = make_agent(algorithm="ppo", algorithm_config=PPO)
    worker.trainer.auto_update = False
    _play(worker, ChoiceEnv(), 2)
    learner = make_agent(algorithm="ppo", algorithm_config=PPO)
    told = []
    learner.backend.after_update = lambda policy: told.append(policy)
    for episode in worker.trainer.take_episodes():
        learner.trainer.count_steps(len(episode.steps))
        learner.trainer.add_episode(episode)
    assert learner.trainer.ready()
    stats = learner.trainer.update()
    assert told == [learner.policy] and stats["rollout/total_episodes"] == 2.0


def test_one_step_list_per_env_holds_rewards_and_goes_to_the_algorithm(make_agent):
    agent = make_agent(algorithm="ppo", algorithm_config={**PPO, "batch_episodes": 10})
    agent.act(1)
    agent.assign_reward(0.5)
    agent.assign_reward(0.25)
    agent.act(2)
    agent.assign_reward(-1.0)
    record = agent.recorder[0]
    assert record.rewards == [0.75, -1.0] and record.observations == ["n=1", "n=2"]
    assert record.replies == [s.text for s in record.steps] and record.total_reward == -0.25
    steps = list(record.steps)
    agent.terminate_episode()
    assert 0 not in agent.recorder
    assert all(a is b for a, b in zip(agent.algorithm.buffer.episodes[-1].steps, steps))


def test_evaluation_sets_training_episodes_aside_and_counts_nothing(make_agent):
    agent = make_agent(algorithm="ppo", algorithm_config={**PPO, "batch_episodes": 10})
    agent.act(1)
    with agent.evaluating():
        assert not agent.recording and 0 not in agent.recorder
        agent.act(3)
        agent.assign_reward(1.0)
        assert agent.terminate_episode() == {}
    assert agent.recording and agent.recorder[0].observations == ["n=1"]
    assert agent.total_steps == 1 and agent.total_episodes == 0 and agent.mid_episode


def test_group_bookkeeping_lives_in_the_trainer_and_resumes(make_agent):
    agent = make_agent(algorithm="grpo", algorithm_config={"group_size": 2, "batch_episodes": 4})
    agent.train(gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=1)] * 3), 3, progress=False)
    state = agent.trainer.state_dict()
    assert state["next_group"] == 2 and len(state["pending_group_slots"]) == 1  # a group cut in half
    slot = tuple(state["pending_group_slots"][0])
    other = make_agent(algorithm="grpo", algorithm_config={"group_size": 2, "batch_episodes": 4})
    other.trainer.load_state_dict(state)
    assert other.trainer.group_slots(1, 2, None) == [slot]  # the cut group is completed first
