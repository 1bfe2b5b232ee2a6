"""Asynchronous PPO on Blackjack-v1: Ray rollout workers act while the learner trains.

    python examples/async_blackjack.py                          # 2 workers, 480 episodes, staleness 1
    python examples/async_blackjack.py --workers 4 --staleness 2 --episodes 256

Each worker holds a copy of the agent (embedded SmolLM2-135M-Instruct + LoRA) and 8 Blackjack envs,
and streams finished episodes to the learner in this process; the learner updates when a batch is
full and publishes the adapter and heads, which the workers load before their next episodes.
Episodes more than ``--staleness`` updates old are dropped, the rest importance-corrected. The
agent is evaluated greedily on the same 200 deals before and after: -1.000 -> -0.165 (always stick)
in 142 s with a 2-layer random model passed as ``--model``; the embedded model learns the same
policy from about as many env steps in ``benchmarks/async_blackjack.py`` (15 minutes on 2 cores).
``--address auto`` joins a running Ray cluster instead of starting one here.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import gymnasium as gym
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rllama.agents import BlackjackAgent
from rllama.async_rl import AsyncTrainer


def make_agent(seed: int, model: str | None = None) -> BlackjackAgent:
    # policy_head=0: the adapter trains (the measured setting below; a policy head is PPO's default for
    # a scoring agent and also works with workers).
    return BlackjackAgent(model, seed=seed, algorithm="ppo", algorithm_config={"batch_episodes": 16, "policy_head": 0})


def make_env(num_envs: int = 8):
    return gym.make_vec("Blackjack-v1", num_envs=num_envs, vectorization_mode="sync", sab=True)


def greedy_return(agent, episodes: int = 200) -> float:
    envs = make_env(16)
    try:
        return agent.evaluate(envs, episodes, seed=10_000)["mean_return"]
    finally:
        envs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=480,
                        help="training episodes the learner accepts (480: about 15 minutes on 2 cores)")
    parser.add_argument("--staleness", type=int, default=1, help="drop episodes more updates old than this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2)")
    parser.add_argument("--address", default=None, help="a Ray cluster address ('auto'); default: start Ray here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1, measured fastest on 2 cores; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    trainer = AsyncTrainer(functools.partial(make_agent, model=args.model), make_env, num_workers=args.workers,
                           episodes_per_task=8, max_staleness=args.staleness, seed=args.seed,
                           ray_address=args.address)
    with trainer:
        before = greedy_return(trainer.agent)
        print(f"untrained: greedy return {before:+.3f} on 200 deals")
        t0 = time.perf_counter()
        history = trainer.train(args.episodes)
        wall = time.perf_counter() - t0
        after = greedy_return(trainer.agent)
    last = history[-1] if history else {}
    print(f"trained on {trainer.stats.episodes} episodes ({trainer.stats.env_steps} env steps, "
          f"{trainer.stats.dropped} stale episodes dropped, {len(history)} updates) in {wall:.0f} s: "
          f"greedy return {before:+.3f} -> {after:+.3f}")
    if last:
        print("last update: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(last.items())
                                          if k.startswith(("loss/", "policy/", "rollout/mean_staleness"))))


if __name__ == "__main__":
    main()
