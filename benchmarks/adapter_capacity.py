"""Can the LoRA adapter alone represent Blackjack's optimal policy? Supervised, not RL (issue 41).

    python benchmarks/adapter_capacity.py --threads 1          # the committed results

The scoring-mode policy with no policy head (``policy_head=0``) is the model's own preference
between "stick" and "hit": ``f(s) = log pi(hit|s) - log pi(stick|s)``. Here the adapter is trained
by cross-entropy on the *optimal* action of each of the 280 decision states (16 states a step,
AdamW, gradients clipped to 0.5 as PPO clips them) — the easiest signal RL could ever give it — and
every ``--every`` steps the greedy map's agreement with the optimal policy and its exact value are read.

Variants: ``plain`` at the given learning rates, and ``centered`` — the per-state coefficient of the
gradient, ``y - sigmoid(f)``, has its minibatch mean removed, so the update cannot push every state's
``f`` the same way (the component that a prompt-wide shift of the adapter produces) and only moves the
part that differs between states. The mean and spread of ``f`` over the 280 states show which of the
two moved. Writes ``results/<name>.json`` and ``results/<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_figure, versions  # noqa: E402


def run(variant: str, lr: float, args) -> dict:
    import torch

    from rllama.agents import BlackjackAgent
    from rllama.agents.blackjack import STATES, agreement, optimal_policy, policy_value

    agent = BlackjackAgent(args.model, seed=args.seed, algorithm="ppo", algorithm_config={"policy_head": 0},
                           precision="fp32")
    prompts, candidates = agent.state_prompts()
    best = optimal_policy()
    target = torch.tensor([float(best[s]) for s in STATES])
    params = agent.policy.adapter_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)

    def preference(idx: list[int]) -> torch.Tensor:
        out = agent.policy.candidate_outputs([prompts[i] for i in idx], [candidates[i] for i in idx])
        return torch.stack([lp[1] - lp[0] for lp in out.logprobs])

    def point(step: int, t: float) -> dict:
        with torch.no_grad():
            f = torch.cat([preference(list(range(i, min(i + 40, len(STATES))))) for i in range(0, len(STATES), 40)])
        policy = {s: int(f[i] > 0) for i, s in enumerate(STATES)}
        return {"step": step, "train_s": t, "agreement": agreement(policy), "map_value": policy_value(policy),
                "f_mean": float(f.mean()), "f_std": float(f.std())}

    curve, train_s = [point(0, 0.0)], 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        idx = torch.randperm(len(STATES), generator=generator)[: args.batch].tolist()
        f = preference(idx)
        coef = (target[idx] - torch.sigmoid(f)).detach()  # d log-likelihood / d f
        if variant == "centered":
            coef = coef - coef.mean()
        loss = -(coef * f).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        train_s += time.perf_counter() - start
        if step % args.every == 0:
            curve.append(point(step, train_s))
            p = curve[-1]
            print(f"{variant} lr {lr:g} step {step}: agreement {p['agreement']:.0%}, map {p['map_value']:+.3f}, "
                  f"f mean {p['f_mean']:+.2f} sd {p['f_std']:.2f}", flush=True)
    return {"variant": variant, "learning_rate": lr, "curve": curve}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["runs"]:
        name = f"{r['variant']}, lr {r['learning_rate']:g}"
        steps = [p["step"] for p in r["curve"]]
        line, = ax1.plot(steps, [100 * p["agreement"] for p in r["curve"]], marker="o", label=name)
        ax2.plot(steps, [p["f_mean"] for p in r["curve"]], color=line.get_color(), label=f"{name}: mean")
        ax2.plot(steps, [p["f_std"] for p in r["curve"]], color=line.get_color(), linestyle="--",
                 label=f"{name}: spread")
    ax1.axhline(80, color="gray", linestyle=":", label="issue 41 target 80 %")
    ax1.set(xlabel=f"supervised steps ({result['batch']} states each)", ylabel="states where greedy = optimal (%)",
            title="Adapter alone, cross-entropy on the optimal action")
    ax2.set(xlabel="steps", ylabel="log pi(hit) - log pi(stick)", title="preference over the 280 states")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["plain:5e-5", "plain:1e-3", "centered:5e-5"],
                        help="variant:learning_rate pairs (variant: plain or centered)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default="adapter_capacity")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = []
    for spec in args.runs:
        variant, lr = spec.split(":")
        if variant not in ("plain", "centered"):
            parser.error(f"--runs: variant {variant!r} must be 'plain' or 'centered'")
        runs.append(run(variant, float(lr), args))
    result = {"benchmark": "adapter_capacity", "command": " ".join(["python"] + sys.argv), "seed": args.seed,
              "batch": args.batch, "runs": runs, "versions": versions(), "wall_s": time.perf_counter() - t0}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.json and .png")


if __name__ == "__main__":
    main()
