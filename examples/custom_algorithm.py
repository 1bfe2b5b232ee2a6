"""Register your own algorithm: a REINFORCE variant that only learns from the best episodes.

    python examples/custom_algorithm.py

An algorithm receives finished episodes (``add_episode``), says when it can train (``ready``) and
updates the policy's adapter and heads (``update``), returning statistics. ``OnPolicyAlgorithm``
does the collecting, minibatching, KL to the reference and optimizer steps; a subclass only writes
its loss. Once registered, ``algorithm="top_half_pg"`` works anywhere a name is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rllama.algorithms import Minibatch, OnPolicyAlgorithm, OnPolicyConfig, register_algorithm


@dataclass
class TopHalfConfig(OnPolicyConfig):
    """Settings: the episodes whose return is above the batch median get advantage 1, the rest 0."""

    batch_episodes: int = 8
    learning_rate: float = 1e-4
    normalize_advantages: bool = False


@register_algorithm("top_half_pg")
class TopHalfPolicyGradient(OnPolicyAlgorithm):
    """Imitate the better half of each batch (a filtered behaviour-cloning flavour of REINFORCE)."""

    config_class = TopHalfConfig
    uses_value = False

    def compute_targets(self, batch, episodes):
        returns = torch.tensor([e.total_reward for e in episodes])
        good = (returns > returns.median()).float()
        advantages = torch.cat([good[i].repeat(len(e)) for i, e in enumerate(episodes)])
        return advantages, batch.returns

    def policy_loss(self, mb: Minibatch):
        return -mb.mean_over_steps(mb.unit_advantages() * mb.new_logprobs), {}


def main() -> None:
    import gymnasium as gym

    from rllama.agents import BlackjackAgent

    torch.set_num_threads(1)  # one thread was fastest on 2 cores (README, "Set-up")
    agent = BlackjackAgent(algorithm="top_half_pg", algorithm_config={"policy_head": 0}, seed=0)  # the adapter trains
    envs = gym.make_vec("Blackjack-v1", num_envs=8, vectorization_mode="sync", sab=True)
    history = agent.train(envs, 64)
    print("updates:", len(history), "last stats:", {k: round(v, 3) for k, v in history[-1].items()})


if __name__ == "__main__":
    main()
