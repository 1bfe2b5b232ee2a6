"""Advantage estimation and minibatching, checked against hand computations."""

from __future__ import annotations

import numpy as np
import torch

from rllama.algorithms import Episode, ReplayBuffer, RolloutBuffer, Step, compute_gae, discounted_returns
from rllama.algorithms.buffers import replay_from_dict, replay_to_dict


def test_gae_matches_hand_computation():
    rewards = np.array([1.0, 0.0, 2.0])
    values = np.array([0.5, 1.0, 1.5])
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 1.5                      # terminal: no bootstrap
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = compute_gae(rewards, values, gamma, lam)
    np.testing.assert_allclose(adv, [a0, a1, a2])
    np.testing.assert_allclose(ret, adv + values)


def test_gae_with_lambda_one_is_monte_carlo_minus_baseline():
    rewards, values = np.array([0.0, 0.0, 1.0]), np.array([0.2, 0.1, 0.3])
    adv, ret = compute_gae(rewards, values, gamma=0.5, lam=1.0)
    np.testing.assert_allclose(ret, discounted_returns(rewards, 0.5))
    np.testing.assert_allclose(ret, [0.25, 0.5, 1.0])


def test_truncated_episode_bootstraps_from_the_state_it_was_cut_in():
    buffer = RolloutBuffer()
    buffer.add(Episode([Step([1], reward=0.0, value=2.0)], truncated=True, bootstrap=Step([1, 2])))
    buffer.add(Episode([Step([1], reward=0.0, value=2.0)], truncated=True))
    buffer.add(Episode([Step([1], reward=0.0, value=2.0)], truncated=False))
    batch = buffer.to_batch(gamma=0.5, lam=1.0, bootstrap_values=[6.0, None, None])
    # the value of the next state (6), else the last state's own value (2) stands in; terminal: nothing
    assert batch.returns.tolist() == [3.0, 1.0, 0.0]


def test_replay_links_a_truncated_last_step_to_the_state_it_was_cut_in():
    replay = ReplayBuffer(10, torch.Generator())
    cut = Step([3, 4], candidate_ids=[[5], [6]])
    replay.add_episode(Episode([Step([1], reward=1.0), Step([2], reward=0.5)], truncated=True, bootstrap=cut))
    replay.add_episode(Episode([Step([7], reward=1.0)], truncated=True))  # no final observation: terminal
    replay.add_episode(Episode([Step([8], reward=1.0)]))
    assert [t.next_step is cut for t in replay.items] == [False, True, False, False]
    assert [t.done for t in replay.items] == [False, False, True, True]
    copy = ReplayBuffer(10, torch.Generator())
    replay_from_dict(copy, replay_to_dict(replay))
    assert copy.items[1].next_step.prompt_ids == [3, 4] and copy.items[1].next_step.candidate_ids == [[5], [6]]


def test_minibatches_cover_every_step_once_and_group_similar_lengths():
    steps = [Step(list(range(1 + (i * 7) % 23))) for i in range(40)]
    buffer = RolloutBuffer()
    buffer.add(Episode(steps))
    batch = buffer.to_batch(0.99, 0.95)
    seen = []
    spreads = []
    for idx in batch.minibatches(8, torch.Generator().manual_seed(0)):
        seen.extend(idx.tolist())
        lengths = [len(steps[i].prompt_ids) for i in idx.tolist()]
        spreads.append(max(lengths) - min(lengths))
    assert sorted(seen) == list(range(40))
    assert np.mean(spreads) < 15  # random minibatches of these lengths spread about 20
