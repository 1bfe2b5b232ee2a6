"""The learner's memory against ``max_pass_tokens``: one PPO update of a generating agent, split into passes.

    python benchmarks/pass_tokens.py --threads 1        # ~10 min: five settings, one process each

The RLlama README's Blackjack agent (free text, 32-token replies) on the embedded model, PPO at its
defaults for a generating agent (learning rate 1e-3, 64-episode batches of 64-step minibatches, two
epochs): 64 episodes on 16 envs acted on llama.cpp, then one update. Each setting of
``max_pass_tokens`` runs in its own process (peak RSS is per process), from the same seed, so every
process acts the same replies and its update should take the same steps: the update's loss and
gradient norms are recorded beside its time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, cpu_name, save_figure, save_result, set_threads  # noqa: E402

SETTINGS = [None, 16384, 8192, 4096, 2048]


def label(limit) -> str:
    return "one pass" if limit is None else f"{limit}"


def run_one(args) -> dict:
    """The child: act 64 episodes, take one update, report."""
    import gymnasium as gym
    from generation import readme_agent_class

    set_threads(args)
    limit = json.loads(args.limit)
    agent = readme_agent_class()(args.model, seed=args.seed, precision=args.precision, max_new_tokens=32,
                                 algorithm_config={"max_pass_tokens": limit})
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("Blackjack-v1", sab=True) for _ in range(16)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    stats = agent.train(envs, args.episodes, seed=args.seed, progress=False)
    envs.close()
    last = stats[-1]
    return {"max_pass_tokens": limit, "seed": args.seed, "episodes": args.episodes, "env_steps": agent.total_steps,
            "updates": len(stats), "wall_s": time.perf_counter() - start, "update_s": last["time/update_s"],
            "update_tokens": last["time/update_tokens_per_s"] * last["time/update_s"],
            "loss_total": last["loss/total"], "grad_norm": last["train/grad_norm"], "kl_ref": last.get("policy/kl_ref"),
            "mean_return": last["rollout/mean_return"], "peak_rss_before_training_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "config": {k: v for k, v in vars(agent.algorithm.config).items() if isinstance(v, (int, float, str))}}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [label(r["max_pass_tokens"]) for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(names, [r["peak_rss_mb"] / 1024 for r in runs], color="tab:blue")
    axes[0].bar(names, [r["peak_rss_before_training_mb"] / 1024 for r in runs], color="tab:gray",
                label="before training (model, llama.cpp)")
    axes[0].set_ylabel("peak RSS (GB)")
    axes[0].legend(loc="lower left", fontsize=8)
    axes[1].bar(names, [r["update_s"] for r in runs], color="tab:orange")
    axes[1].set_ylabel("update time (s)")
    axes[2].bar(names, [r["loss_total"] for r in runs], color="tab:green")
    axes[2].set_ylabel("the update's mean loss (should not move)")
    for ax in axes:
        ax.set_xlabel("max_pass_tokens")
    fig.suptitle(f"one PPO update of a generating agent, 64-step minibatches ({result['cpu']})", fontsize=10)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "pass_tokens", precision="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=64, help="one update at PPO's 64-episode batches")
    parser.add_argument("--limit", default=None, help=argparse.SUPPRESS)  # a child's setting (JSON)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.limit is not None:
        Path(args.out).write_text(json.dumps(run_one(args)))
        return
    runs = []
    for limit in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            cmd = [sys.executable, __file__, "--limit", json.dumps(limit), "--out", str(out), "--seed", str(args.seed),
                   "--episodes", str(args.episodes), "--threads", str(args.threads), "--precision", args.precision]
            if args.model:
                cmd += ["--model", args.model]
            subprocess.run(cmd, check=True)
            runs.append(json.loads(out.read_text()))
        print(json.dumps({k: runs[-1][k] for k in ("max_pass_tokens", "update_s", "peak_rss_mb", "loss_total",
                                                    "grad_norm")}), flush=True)
    save_result("pass_tokens", args, runs, plot, cpu=cpu_name())


if __name__ == "__main__":
    main()
