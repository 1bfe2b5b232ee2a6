"""Does episodic memory help? The rooms task with and without memory, same seeds, same budget.

    python benchmarks/memory_ablation.py            # the committed results

Task (``examples/memory_rooms.py``): 8 rooms (``--rooms``), each with one exit among four doors, drawn from the
seed and not guessable from the text; one choice per episode, reward 1 at the exit. For each seed
each condition starts from the same untrained model (SmolLM2-135M-Instruct + LoRA, fp32) and sees
the same number of episodes on 16 vector envs:

- ``no memory``: PPO for ``--episodes`` episodes;
- ``memory``: the same with episodic memory (successful episodes, same room recalled, k=1);
- ``memory, no updates``: the same episodes played with the sampling policy, written to memory,
  and no gradient step: what memory alone gives (not run by default; ``--conditions``).

Each is evaluated greedily once in every room (success = fraction of the rooms whose exit it
opens), before and after. PPO runs with learning rate 1e-4 and 4 epochs in both conditions
(a bandit-like task: one step per episode). Writes ``results/memory_ablation.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_runs, save_figure, save_partial, save_result, set_threads  # noqa: E402

CONDITIONS = ["no memory", "memory", "memory, no updates"]
COLORS = {"no memory": "tab:gray", "memory": "tab:blue", "memory, no updates": "tab:green"}


def run(condition: str, seed: int, args) -> dict:
    import gymnasium as gym

    from examples.memory_rooms import RoomsAgent, RoomsEnv, make_memory, success_per_room

    t0 = time.perf_counter()
    memory = None if condition == "no memory" else make_memory()
    config = {"policy_head": 0, "learning_rate": args.lr, "epochs": args.epochs}  # the adapter learns
    agent = RoomsAgent(args.model, seed=seed, memory=memory, precision=args.precision, algorithm_config=config)
    env = RoomsEnv(n_rooms=args.rooms, world_seed=seed)
    before = success_per_room(agent, env)
    envs = gym.vector.SyncVectorEnv([lambda: RoomsEnv(n_rooms=args.rooms, world_seed=seed) for _ in range(args.envs)])
    curve = [{"episodes": 0, "success": float(np.mean(before))}]
    done = 0
    while done < args.episodes:
        chunk = min(args.eval_every, args.episodes - done)
        if condition == "memory, no updates":
            agent.evaluate(envs, chunk, greedy=False, write_memory=True, seed=seed * 1000 + done)
        else:
            agent.train(envs, chunk, seed=seed * 1000 + done, progress=False)
        done += chunk
        curve.append({"episodes": done, "success": float(np.mean(success_per_room(agent, env)))})
        print(f"{condition:20s} seed {seed} episodes {done:4d}: success {curve[-1]['success']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"condition": condition, "seed": seed, "before": curve[0]["success"], "after": curve[-1]["success"],
            "curve": curve, "memory_entries": 0 if memory is None else len(agent.episodic_memory),
            "wall_s": time.perf_counter() - t0}


def summarise(runs: list[dict]) -> dict:
    table = {}
    for condition in dict.fromkeys(r["condition"] for r in runs):
        rs = [r for r in runs if r["condition"] == condition]
        after = np.array([r["after"] for r in rs])
        table[condition] = {
            "before_mean": float(np.mean([r["before"] for r in rs])), "after_mean": float(after.mean()),
            "after_std": float(after.std(ddof=1)) if len(after) > 1 else 0.0,
            "after_per_seed": after.tolist(), "seeds": [r["seed"] for r in rs],
        }
    return table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for condition, row in result["table"].items():
        rs = [r for r in result["runs"] if r["condition"] == condition]
        x = [p["episodes"] for p in rs[0]["curve"]]
        y = np.array([[p["success"] for p in r["curve"]] for r in rs])
        ax.plot(x, y.mean(0), marker="o", color=COLORS[condition], lw=2,
                label=f"{condition}: {row['before_mean']:.2f} → {row['after_mean']:.2f} ± {row['after_std']:.2f}")
        if len(rs) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=COLORS[condition], alpha=0.15)
    ax.axhline(0.25, ls="--", color="tab:red", lw=1, label="random door (0.25)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training episodes")
    ax.set_ylabel(f"greedy success, fraction of the {result['config']['rooms']} rooms")
    ax.set_title(f"Rooms task ({result['config']['rooms']} rooms), SmolLM2-135M + LoRA, PPO; "
                 f"seeds {result['config']['seeds']} (band: min-max)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=["no memory", "memory"], choices=CONDITIONS)
    parser.add_argument("--episodes", type=int, default=384)
    parser.add_argument("--eval-every", type=int, default=96)
    parser.add_argument("--rooms", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate (both conditions)")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per batch (both conditions)")
    parser.add_argument("--envs", type=int, default=16)
    add_common_args(parser, "memory_ablation")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine result files (finished or .partial.json) of runs made apart into --name")
    args = parser.parse_args()
    if args.merge:
        runs = load_runs(args.merge)
        args.seeds = sorted({r["seed"] for r in runs})
        save_result("memory_ablation", args, runs, plot, table=summarise(runs), wall_s=sum(r["wall_s"] for r in runs))
        return
    set_threads(args)
    t0 = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for condition in args.conditions:
            runs.append(run(condition, seed, args))
            save_partial(args.name, runs)
    result = save_result("memory_ablation", args, runs, plot, table=summarise(runs), wall_s=time.perf_counter() - t0)
    for condition, row in result["table"].items():
        print(f"{condition:20s} {row['before_mean']:.3f} -> {row['after_mean']:.3f} ± {row['after_std']:.3f}")


if __name__ == "__main__":
    main()
