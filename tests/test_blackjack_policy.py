"""The Blackjack policy map: the exact solution, exact policy values, and an agent's greedy map."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from rllama.agents.blackjack import (
    HIT,
    STATES,
    STICK,
    BlackjackAgent,
    agreement,
    format_policy_map,
    optimal_policy,
    policy_value,
)
from tests.conftest import make_tiny_lm, make_tokenizer


def test_optimal_policy_is_sutton_and_barto_figure_5_2():
    best = optimal_policy()
    assert len(best) == len(STATES) == 280
    # No usable ace: stick on 17+, on 13-16 against 2-6, on 12 against 4-6; hit otherwise.
    for total in range(4, 22):
        for dealer in range(1, 11):
            stick = total >= 17 or (13 <= total <= 16 and 2 <= dealer <= 6) or (total == 12 and 4 <= dealer <= 6)
            assert best[(total, dealer, False)] == (STICK if stick else HIT), (total, dealer)
    # Usable ace: stick on 19+, and on 18 unless the dealer shows 9, 10 or an ace.
    for total in range(12, 22):
        for dealer in range(1, 11):
            stick = total >= 19 or (total == 18 and 2 <= dealer <= 8)
            assert best[(total, dealer, True)] == (STICK if stick else HIT), (total, dealer)


def _monte_carlo(policy, episodes: int) -> tuple[float, float]:
    env = gym.make("Blackjack-v1", sab=True)
    rng = np.random.default_rng(0)
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=k)
        done = False
        while not done:
            p_hit = float(policy[(int(obs[0]), int(obs[1]), bool(obs[2]))])
            obs, reward, terminated, truncated, _ = env.step(int(rng.random() < p_hit))
            done = terminated or truncated
        returns.append(reward)
    return float(np.mean(returns)), float(np.std(returns) / np.sqrt(episodes))


@pytest.mark.parametrize("name", ["always stick", "stick at 17+", "uniform random", "optimal"])
def test_policy_value_matches_playing_the_policy(name):
    policy = {"always stick": {s: STICK for s in STATES},
              "stick at 17+": {s: STICK if s[0] >= 17 else HIT for s in STATES},
              "uniform random": {s: 0.5 for s in STATES},
              "optimal": optimal_policy()}[name]
    mean, stderr = _monte_carlo(policy, 20_000)
    assert abs(policy_value(policy) - mean) < 4 * stderr, (name, policy_value(policy), mean, stderr)


def test_an_agents_policy_map_covers_every_state_and_formats():
    agent = BlackjackAgent(make_tiny_lm(), make_tokenizer(), seed=0, precision="fp32")
    policy = agent.policy_map()
    assert set(policy) == set(STATES) and set(policy.values()) <= {STICK, HIT}
    text = format_policy_map(policy)
    assert f"{agreement(policy):.0%} of 280 states" in text
    cells = [c for line in format_policy_map(optimal_policy()).splitlines() if line.startswith("  total")
             for c in line.split()[2:]]
    assert len(cells) == 280 and set(cells) == {"H", "S"}  # lower case marks differences only
    flipped = {**optimal_policy(), (20, 5, False): HIT}
    assert format_policy_map(flipped).splitlines()[2].split()[2:][4] == "h"
