"""Synchronous vs asynchronous (Ray rollout workers) PPO on Blackjack-v1, at an equal budget of env steps.

    python benchmarks/async_blackjack.py                          # sync, async staleness 1 and 2; seed 0
    python benchmarks/async_blackjack.py --conditions async1 --seeds 1 --name async_part
    python benchmarks/async_blackjack.py --model tiny --env-latency 0.5 --name async_latency   # acting dominates

For each seed and condition the agent (``examples/blackjack.py``'s ``BlackjackAgent``, embedded model,
default PPO) is evaluated greedily on the same deals (env seeds 10000+), trained until ``--steps`` env
steps have been played (dropped stale episodes count), and evaluated again:

- ``sync``: one process, ``agent.train`` on ``2 * --envs`` vector envs, with ``--sync-threads`` torch
  threads (default: every core, so the single process may use the whole machine as the async setup does);
- ``asyncN``: :class:`rllama.async_rl.AsyncTrainer`, 2 Ray workers with ``--envs`` envs each,
  ``max_staleness=N``, the learner in this process; ``--threads`` torch threads in each process.

``--model tiny`` uses a 2-layer random Llama (cheap to act and train); ``--env-latency S`` makes every
step of the training envs wait S seconds (a remote env: waiting, not computing), the case where acting
dominates and the workers' waiting can overlap with learning. Wall time is the training time only
(evaluations excluded). Writes ``results/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402
    EVAL_SEED,
    REFERENCE_RETURNS,
    REFERENCE_STYLES,
    add_common_args,
    chunk_seed,
    load_runs,
    save_figure,
    save_partial,
    save_result,
    set_threads,
    tiny_model,
)


def make_agent(seed, model=None, precision="auto", threads=1):
    import torch

    from examples.blackjack import BlackjackAgent

    if threads:
        torch.set_num_threads(threads)
    tokenizer = None
    if model == "tiny":
        model, tokenizer = tiny_model()
    # The adapter trains, as when the committed figures were measured (a policy head is PPO's default
    # for a scoring agent since issue 21).
    return BlackjackAgent(model, tokenizer, seed=seed, precision=precision, algorithm="ppo",
                          algorithm_config={"policy_head": 0})


def make_env(num_envs, latency=0.0):
    envs = gym.make_vec("Blackjack-v1", num_envs=num_envs, vectorization_mode="sync", sab=True)
    return LatencyVectorEnv(envs, latency) if latency > 0 else envs


class LatencyVectorEnv(gym.vector.VectorWrapper):
    """Waits ``latency`` seconds in every ``step`` of the vector env, without computing: an env whose step
    is a round trip (a remote simulator, a web API, a game server), its envs stepped concurrently as
    ``AsyncVectorEnv`` would. The wait does not grow with the number of envs, so the sync run (16 envs)
    and the async workers (8 each) get the same env steps per second of waiting."""

    def __init__(self, env, latency: float):
        super().__init__(env)
        self.latency = float(latency)

    def step(self, actions):
        time.sleep(self.latency)
        return self.env.step(actions)


def evaluate(agent, args) -> float:
    envs = make_env(16)
    try:
        return float(agent.evaluate(envs, args.eval_episodes, seed=EVAL_SEED)["mean_return"])
    finally:
        envs.close()


def run(condition: str, seed: int, args) -> dict:
    agent_factory = functools.partial(make_agent, model=args.model, precision=args.precision, threads=args.threads)
    curve = []  # (env steps, training return of the update's episodes)
    if condition == "sync":
        agent = agent_factory(seed, threads=args.sync_threads or os.cpu_count())
        before = evaluate(agent, args)
        envs = make_env(2 * args.envs, args.env_latency)
        t0 = time.perf_counter()
        chunk = 0
        while agent.total_steps < args.steps:
            for stats in agent.train(envs, 16, seed=chunk_seed(seed, chunk, envs), progress=False):
                curve.append((agent.total_steps, stats["rollout/mean_return"]))
            chunk += 1
        wall = time.perf_counter() - t0
        envs.close()
        extra = {"env_steps": agent.total_steps, "dropped": 0, "updates": agent.algorithm.num_updates}
    else:
        from rllama.async_rl import AsyncTrainer

        staleness = int(condition.removeprefix("async"))
        trainer = AsyncTrainer(agent_factory, functools.partial(make_env, args.envs, args.env_latency), num_workers=2,
                               episodes_per_task=args.episodes_per_task, max_staleness=staleness, seed=seed,
                               worker_threads=args.threads or 1, ray_init_kwargs={"num_cpus": 2})
        agent = trainer.agent
        before = evaluate(agent, args)
        trainer.start()  # Ray and the workers' models: start-up is not training time

        def on_update(stats):
            curve.append((int(stats["async/env_steps"]), stats["rollout/mean_return"]))
            return trainer.stats.env_steps < args.steps

        t0 = time.perf_counter()
        history = trainer.train(10**9, progress=False, on_update=on_update)
        wall = time.perf_counter() - t0
        trainer.close()
        stale = [h.get("rollout/mean_staleness", 0.0) for h in history]
        extra = {"env_steps": trainer.stats.env_steps, "dropped": trainer.stats.dropped,
                 "updates": agent.algorithm.num_updates, "mean_staleness": float(np.mean(stale)) if stale else 0.0,
                 "importance_weight": float(np.mean([h.get("policy/importance_weight", 1.0) for h in history]))}
    after = evaluate(agent, args)
    print(f"{condition} seed {seed}: {before:+.3f} -> {after:+.3f}, {extra['env_steps']} env steps in {wall:.0f} s "
          f"({extra})", flush=True)
    return {"condition": condition, "seed": seed, "before": before, "after": after, "train_wall_s": wall,
            "env_steps_per_s": extra["env_steps"] / wall, "curve": curve, **extra}


def summarise(runs: list[dict]) -> dict:
    table = {}
    for condition in dict.fromkeys(r["condition"] for r in runs):
        rs = [r for r in runs if r["condition"] == condition]
        table[condition] = {key: float(np.mean([r[key] for r in rs])) for key in
                            ("before", "after", "train_wall_s", "env_steps", "env_steps_per_s", "dropped")}
        table[condition]["seeds"] = [r["seed"] for r in rs]
    if "sync" in table:
        for row in table.values():
            row["wall_vs_sync"] = row["train_wall_s"] / table["sync"]["train_wall_s"]
    return table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, runs = result["table"], result["runs"]
    names = list(table)
    colors = {"sync": "tab:blue", "async1": "tab:orange", "async2": "tab:red", "async0": "tab:purple"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for i, name in enumerate(names):
        ax.bar(i - 0.2, table[name]["before"], 0.4, color="silver")
        ax.bar(i + 0.2, table[name]["after"], 0.4, color=colors.get(name, "tab:gray"))
    for ref, value in REFERENCE_RETURNS.items():
        ax.axhline(value, ls="--", lw=1, color=REFERENCE_STYLES[ref], label=f"{ref} ({value:+.3f})")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"greedy return, {result['config']['eval_episodes']} deals (grey: before)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    window = 8
    for r in runs:
        if len(r["curve"]) < window:
            continue
        steps, rets = map(np.asarray, zip(*r["curve"]))
        smooth = np.convolve(rets, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.2, color=colors.get(r["condition"], "tab:gray"),
                label=f"{r['condition']} seed {r['seed']}")
    ax.set_xlabel("env steps played")
    ax.set_ylabel(f"training return (sampling), mean of {window} updates")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.bar(range(len(names)), [table[n]["train_wall_s"] / 60 for n in names],
           color=[colors.get(n, "tab:gray") for n in names])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("training wall time (min)")
    ax.grid(alpha=0.3, axis="y")
    config = result["config"]
    latency = f", env latency {config['env_latency']:g} s a step" if config.get("env_latency") else ""
    fig.suptitle(f"Blackjack PPO, sync vs async (2 Ray workers), {config['steps']} env steps, "
                 f"model {config.get('model') or 'embedded'}{latency}; seeds {sorted({r['seed'] for r in runs})}",
                 fontsize=10)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conditions", nargs="+", default=["sync", "async1", "async2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600, help="env steps of training")
    parser.add_argument("--envs", type=int, default=8, help="envs per worker (sync: twice as many)")
    parser.add_argument("--episodes-per-task", type=int, default=8)
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--sync-threads", type=int, default=0, help="torch threads of the sync run (0: every core)")
    parser.add_argument("--env-latency", type=float, default=0.0,
                        help="seconds every vector-env step waits (a remote env; training only, not evaluation)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON")
    add_common_args(parser, "async", precision="auto")
    args = parser.parse_args()
    bad = [c for c in args.conditions if c != "sync" and not (c.startswith("async") and c[5:].isdigit())]
    if bad:
        raise SystemExit(f"unknown conditions {bad}: use sync or asyncN (N = max staleness)")
    if args.merge:
        runs = load_runs(args.merge)
    else:
        set_threads(args)
        runs = []
        for seed in args.seeds:
            for condition in args.conditions:
                runs.append(run(condition, seed, args))
                save_partial(args.name, runs)
    result = save_result("async_blackjack", args, runs, plot, table=summarise(runs))
    for name, row in result["table"].items():
        print(f"{name:8s} {row['before']:+.3f} -> {row['after']:+.3f}  wall {row['train_wall_s']:.0f} s "
              f"({row.get('wall_vs_sync', float('nan')):.2f}x sync)  dropped {row['dropped']:.0f}")


if __name__ == "__main__":
    main()
