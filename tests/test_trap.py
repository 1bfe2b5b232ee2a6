"""The exploration trap, small enough for CI: every algorithm must learn a state-dependent policy.

One-step episodes: the observation is a number word (zero..nine). Sticking pays -0.2 always; hitting
pays +1 below three and -1 from three up. Under the untrained policy (P(hit) about 0.5 everywhere)
hitting loses on average (-0.4 against -0.2), so the first updates rightly push every state toward
"stick", and a policy gradient whose exploration fades there stays at "always stick" for good (7 of
10 states right). Blackjack's "always stick" was this trap (issue 21); the test would have caught it:
the old PPO settings fail it (``test_old_settings_fall_into_the_trap``).
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from gymnasium import spaces

from rllama import RLlamaAgent
from rllama.replies import Choices
from tests.conftest import CHAT_TEMPLATE, make_tiny_lm, make_tokenizer

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THRESHOLD = 3


class TrapEnv(gym.Env):
    observation_space = spaces.Discrete(len(WORDS))
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.n = int(self.np_random.integers(len(WORDS)))
        return self.n, {}

    def step(self, action):
        reward = -0.2 if action == 0 else (1.0 if self.n < THRESHOLD else -1.0)
        return self.n, reward, True, False, {}


class TrapAgent(RLlamaAgent):
    def get_system_prompt(self):
        return "Stick or hit."

    def format_observation(self, observation):
        return WORDS[int(observation)]

    def get_valid_actions(self, observation):
        return ["stick", "hit"]

    def extract_action(self, response):
        return 1 if "hit" in response else 0


class TrapChoicesAgent(TrapAgent):
    """Generate mode: the same choice written as a reply constrained to "stick" or "hit" (the adapter's
    token log-probs are the policy; there is no policy head)."""

    reply_shape = Choices("stick", "hit")

    def get_valid_actions(self, observation):
        return None


def greedy_accuracy(agent) -> float:
    """Share of the ten states in which the agent's greedy choice is the right one."""
    if not agent.scores_actions():  # generated replies: act greedily in every state
        with agent.evaluating(greedy=True):
            agent.reset()
            actions = agent.act_batch(list(range(len(WORDS))))
            agent.reset()
        return sum(a == int(n < THRESHOLD) for n, a in enumerate(actions)) / len(WORDS)
    prompts = [agent.chat.prompt_ids([{"role": "system", "content": agent.get_system_prompt()},
                                      {"role": "user", "content": w}]) for w in WORDS]
    candidates = [[agent.chat.reply_ids(c) for c in ("stick", "hit")]] * len(WORDS)
    with torch.no_grad():
        outputs = agent.policy.candidate_outputs(prompts, candidates, q_heads=agent.algorithm.acting_heads)
    choices = agent.algorithm.choose_actions(outputs, greedy=True, generator=torch.Generator(), training=False)
    return sum(k == int(n < THRESHOLD) for n, (k, _) in enumerate(choices)) / len(WORDS)


def train_on_trap(algorithm: str, config: dict, episodes: int, agent_class=TrapAgent) -> list[float]:
    """Greedy accuracy after every 64 training episodes."""
    agent = agent_class(make_tiny_lm(), make_tokenizer(CHAT_TEMPLATE), algorithm=algorithm, algorithm_config=config,
                      seed=0, precision="fp32")
    envs = gym.vector.SyncVectorEnv([TrapEnv for _ in range(8)])
    accuracy = []
    for chunk in range(episodes // 64):
        agent.train(envs, 64, seed=chunk, progress=False)
        accuracy.append(greedy_accuracy(agent))
    return accuracy


# At their defaults the on-policy algorithms and SAC train heads on the frozen model's whitened
# features (a policy head; SAC's actor), DQN its Q head; the first update waits for 64 steps here
# instead of 500. The "-adapter" cases train the LoRA adapter alone, as before issue 21's defaults;
# the tiny random model needs a larger learning rate than the real one there, and its one-step
# episodes of exact rewards learn on PPO's small batches (the 64-episode ones "auto" gives a scoring
# agent's adapter alone are for Blackjack's noisy returns, and would take 16 times fewer steps here).
EARLY = {"learning_starts": 64}
ADAPTER = {"policy_head": 0, "learning_rate": 1e-3}
TRAP_CASES = {
    "ppo": (EARLY, 640),
    "a2c": (EARLY, 640),
    "reinforce": (EARLY, 640),
    "grpo": (EARLY, 640),
    "dqn": ({}, 960),
    "sac": (EARLY, 640),
    "ppo-adapter": (dict(ADAPTER, batch_episodes=16, minibatch_size=4), 960),
    "a2c-adapter": (ADAPTER, 1280),
    "reinforce-adapter": (ADAPTER, 1280),
    "grpo-adapter": ({"policy_head": 0, "learning_rate": 3e-4}, 1280),
    "sac-adapter": ({"train_adapter": True, "whiten_features": 0, "learning_starts": 64, "gradient_steps": 4,
                     "minibatch_size": 16, "learning_rate": 1e-3}, 960),
}


# The constrained reply is one decision among the two words, as a scored step is, but its policy is the
# branch token's alone (scores average every token of a candidate): on this tiny model PPO's 16-episode
# batches leave it at 0.7-0.8 for 1,920 episodes; 64-episode batches of 16-step minibatches reach 0.9 at
# about 700 episodes and 1.0 from about 1,150 (GRPO's adapter settings do at once).
GENERATE_CONFIGS = {"ppo": dict(ADAPTER, batch_episodes=64, minibatch_size=16)}


@pytest.mark.parametrize("case", list(TRAP_CASES) + ["ppo-generate", "grpo-generate"])
def test_every_algorithm_escapes_the_trap(case):
    """Heads, the adapter alone in scoring mode, and the adapter in generate mode (a reply constrained to
    the two words: :class:`TrapChoicesAgent`)."""
    algorithm = case.split("-")[0]
    if case.endswith("-generate"):
        config = GENERATE_CONFIGS.get(algorithm) or TRAP_CASES[f"{algorithm}-adapter"][0]
        accuracy = train_on_trap(algorithm, config, 1280, TrapChoicesAgent)
    else:
        config, episodes = TRAP_CASES[case]
        accuracy = train_on_trap(algorithm, config, episodes)
    # Learned, and kept: at least 0.9 at two of the last three evaluations.
    assert sum(a >= 0.9 for a in accuracy[-3:]) >= 2, (algorithm, accuracy)


def test_old_settings_fall_into_the_trap():
    """PPO as it was: two epochs of one minibatch and the reverse KL (0.05) stick everywhere."""
    old = {"learning_rate": 1e-3, "epochs": 2, "minibatch_size": 16, "kl_coef": 0.05, "kl_direction": "reverse",
           "policy_head": 0, "batch_episodes": 16}
    accuracy = train_on_trap("ppo", old, 960)
    assert accuracy[-3:] == [0.7, 0.7, 0.7], accuracy


def test_a_q_head_on_unwhitened_features_stays_trapped():
    """DQN's Q head on the frozen model's raw features: the directions that tell the number words
    apart carry too little of the features' variance for gradient steps to find, so it sticks."""
    accuracy = train_on_trap("dqn", {"whiten_features": 0}, 960)
    assert accuracy[-3:] == [0.7, 0.7, 0.7], accuracy
