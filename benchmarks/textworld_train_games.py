"""Diagnostic for the TextWorld benchmark: its agents on the first 16 *training* games.

    python benchmarks/textworld_train_games.py SEED trained --checkpoint .cache/textworld_state_v4
    python benchmarks/textworld_train_games.py SEED untrained --checkpoint .cache/textworld_state_v4  # before training

The agent is built with the settings its ``textworld_heldout.py --checkpoint DIR`` run saved (the same
``DIR`` here) and evaluated with that script's
protocol (greedy: one episode a game; sampled: two), on training games seeds 0-15 instead of the
held-out games: did training fit the games it trained on? Prints one JSON line. The checkpoint
lives on the machine that trained, not in git.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
from textworld_heldout import evaluate_agent, make_agent  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed", type=int)
    parser.add_argument("agent", choices=["trained", "untrained"])
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="the --checkpoint folder of a textworld_heldout.py run")
    args = parser.parse_args()
    state = Path(args.checkpoint) / f"seed{args.seed}"
    if not (state / "state.json").exists():
        raise SystemExit(f"--checkpoint: no training state of seed {args.seed} in {args.checkpoint}")

    import torch

    from examples.textworld import TRAIN_SEEDS, make_env
    from rllama.checkpoint import load_training_state

    torch.set_num_threads(1)
    settings = SimpleNamespace(**json.loads((state / "state.json").read_text())["extra"]["config"])
    agent = make_agent(args.seed, settings)
    if args.agent == "trained":
        load_training_state(agent, state)
    env = make_env(list(TRAIN_SEEDS)[:16], max_episode_steps=settings.max_steps)
    t0 = time.perf_counter()
    result = evaluate_agent(agent, env, SimpleNamespace(eval_batch=8, sampled_episodes=2))
    print(json.dumps({"seed": args.seed, "agent": args.agent, "train_games": result,
                      "s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
