"""The README's quick start as a file: a Blackjack agent written in three hooks, trained in a plain loop.

    python examples/quickstart.py

Plays 3,000 episodes on one env with PPO at its defaults (for an agent that scores its actions: a
policy head on the embedded model's features, the adapter frozen), printing a line every 100
episodes, then evaluates the agent greedily on 500 fixed deals of a vector env. The wall time and
peak memory measured on 2 CPU cores are in the README ("Quick start").
"""

from __future__ import annotations

import gymnasium as gym
import torch

from rllama import RLlamaAgent


class BlackjackAgent(RLlamaAgent):
    def get_system_prompt(self):
        return ("You are playing Blackjack. Get a hand total closer to 21 than the dealer without going "
                "over 21. Each turn, reply with one word: hit (take another card) or stick (stop taking cards).")

    def format_observation(self, observation):
        player_sum, dealer_card, usable_ace = observation
        return f"Your hand totals {player_sum}. The dealer shows {dealer_card}. Hit or stick?"

    def extract_action(self, response):
        return 1 if "hit" in response.lower() else 0

    def get_valid_actions(self, observation):  # optional: score these instead of generating text
        return ["stick", "hit"]


def main(episodes: int = 3000) -> None:
    torch.set_num_threads(1)  # one thread was fastest on 2 cores (README, "Set-up")
    agent = BlackjackAgent(seed=0)
    env = gym.make("Blackjack-v1", sab=True)
    returns = []
    for episode in range(episodes):
        observation, info = env.reset(seed=episode)
        done, total = False, 0.0
        while not done:
            action = agent.act(observation)
            observation, reward, terminated, truncated, info = env.step(action)
            agent.assign_reward(reward)
            total += reward
            done = terminated or truncated
        agent.terminate_episode(truncated=truncated and not terminated, final_observation=observation)
        returns.append(total)
        if (episode + 1) % 100 == 0:
            print(f"episode {episode + 1}: mean return of the last 100 {sum(returns[-100:]) / 100:+.3f}, "
                  f"{agent.algorithm.num_updates} updates")

    envs = gym.make_vec("Blackjack-v1", num_envs=16, vectorization_mode="sync", sab=True)
    print("greedy, 500 fixed deals:", agent.evaluate(envs, n_episodes=500, seed=10_000))


if __name__ == "__main__":
    main()
