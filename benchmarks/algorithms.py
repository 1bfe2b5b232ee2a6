"""Every algorithm on Blackjack-v1 with the embedded default model, at an equal budget of env steps.

    python benchmarks/algorithms.py                                  # the committed results
    python benchmarks/algorithms.py --algorithms ppo dqn --seeds 0   # a subset

Each (algorithm, seed) starts from the same untrained agent (``examples/blackjack.py``, scoring
"stick"/"hit"), trains with the algorithm's default config on 16 vector envs for ``--steps``
environment steps, and is evaluated greedily on the same deals (env seeds 10000+) every
``--eval-every`` steps. Writes ``results/<name>.json`` (a table and the curves) and ``.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REFERENCE_RETURNS, REFERENCE_STYLES, RESULTS, save_figure, train_with_evaluations, versions  # noqa: E402

ALGORITHMS = ["ppo", "a2c", "reinforce", "grpo", "dqn", "sac"]
COLORS = {"ppo": "tab:blue", "a2c": "tab:purple", "reinforce": "tab:brown", "grpo": "tab:cyan", "dqn": "tab:pink",
          "sac": "tab:gray"}


def run(algorithm: str, seed: int, args) -> dict:
    import gymnasium as gym

    from examples.blackjack import BlackjackAgent

    t0 = time.perf_counter()
    agent = BlackjackAgent(args.model, seed=seed, algorithm=algorithm)
    envs = gym.make_vec("Blackjack-v1", num_envs=args.envs, vectorization_mode="sync", sab=True)
    curve, updates = train_with_evaluations(agent, envs, budget=args.steps, unit="steps", eval_every=args.eval_every,
                                            eval_episodes=args.eval_episodes, seed=seed,
                                            label=f"{algorithm} seed {seed}")
    result = {"algorithm": algorithm, "seed": seed, "curve": curve, "updates": updates,
              "untrained": curve[0]["mean_return"], "trained": curve[-1]["mean_return"],
              "config": {k: v for k, v in vars(agent.algorithm.config).items()}, "wall_s": time.perf_counter() - t0}
    envs.close()
    del agent, envs
    gc.collect()  # one process runs many agents: free each model before the next
    return result


def summarise(runs: list[dict]) -> dict:
    table = {}
    for algorithm in dict.fromkeys(r["algorithm"] for r in runs):
        rs = [r for r in runs if r["algorithm"] == algorithm]
        before = np.array([r["untrained"] for r in rs])
        after = np.array([r["trained"] for r in rs])
        gain = after - before
        spread = float(np.ptp(after)) if len(after) > 1 else 0.0
        table[algorithm] = {
            "untrained_mean": float(before.mean()), "trained_mean": float(after.mean()),
            "trained_std": float(after.std(ddof=1)) if len(after) > 1 else 0.0,
            "trained_min": float(after.min()), "trained_max": float(after.max()),
            "gain_mean": float(gain.mean()), "gain_min": float(gain.min()),
            "beats_untrained_beyond_spread": bool(gain.mean() > spread and gain.min() > 0),
            "seeds": [r["seed"] for r in rs], "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
        }
    return table


MARKERS = {"ppo": "o", "a2c": "s", "reinforce": "^", "grpo": "D", "dqn": "v", "sac": "P"}
STYLES = {"ppo": "-", "a2c": "--", "reinforce": "-.", "grpo": ":", "dqn": "-", "sac": "--"}


def plot(result: dict, path: Path) -> None:
    """Left: learning curves (mean over seeds, min-max band). Right: return before and after training,
    per algorithm, with each seed as a dot (curves that coincide stay readable here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    table = result["table"]
    for algorithm, row in table.items():
        rs = [r for r in result["runs"] if r["algorithm"] == algorithm]
        n = min(len(r["curve"]) for r in rs)
        x = np.mean([[p["steps"] for p in r["curve"][:n]] for r in rs], axis=0)
        y = np.array([[p["mean_return"] for p in r["curve"][:n]] for r in rs])
        ax.plot(x, y.mean(0), color=COLORS.get(algorithm), lw=2, ls=STYLES.get(algorithm, "-"),
                marker=MARKERS.get(algorithm, "o"), ms=6, mfc="none",
                label=f"{algorithm}: {row['untrained_mean']:+.3f} → {row['trained_mean']:+.3f}")
        if len(rs) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=COLORS.get(algorithm), alpha=0.12)
    for name, value in REFERENCE_RETURNS.items():
        for axis in (ax, bx):
            axis.axhline(value, ls="--", lw=1, color=REFERENCE_STYLES[name], label=f"{name} ({value:+.3f})"
                         if axis is ax else None)
    names = list(table)
    for i, algorithm in enumerate(names):
        rs = [r for r in result["runs"] if r["algorithm"] == algorithm]
        bx.bar(i - 0.2, table[algorithm]["untrained_mean"], width=0.38, color="silver",
               label="untrained" if i == 0 else None)
        bx.bar(i + 0.2, table[algorithm]["trained_mean"], width=0.38, color=COLORS.get(algorithm))
        bx.plot([i + 0.2] * len(rs), [r["trained"] for r in rs], "k.", ms=8, label="each seed" if i == 0 else None)
    bx.set_xticks(range(len(names)), names)
    bx.set_ylabel("greedy mean return")
    bx.set_title("before (grey) and after training")
    bx.legend(fontsize=8, loc="lower right")
    bx.grid(alpha=0.3, axis="y")
    cfg = result["config"]
    seeds = sorted({r["seed"] for r in result["runs"]})
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"mean return, {cfg['eval_episodes']} greedy eval episodes")
    ax.set_title(f"Blackjack-v1 (sab), SmolLM2-135M + LoRA, seeds {seeds} (band: min-max)")
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def merge(args) -> None:
    """Combine result files of runs made in parallel (finished ``.json`` or ``.partial.json`` files)."""
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    runs = [r for part in parts for r in part["runs"]]
    full = [p for p in parts if "config" in p]
    if not full:
        raise SystemExit("--merge needs at least one finished result file (with its config)")
    result = dict(full[0])
    result["command"] = " && ".join(p.get("command", f"(partial: {f})") for p, f in zip(parts, args.merge))
    result["command"] += " && python " + " ".join(sys.argv)
    result["config"] = dict(full[0]["config"], algorithms=list(dict.fromkeys(r["algorithm"] for r in runs)),
                            seeds=sorted({r["seed"] for r in runs}))
    result["runs"] = runs
    result["table"] = summarise(runs)
    result["wall_s"] = sum(r["wall_s"] for r in runs)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{args.name}.png")
    print_table(result)


def print_table(result: dict) -> None:
    for algorithm, row in result["table"].items():
        print(f"{algorithm:10s} untrained {row['untrained_mean']:+.3f} -> trained {row['trained_mean']:+.3f} "
              f"(seed range {row['trained_min']:+.3f}..{row['trained_max']:+.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=600, help="environment steps of training per run")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default="algorithms")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine result files of runs made in parallel into --name, then stop")
    args = parser.parse_args()
    if args.merge:
        merge(args)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = []
    for algorithm in args.algorithms:
        for seed in args.seeds:
            runs.append(run(algorithm, seed, args))
            partial = {"runs": runs, "table": summarise(runs)}
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{args.name}.partial.json").write_text(json.dumps(partial, indent=1))
    result = {
        "benchmark": "algorithms",
        "command": "python " + " ".join(sys.argv),
        "config": vars(args),
        "versions": versions(),
        "reference_returns": REFERENCE_RETURNS,
        "table": summarise(runs),
        "wall_s": time.perf_counter() - t0,
        "runs": runs,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    plot(result, RESULTS / f"{args.name}.png")
    print_table(result)


if __name__ == "__main__":
    main()
