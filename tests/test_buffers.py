"""Advantage estimation and minibatching, checked against hand computations."""

from __future__ import annotations

import numpy as np
import torch

from rllama.algorithms import Episode, RolloutBuffer, Step, compute_gae, discounted_returns


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


def test_truncated_episode_bootstraps_from_its_last_value():
    buffer = RolloutBuffer()
    buffer.add(Episode([Step([1], reward=0.0, value=2.0)], truncated=True))
    buffer.add(Episode([Step([1], reward=0.0, value=2.0)], truncated=False))
    batch = buffer.to_batch(gamma=0.5, lam=1.0)
    assert batch.returns.tolist() == [1.0, 0.0]


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
