"""Train an LLM agent to play Blackjack, on the embedded default model.

    python examples/blackjack.py                     # DQN, 3,000 episodes: about 2 minutes on 2 CPU cores, 1.2 GB
    python examples/blackjack.py --algorithm sac     # any registered algorithm (at its defaults, 3,000 episodes)
    python examples/blackjack.py --episodes 400 --eval-episodes 200   # a quick look

The default, DQN, trains a Q head on the model's own (whitened) features, with the LoRA adapter
frozen, so every forward is served from the prefix cache (``docs/algorithms/dqn.md``).

Prints the mean greedy return on fixed evaluation deals before and after training, and the
trained agent's policy map: its action in each of the 280 decision states (player total x dealer
card, with and without a usable ace) beside the optimal one. Saves the trained agent as a run
folder (``runs/blackjack-demo``; ``rllama eval runs/blackjack-demo`` evaluates it again). For
reference (exact, sab rules): optimal -0.043, stick at 17+ -0.076, always stick -0.183, uniform
random -0.394.

It runs on one torch thread (``--threads``): on 2 cores two threads were no faster alone and three
times slower beside another busy process (``benchmarks/threads.py``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gymnasium as gym
import torch

from rllama.agents import BlackjackAgent
from rllama.agents.blackjack import format_policy_map, policy_value

__all__ = ["BlackjackAgent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="dqn", help="a registered algorithm (default: dqn)")
    parser.add_argument("--episodes", type=int, default=3000, help="training episodes (default: 3000)")
    parser.add_argument("--eval-episodes", type=int, default=1000,
                        help="fixed evaluation deals before and after (default: 1000)")
    parser.add_argument("--envs", type=int, default=16, help="parallel environments (vector env)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--save", default="runs/blackjack-demo",
                        help="run folder to save the trained agent in, for `rllama eval` (default: runs/blackjack-demo;"
                             " '' saves nothing)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1, measured fastest on 2 cores; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    agent = BlackjackAgent(args.model, algorithm=args.algorithm, seed=args.seed)
    envs = gym.make_vec("Blackjack-v1", num_envs=args.envs, vectorization_mode="sync", sab=True)

    before = agent.evaluate(envs, args.eval_episodes, seed=10_000, progress=True)
    print(f"untrained: mean return {before['mean_return']:+.3f} ± {before['stderr']:.3f}")

    start = time.perf_counter()
    agent.train(envs, args.episodes, seed=args.seed, progress=True)
    minutes = (time.perf_counter() - start) / 60

    after = agent.evaluate(envs, args.eval_episodes, seed=10_000, progress=True)
    policy = agent.policy_map()
    print(format_policy_map(policy))
    print(f"untrained: mean return {before['mean_return']:+.3f} ± {before['stderr']:.3f}")
    print(f"trained:   mean return {after['mean_return']:+.3f} ± {after['stderr']:.3f} "
          f"(the policy map's exact value: {policy_value(policy):+.3f}); {args.algorithm}, {args.episodes} "
          f"episodes in {minutes:.1f} min")
    print("reference: optimal -0.043, stick at 17+ -0.076, always stick -0.183, random -0.394")
    if args.save:
        save_run(agent, args)


def save_run(agent, args) -> None:
    """Save the trained agent as a run folder (its config and ``final/policy``) that ``rllama eval`` reads."""
    from rllama.experiment import RunConfig

    folder = Path(args.save)
    config = RunConfig(env="Blackjack-v1", agent="blackjack", algorithm=args.algorithm, model=args.model,
                       seed=args.seed, num_envs=args.envs, episodes=args.episodes, output_dir=str(folder.parent),
                       name=folder.name, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_yaml(folder / "config.yaml")
    agent.save(folder / "final" / "policy")
    print(f"saved to {folder}/final/policy; evaluate it again with: rllama eval {folder} --episodes "
          f"{args.eval_episodes}")


if __name__ == "__main__":
    main()
