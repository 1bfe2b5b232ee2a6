"""Behaviour cloning from a logged Blackjack trajectory file, then (optionally) PPO.

    python benchmarks/behaviour_cloning.py          # the committed results

For each seed: the untrained agent (``BlackjackAgent``, embedded model) plays ``--log-episodes``
training episodes with its sampling policy and no updates, logged to a trajectory JSONL file
(``trajectory_log=``). A fresh agent is evaluated greedily on 500 fixed deals, behaviour-cloned on the
logged episodes that won (``keep="success"``), evaluated again, then trained with PPO for
``--ppo-episodes`` and evaluated a last time. Writes ``results/behaviour_cloning.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402,E501
    EVAL_SEED,
    REFERENCE_RETURNS,
    REFERENCE_STYLES,
    add_common_args,
    save_figure,
    save_result,
    set_threads,
)


def run(seed: int, args) -> dict:
    import gymnasium as gym

    from rllama.agents import BlackjackAgent
    from rllama.trajectories import behaviour_cloning, read_trajectories

    t0 = time.perf_counter()
    envs = gym.make_vec("Blackjack-v1", num_envs=16, vectorization_mode="sync", sab=True)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "episodes.jsonl"
        logger = BlackjackAgent(args.model, seed=seed, precision=args.precision, trajectory_log=log,
                                algorithm_config={"batch_episodes": 10**9})  # collect only, never update
        logger.train(envs, args.log_episodes, seed=seed, progress=False)
        episodes = read_trajectories(log)
        del logger
    # the model's scores in the policy, as when it was measured: cloning teaches the model, not the head
    agent = BlackjackAgent(args.model, seed=seed, precision=args.precision, score_normalization="mean")
    evals = {"untrained": agent.evaluate(envs, args.eval_episodes, seed=EVAL_SEED)["mean_return"]}
    stats = behaviour_cloning(agent, episodes, keep="success", epochs=args.epochs, learning_rate=args.lr, seed=seed)
    evals["behaviour cloning"] = agent.evaluate(envs, args.eval_episodes, seed=EVAL_SEED)["mean_return"]
    if args.ppo_episodes:
        agent.train(envs, args.ppo_episodes, seed=seed, progress=False)
        evals["behaviour cloning + PPO"] = agent.evaluate(envs, args.eval_episodes, seed=EVAL_SEED)["mean_return"]
    print(f"seed {seed}: {evals} (logged {len(episodes)} episodes, cloned {stats['episodes']}; "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return {"seed": seed, "evals": evals, "logged_episodes": len(episodes),
            "logged_mean_return": float(np.mean([e["return"] for e in episodes])), "bc": stats,
            "wall_s": time.perf_counter() - t0}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"][0]["evals"])
    values = np.array([[r["evals"][n] for n in names] for r in result["runs"]])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(range(len(names)), values.mean(0), yerr=values.std(0), capsize=4, color="tab:blue")
    for i in range(len(names)):
        ax.plot([i] * len(values), values[:, i], "k.")
    for name, value in REFERENCE_RETURNS.items():
        ax.axhline(value, ls="--", lw=1, color=REFERENCE_STYLES[name], label=f"{name} ({value:+.3f})")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"greedy mean return, {result['config']['eval_episodes']} deals")
    ax.set_title(f"Blackjack: behaviour cloning from logged winning episodes; seeds {result['config']['seeds']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--log-episodes", type=int, default=320)
    parser.add_argument("--eval-episodes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ppo-episodes", type=int, default=0)
    add_common_args(parser, "behaviour_cloning")
    args = parser.parse_args()
    set_threads(args)
    runs = [run(seed, args) for seed in args.seeds]
    summary = {name: float(np.mean([r["evals"][name] for r in runs])) for name in runs[0]["evals"]}
    result = save_result("behaviour_cloning", args, runs, plot, summary=summary)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
