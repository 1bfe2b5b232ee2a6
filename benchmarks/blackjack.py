"""Blackjack-v1 learning benchmark: PPO on the embedded default model, several seeds.

    python benchmarks/blackjack.py                       # the committed results
    python benchmarks/blackjack.py --seeds 0 --episodes 400 --name blackjack_quick

For every seed: evaluate the untrained agent, then train and evaluate every ``--eval-every``
episodes on the same evaluation deals (env seeds 10000+). Writes ``results/<name>.json`` (curves,
summary, seeds, versions, command) and ``results/<name>.png`` (learning curves against the exact
reference returns of the sab rules).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    EVAL_SEED,
    REFERENCE_RETURNS,
    REFERENCE_STYLES,
    RESULTS,
    hit_probabilities,
    save_figure,
    train_with_evaluations,
    versions,
)


def run_seed(seed: int, args) -> dict:
    import gymnasium as gym

    from examples.blackjack import BlackjackAgent

    t0 = time.perf_counter()
    layout = {}
    if args.lora_layers == "all":  # the layout before the prefix cache: every block adapted, nothing cached
        from rllama.policy import default_lora_config

        layout = {"lora_config": default_lora_config(layers="all"), "prefix_cache": False}
    agent = BlackjackAgent(args.model, seed=seed, precision=args.precision,
                           algorithm_config=json.loads(args.config) if args.config else None, **layout)
    envs = gym.make_vec("Blackjack-v1", num_envs=args.envs, vectorization_mode="sync", sab=True)
    sampled_before = agent.evaluate(envs, args.eval_episodes, seed=EVAL_SEED, greedy=False)["mean_return"]
    hit_before = hit_probabilities(agent)
    curve, updates = train_with_evaluations(agent, envs, budget=args.episodes, unit="episodes",
                                            eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                                            seed=seed, label=f"seed {seed}")
    sampled_after = agent.evaluate(envs, args.eval_episodes, seed=EVAL_SEED, greedy=False)["mean_return"]
    if args.save_dir:
        agent.save(Path(args.save_dir) / f"seed{seed}")
    return {
        "seed": seed,
        "curve": curve,
        "untrained_greedy": curve[0]["mean_return"],
        "trained_greedy": curve[-1]["mean_return"],
        "untrained_sampled": sampled_before,
        "trained_sampled": sampled_after,
        "hit_probability_untrained": hit_before,
        "hit_probability_trained": hit_probabilities(agent),
        "updates": updates,
        "wall_s": time.perf_counter() - t0,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    curves = []
    for run in result["runs"]:
        x = [p["episodes"] for p in run["curve"]]
        y = [p["mean_return"] for p in run["curve"]]
        curves.append(y)
        ax.plot(x, y, color="tab:blue", alpha=0.35, lw=1, marker="o", ms=3)
    mean = np.mean(curves, axis=0)
    ax.plot(x, mean, color="tab:blue", lw=2.5, label=f"rllama PPO, mean of {len(curves)} seeds")
    for name, value in REFERENCE_RETURNS.items():
        ax.axhline(value, ls="--", lw=1, color=REFERENCE_STYLES[name], label=f"{name} ({value:+.3f})")
    totals = list(range(4, 22))
    for key, color, label in (("hit_probability_untrained", "tab:gray", "untrained"),
                              ("hit_probability_trained", "tab:blue", "trained")):
        per_seed = np.array([np.mean(run[key], axis=1) for run in result["runs"]])  # [seeds, totals]
        ax2.plot(totals, per_seed.mean(0), color=color, lw=2, marker="o", ms=3, label=f"{label} (mean of seeds)")
    ax2.axvline(16.5, ls="--", color="tab:olive", lw=1, label="stick-at-17 threshold")
    ax2.set_xlabel("player total (first decision, no usable ace)")
    ax2.set_ylabel("P(hit), averaged over dealer cards")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    ax.set_xlabel("training episodes")
    ax.set_ylabel(f"mean return, {result['config']['eval_episodes']} greedy eval episodes")
    ax.set_title(f"Blackjack-v1 (sab), {result['config']['model'] or 'SmolLM2-135M-Instruct'} + LoRA, PPO")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=1600, help="training episodes per seed")
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--eval-episodes", type=int, default=500)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--config", default='{"policy_head": 0}',
                        help="PPO config overrides as JSON (default: the adapter alone, as measured here)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lora-layers", choices=["default", "all"], default="default",
                        help="'default': the library's (top 8 blocks, prefix cache); 'all': every block, no cache")
    parser.add_argument("--name", default="blackjack")
    parser.add_argument("--save-dir", default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = [run_seed(seed, args) for seed in args.seeds]
    untrained = np.array([r["untrained_greedy"] for r in runs])
    trained = np.array([r["trained_greedy"] for r in runs])
    gain = trained - untrained
    result = {
        "benchmark": "blackjack",
        "command": "python " + " ".join(sys.argv),
        "config": {k: v for k, v in vars(args).items()},
        "versions": versions(),
        "reference_returns": REFERENCE_RETURNS,
        "summary": {
            "untrained_greedy_mean": float(untrained.mean()),
            "trained_greedy_mean": float(trained.mean()),
            "trained_greedy_std_across_seeds": float(trained.std(ddof=1)) if len(trained) > 1 else 0.0,
            "gain_mean": float(gain.mean()),
            "gain_min": float(gain.min()),
            "untrained_sampled_mean": float(np.mean([r["untrained_sampled"] for r in runs])),
            "trained_sampled_mean": float(np.mean([r["trained_sampled"] for r in runs])),
            "wall_s": time.perf_counter() - t0,
        },
        "runs": runs,
    }
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{args.name}.png")
    s = result["summary"]
    print(f"untrained {s['untrained_greedy_mean']:+.3f} -> trained {s['trained_greedy_mean']:+.3f} "
          f"(std across seeds {s['trained_greedy_std_across_seeds']:.3f}); wrote {out / args.name}.json/.png")


if __name__ == "__main__":
    main()
