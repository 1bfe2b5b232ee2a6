"""Train an LLM agent to play Blackjack with PPO, on the embedded default model.

    python examples/blackjack.py                 # about 10-15 minutes on 2 CPU cores
    python examples/blackjack.py --episodes 200 --eval-episodes 100   # a quick look

Prints the mean return of evaluation episodes before and after training. For reference (exact
dynamic programming, sab rules): optimal -0.047, stick at 17+ -0.079, always stick -0.186,
uniform random -0.396.
"""

from __future__ import annotations

import argparse
import re

import gymnasium as gym

from rllama import RLlamaAgent


class BlackjackAgent(RLlamaAgent):
    """Plays Gymnasium's Blackjack-v1: observation ``(player_sum, dealer_card, usable_ace)``."""

    def get_system_prompt(self) -> str:
        return (
            "You are playing Blackjack. Get a hand total closer to 21 than the dealer without going over 21. "
            "Each turn, reply with one word: hit (take another card) or stick (stop taking cards)."
        )

    def format_observation(self, observation) -> str:
        player_sum, dealer_card, usable_ace = (int(x) for x in observation)
        dealer = "an ace" if dealer_card == 1 else str(dealer_card)
        ace = " (with a usable ace)" if usable_ace else ""
        return f"Your hand totals {player_sum}{ace}. The dealer shows {dealer}. Hit or stick?"

    def get_valid_actions(self, observation) -> list[str]:
        return ["stick", "hit"]

    def extract_action(self, response: str) -> int:
        words = re.findall(r"[a-z]+", response.lower())
        if "hit" in words:
            return 1
        if "stick" in words or "stand" in words or "stay" in words:
            return 0
        raise ValueError(f"no 'hit' or 'stick' in {response!r}")


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
    print(f"untrained: mean return {before['mean_return']:+.3f} ± {before['stderr']:.3f}")
    print(f"trained:   mean return {after['mean_return']:+.3f} ± {after['stderr']:.3f}")
    print("reference: optimal -0.047, stick at 17+ -0.079, always stick -0.186, random -0.396")
    if args.save:
        agent.save(args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
