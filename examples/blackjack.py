"""Train an LLM agent to play Blackjack with PPO, on the embedded default model.

    python examples/blackjack.py                 # about 15 minutes on 2 CPU cores
    python examples/blackjack.py --episodes 200 --eval-episodes 100   # a quick look

Prints the mean greedy return on fixed evaluation deals before and after training, and the
trained agent's policy map: its action in each of the 280 decision states (player total x dealer
card, with and without a usable ace) beside the optimal one. For reference (exact, sab rules):
optimal -0.043, stick at 17+ -0.076, always stick -0.183, uniform random -0.394.
"""

from __future__ import annotations

import argparse

import gymnasium as gym

from rllama.agents import BlackjackAgent
from rllama.agents.blackjack import format_policy_map, policy_value

__all__ = ["BlackjackAgent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=640, help="training episodes")
    parser.add_argument("--eval-episodes", type=int, default=320, help="evaluation episodes before and after")
    parser.add_argument("--envs", type=int, default=16, help="parallel environments (vector env)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--save", default=None, help="folder to save the trained adapter and heads")
    args = parser.parse_args()

    agent = BlackjackAgent(args.model, seed=args.seed)
    envs = gym.make_vec("Blackjack-v1", num_envs=args.envs, vectorization_mode="sync", sab=True)

    before = agent.evaluate(envs, args.eval_episodes, seed=10_000, progress=True)
    print(f"untrained: mean return {before['mean_return']:+.3f} ± {before['stderr']:.3f}")

    agent.train(envs, args.episodes, seed=args.seed, progress=True)

    after = agent.evaluate(envs, args.eval_episodes, seed=10_000, progress=True)
    policy = agent.policy_map()
    print(format_policy_map(policy))
    print(f"untrained: mean return {before['mean_return']:+.3f} ± {before['stderr']:.3f}")
    print(f"trained:   mean return {after['mean_return']:+.3f} ± {after['stderr']:.3f} "
          f"(the policy map's exact value: {policy_value(policy):+.3f})")
    print("reference: optimal -0.043, stick at 17+ -0.076, always stick -0.183, random -0.394")
    if args.save:
        agent.save(args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
