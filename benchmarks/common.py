"""Pieces the benchmarks share: reference returns, version records, training with evaluation points."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Exact returns for Blackjack-v1 with sab=True (rllama.agents.blackjack.policy_value; a 400k-episode
# Monte Carlo run gives -0.184 and -0.075 for the middle two, standard error 0.0015).
REFERENCE_RETURNS = {
    "optimal": -0.043,
    "stick at 17+": -0.076,
    "always stick": -0.183,
    "uniform random": -0.394,
}
REFERENCE_STYLES = {"optimal": "tab:green", "stick at 17+": "tab:olive", "always stick": "tab:orange",
                    "uniform random": "tab:red"}
EVAL_SEED = 10_000
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    """The CPU's model name (results from different CPUs are compared only as ratios within one run)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def versions() -> dict:
    import gymnasium
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gymnasium": gymnasium.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def hit_probabilities(agent) -> list[list[float]]:
    """The policy's P(hit) at the first step, for player totals 4-21 x dealer cards 1-10 (no usable ace)."""
    import torch

    system = {"role": "system", "content": agent.get_system_prompt()}
    candidates = [agent.chat.reply_ids(c) for c in agent.get_valid_actions((12, 2, 0))]
    table = []
    for total in range(4, 22):
        prompts = [agent.chat.prompt_ids([system, {"role": "user", "content": agent.format_observation((total, d, 0))}])
                   for d in range(1, 11)]
        with torch.no_grad():
            logprobs, _ = agent.policy.score_candidates(prompts, [candidates] * len(prompts))
        table.append([float(lp.exp()[1]) for lp in logprobs])
    return table


def chunk_seed(seed: int, chunk: int, envs) -> int:
    """The reset seed of training slice ``chunk``: a vector env seeds its sub-env ``i`` with
    ``seed + i``, so slices ``num_envs`` apart never deal the same hand twice. (Until issue 21's
    fix the slices were seeded ``base + chunk``: slice ``c``'s sub-env ``i`` met slice ``c + 1``'s
    sub-env ``i - 1``, and 16 envs replayed each deal up to 16 times, about N/16 distinct deals in N
    episodes.)"""
    return seed * 1_000_003 + chunk * getattr(envs, "num_envs", 1)


def train_with_evaluations(agent, envs, *, budget: int, unit: str, eval_every: int, eval_episodes: int,
                           seed: int, label: str = "") -> tuple[list[dict], list[dict]]:
    """Train until ``budget`` episodes or env steps (``unit``), evaluating greedily every ``eval_every``.

    Returns ``(curve, updates)``: evaluation points ``{episodes, steps, mean_return, stderr, elapsed_s}``
    and every update's statistics.
    """
    if unit not in ("episodes", "steps"):
        raise ValueError(f"unit={unit!r}; expected 'episodes' or 'steps'")
    t0 = time.perf_counter()
    curve, updates = [], []

    def evaluate() -> None:
        r = agent.evaluate(envs, eval_episodes, seed=EVAL_SEED)
        curve.append({"episodes": agent.total_episodes, "steps": agent.total_steps, "mean_return": r["mean_return"],
                      "stderr": r["stderr"], "elapsed_s": time.perf_counter() - t0})
        print(f"{label} episodes {agent.total_episodes:5d} steps {agent.total_steps:5d}: eval return "
              f"{r['mean_return']:+.3f} ± {r['stderr']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def progress() -> int:
        return agent.total_episodes if unit == "episodes" else agent.total_steps

    evaluate()
    next_eval = eval_every
    chunk = 0
    while progress() < budget:
        # Train in slices of 16 episodes so the step budget is met closely.
        n = min(16, budget - progress()) if unit == "episodes" else 16
        for stats in agent.train(envs, n, seed=chunk_seed(seed, chunk, envs), progress=False):
            updates.append({k: float(v) for k, v in stats.items()})
        chunk += 1
        if progress() >= next_eval or progress() >= budget:
            evaluate()
            next_eval += eval_every
    return curve, updates


def tiny_model():
    """(model, tokenizer): a 2-layer, 64-unit Llama with random weights (seed 0, so every process that
    builds it gets the same one) and the embedded model's tokenizer. Acting and training cost little."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rllama.policy import load_model

    lm, tokenizer = load_model(None)
    vocab = lm.config.vocab_size
    del lm
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config), tokenizer


def add_common_args(parser, name: str, precision: str = "fp32") -> None:
    """The flags every benchmark has: --model, --precision, --threads, --name."""
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2)")
    parser.add_argument("--precision", default=precision)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--name", default=name, help="results/<name>.json and .png")


def set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def save_partial(name: str, runs: list) -> None:
    """The finished runs so far, in ``results/<name>.partial.json`` (a long benchmark may be stopped)."""
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.partial.json").write_text(json.dumps({"runs": runs}, indent=1))


def load_runs(files: list[str]) -> list:
    """The runs of several result files (finished or ``.partial.json``) made apart, in order."""
    import json

    return [r for f in files for r in json.loads(Path(f).read_text())["runs"]]


def save_result(benchmark: str, args, runs: list, plot, **fields) -> dict:
    """Write ``results/<args.name>.json`` (command, config, versions, ``fields``, runs) and its PNG."""
    import json

    result = {"benchmark": benchmark, "command": "python " + " ".join(sys.argv), "config": vars(args),
              "versions": versions(), **fields, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    plot(result, RESULTS / f"{args.name}.png")
    return result


def save_figure(fig, path) -> None:
    """Lay out, write at 120 dpi and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_policy_map(axes, policy: dict, title: str) -> None:
    """Two panels (no usable ace, usable ace) of a Blackjack policy, as Sutton & Barto's Figure 5.2:
    hit dark, stick light, and a cross where the action differs from the optimal one."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    from rllama.agents.blackjack import DEALER_CARDS, HARD_TOTALS, SOFT_TOTALS, optimal_policy

    best = optimal_policy()
    for ax, usable, totals in ((axes[0], False, HARD_TOTALS), (axes[1], True, SOFT_TOTALS)):
        grid = np.array([[policy[(t, d, usable)] for d in DEALER_CARDS] for t in totals])
        ax.imshow(grid, origin="lower", cmap=ListedColormap(["#f3e3b3", "#2b5d8a"]), vmin=0, vmax=1, aspect="auto")
        for i, t in enumerate(totals):
            for j, d in enumerate(DEALER_CARDS):
                if policy[(t, d, usable)] != best[(t, d, usable)]:
                    ax.plot(j, i, marker="x", color="tab:red", markersize=5, mew=1.5)
        ax.set_xticks(range(10), ["A"] + [str(d) for d in range(2, 11)], fontsize=7)
        ax.set_yticks(range(len(totals)), [str(t) for t in totals], fontsize=6)
        ax.set_title(f"{title}\n{'usable ace' if usable else 'no usable ace'}", fontsize=8)
        ax.set_xlabel("dealer shows", fontsize=7)
    axes[0].set_ylabel("player total", fontsize=7)
