"""Torch threads on a small CPU: one or two, alone and beside a process that keeps one core busy.

    python benchmarks/threads.py                   # the committed results (~10 min on 2 cores)

The demo's workload (``examples/blackjack.py``: DQN at its defaults on the embedded model, 16
Blackjack envs) for ``--episodes`` training episodes and ``--eval-episodes`` greedy ones, once per
(threads, neighbour) pair, each in a fresh process. The neighbour is a Python loop spinning on one
core: what another job on the machine looks like to this one (a newcomer's demo ran 24 times slower
per episode beside other jobs than alone, issue 25). Measured: wall time of training and of
evaluation, and env steps per second of each. Writes ``results/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, chunk_seed, save_figure, save_result  # noqa: E402

SPIN = "while True: pass"


def part(args) -> dict:
    """One measurement, in this process (run by :func:`main` in a fresh one)."""
    import gymnasium as gym
    import torch

    from rllama.agents import BlackjackAgent

    torch.set_num_threads(args.threads)
    agent = BlackjackAgent(args.model, algorithm="dqn", seed=0, precision=args.precision)
    envs = gym.make_vec("Blackjack-v1", num_envs=16, vectorization_mode="sync", sab=True)
    start, chunk = time.perf_counter(), 0
    while agent.total_episodes < args.episodes:
        agent.train(envs, 16, seed=chunk_seed(0, chunk, envs), progress=False)
        chunk += 1
    train_s, steps = time.perf_counter() - start, agent.total_steps
    start = time.perf_counter()
    result = agent.evaluate(envs, args.eval_episodes, seed=10_000)
    eval_s = time.perf_counter() - start
    return {"threads": args.threads, "train_s": train_s, "train_steps": steps,
            "train_steps_per_s": steps / train_s, "eval_s": eval_s, "eval_episodes": args.eval_episodes,
            "eval_episodes_per_s": args.eval_episodes / eval_s, "eval_return": result["mean_return"]}


def measure(threads: int, busy: bool, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part", "--threads", str(threads), "--out", str(out),
               "--episodes", str(args.episodes), "--eval-episodes", str(args.eval_episodes),
               "--precision", args.precision] + (["--model", args.model] if args.model else [])
        spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
        try:
            subprocess.run(cmd, check=True)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        run = json.loads(out.read_text())
    run["neighbour"] = "one busy core" if busy else "none"
    print(f"threads {threads}, neighbour {run['neighbour']}: training {run['train_s']:.0f} s "
          f"({run['train_steps_per_s']:.1f} steps/s), evaluation {run['eval_s']:.0f} s", flush=True)
    return run


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "train_s", f"training, {result['config']['episodes']} episodes"),
                           (axes[1], "eval_s", f"greedy evaluation, {result['config']['eval_episodes']} episodes")):
        labels = [f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}\n{r['neighbour']}" for r in runs]
        colours = ["tab:blue" if r["threads"] == 1 else "tab:orange" for r in runs]
        ax.bar(range(len(runs)), [r[key] for r in runs], color=colours, alpha=0.8)
        ax.set_xticks(range(len(runs)), labels, fontsize=8)
        ax.set_ylabel("wall time, s")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"DQN on Blackjack-v1, SmolLM2-135M, {result['versions'].get('cpu', '')}", fontsize=10)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "threads")
    parser.add_argument("--episodes", type=int, default=640, help="training episodes a measurement")
    parser.add_argument("--eval-episodes", type=int, default=200, help="greedy episodes a measurement")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--part", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        Path(args.out).write_text(json.dumps(part(args)))
        return
    runs = [measure(n, busy, args) for busy in (False, True) for n in args.thread_counts]
    save_result("threads", args, runs, plot)


if __name__ == "__main__":
    main()
