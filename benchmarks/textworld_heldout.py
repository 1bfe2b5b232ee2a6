"""TextWorld: train on generated games, evaluate on held-out games of the same family.

    python benchmarks/textworld_heldout.py                  # results/textworld.json: 32 episodes, no learning

The settings that learn (``results/textworld_v4.json``: 3.5x the untrained agent's held-out success;
≈ 2.9 h on one core per seed, over two sittings with ``--checkpoint``; benchmarks/README.md has the
commands): ``--episodes 400 --envs 4 --epochs 1 --lr 5e-4 --intermediate-reward 1 --ent-coef 0.05``.

Family: ``examples/textworld.py``'s ``FAMILY`` (3 rooms, 4 objects, quests of 2 commands); training
games seeds 0-31, held-out games seeds 1000-1015; at most ``--max-steps`` commands an episode. For
each seed, on the held-out games:

- ``untrained``: the agent (``TextWorldAgent``, scoring the admissible commands) before training;
- ``trained``: the same after ``--episodes`` PPO episodes on the training games (``--envs`` vector envs;
  minibatches of ``--minibatch-size`` steps: a step's prompt is a few hundred tokens, and the
  activations of 16 of them, LoRA on every linear layer, outgrew 24 GB);
- ``random``: a uniformly random admissible command each step;
- ``walkthrough``: TextWorld's winning commands (the upper bound).

Training runs in chunks of one batch (``--envs`` episodes, one PPO update each). With
``--checkpoint DIR`` the full training state (adapter, heads, optimizer, RNGs, the updates so far)
is saved to ``DIR/seed<N>`` after every update, and a later run with the same ``DIR`` resumes there:
a budget too long for one sitting (``--train-minutes`` ends a sitting) is spread over several.
``--untrained-from`` takes the untrained evaluation from an earlier result file of the same agent
(checked: same model, precision, LoRA layers, episode length and evaluation episodes) rather than
spending half an hour repeating it.

The agents are evaluated greedily (one episode per game) and sampling (``--sampled-episodes`` per
game), ``--eval-batch`` episodes side by side in one batched forward. Success = fraction of games
won; score = mean of score / max score. Writes ``results/textworld.json`` and ``.png``.

(Not named ``textworld.py``: the script's folder comes first on ``sys.path`` and would shadow the
``textworld`` package.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_runs, save_figure, save_partial, save_result, set_threads  # noqa: E402


def play(env, choose, episodes_per_game: int = 1) -> dict:
    """Play every game of ``env``; ``choose(obs, info, rng)`` gives the command."""
    won, scores = [], []
    rng = np.random.default_rng(0)
    for game in range(len(env.unwrapped.games)):
        for k in range(episodes_per_game):
            obs, info = env.reset(seed=game * 100 + k, options={"game": game})
            start, total, done, t = info, 0.0, False, 0
            while not done:
                obs, reward, terminated, truncated, info = env.step(choose(obs, start, t, rng))
                total += reward
                t += 1
                done = terminated or truncated
            won.append(float(info["won"]))
            scores.append(total / max(1, info["max_score"]))
    return {"success": float(np.mean(won)), "score": float(np.mean(scores)), "n": len(won)}


def evaluate_agent(agent, env, args) -> dict:
    from examples.textworld import play_each_game

    return {mode: {k: v for k, v in play_each_game(agent, env, greedy, n, batch=args.eval_batch).items() if k != "won"}
            for mode, greedy, n in [("greedy", True, 1), ("sampled", False, args.sampled_episodes)]}


# What a resumed run must share with the run that saved its checkpoint.
TRAINING_CONFIG = ("model", "precision", "lora_top_layers", "max_steps", "envs", "epochs", "lr", "minibatch_size",
                   "intermediate_reward", "ent_coef")
# What an untrained evaluation depends on.
UNTRAINED_CONFIG = ("model", "precision", "lora_top_layers", "max_steps", "sampled_episodes", "eval_batch")


def untrained_from(path: str, seed: int, args) -> dict:
    """The ``untrained`` evaluation of ``seed`` in an earlier result file, if that run's untrained agent
    and evaluation were the same as this one's (model, precision, LoRA layers, episode length, episodes)."""
    old = json.loads(Path(path).read_text())
    diff = [k for k in UNTRAINED_CONFIG if old["config"].get(k) != getattr(args, k)]
    if diff:
        raise SystemExit(f"--untrained-from {path}: its {', '.join(diff)} differ from this run's; "
                         "its untrained evaluation is not this agent's")
    runs = [r for r in old["runs"] if r["seed"] == seed]
    if not runs:
        raise SystemExit(f"--untrained-from {path}: no run of seed {seed} in it")
    return runs[0]["untrained"]


def make_agent(seed: int, args):
    """The benchmark's untrained ``TextWorldAgent`` for the settings in ``args`` (``TRAINING_CONFIG``)."""
    from examples.textworld import TextWorldAgent

    lora = None
    if args.lora_top_layers:
        from transformers import AutoConfig

        from rllama.policy import resolve_model_path
        from rllama.policy.model import default_lora_config

        depth = AutoConfig.from_pretrained(resolve_model_path(args.model)).num_hidden_layers
        lora = default_lora_config(layers=range(max(0, depth - args.lora_top_layers), depth))
    return TextWorldAgent(args.model, seed=seed, precision=args.precision, lora_config=lora,
                          algorithm_config={"policy_head": 0, "batch_episodes": args.envs, "learning_rate": args.lr,
                                            "minibatch_size": args.minibatch_size, "epochs": args.epochs,
                                            "ent_coef": args.ent_coef})


def run(seed: int, args) -> dict:
    from examples.textworld import HELD_OUT_SEEDS, TRAIN_SEEDS, make_env
    from rllama.checkpoint import load_training_state, save_training_state

    t0 = time.perf_counter()
    held_out = make_env(HELD_OUT_SEEDS, max_episode_steps=args.max_steps)
    agent = make_agent(seed, args)
    state = Path(args.checkpoint) / f"seed{seed}" if args.checkpoint else None
    saved = load_training_state(agent, state) if state is not None and state.exists() else {}
    training = {k: getattr(args, k) for k in TRAINING_CONFIG}
    changed = {k: v for k, v in saved.get("config", training).items() if training.get(k) != v}
    if changed:
        raise SystemExit(f"--checkpoint {state}: that run trained with "
                         f"{', '.join(f'{k}={v!r}' for k, v in changed.items())}, this one with "
                         f"{', '.join(f'{k}={training.get(k)!r}' for k in changed)}; "
                         "resume with its settings or train into another --checkpoint folder")
    result = {"seed": seed, "chunks": saved.get("chunks", 0), "updates": saved.get("updates", []),
              "train_s": saved.get("train_s", 0.0)}
    if "untrained" in saved:
        result["untrained"] = saved["untrained"]
        print(f"seed {seed}: resumed from {state} after {result['chunks'] * args.envs} episodes", flush=True)
    elif args.untrained_from:
        result["untrained"] = untrained_from(args.untrained_from, seed, args)
    else:
        result["untrained"] = evaluate_agent(agent, held_out, args)
    print(f"seed {seed} untrained {result['untrained']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train = make_env(TRAIN_SEEDS, max_episode_steps=args.max_steps, num_envs=args.envs,
                     intermediate_reward_weight=args.intermediate_reward)
    # Chunks of one batch (one update each): every sub-env ends its episode at a chunk's end, so the
    # full training state can be saved there and a stopped run resumes where it was.
    t_train = time.perf_counter()
    for chunk in range(result["chunks"], args.episodes // args.envs):
        if args.train_minutes and time.perf_counter() - t_train > 60 * args.train_minutes:
            break
        result["updates"] += agent.train(train, args.envs, seed=seed * 1_000_003 + chunk * args.envs,
                                         progress=False)
        result["chunks"] = chunk + 1
        print(f"seed {seed} episodes {result['chunks'] * args.envs}: "
              f"return {result['updates'][-1]['rollout/mean_return']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if state is not None:
            save_training_state(agent, state, extra={
                "chunks": result["chunks"], "updates": result["updates"], "untrained": result["untrained"],
                "config": training,
                "train_s": result["train_s"] + time.perf_counter() - t_train})
    result["train_s"] += time.perf_counter() - t_train
    result["episodes"] = result["chunks"] * args.envs
    result["trained"] = evaluate_agent(agent, held_out, args)
    print(f"seed {seed} trained {result['trained']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result["random"] = play(held_out, lambda obs, info, t, rng: str(rng.choice(obs["admissible_commands"])),
                            args.sampled_episodes)
    result["walkthrough"] = play(held_out, lambda obs, info, t, rng: info["walkthrough"][t]
                                 if t < len(info["walkthrough"]) else "look")
    result["wall_s"] = time.perf_counter() - t0
    return result


def _std(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def summarise(runs: list[dict]) -> dict:
    rows = {}
    for name, mode in [("untrained", "greedy"), ("untrained", "sampled"), ("trained", "greedy"),
                       ("trained", "sampled"), ("random", None), ("walkthrough", None)]:
        vals = [r[name][mode] if mode else r[name] for r in runs]
        key = f"{name} ({mode})" if mode else name
        succ = np.array([v["success"] for v in vals])
        score = np.array([v["score"] for v in vals])
        n = sum(v["n"] for v in vals)
        pooled = sum(v["success"] * v["n"] for v in vals) / n
        rows[key] = {"success_mean": float(succ.mean()), "success_std": _std(succ),
                     # standard error of the success rate over all the episodes of all seeds (binomial)
                     "success_se": float(np.sqrt(pooled * (1 - pooled) / n)), "episodes": n,
                     "score_mean": float(score.mean()), "score_std": _std(score), "per_seed_success": succ.tolist()}
    return rows


def target(table: dict) -> dict:
    """The issue's target, trained success over untrained success (sampled play), with its standard error.

    The untrained agent is the same policy for every seed (a fresh LoRA adapter is zero), so its seeds'
    evaluations are draws of one success rate: pooled, binomial standard error. Each seed's trained agent
    is a policy of its own, so the trained mean's standard error is the spread over seeds / sqrt(seeds)
    (which holds the evaluation noise too); with one seed, the binomial one.
    """
    untrained, trained = table["untrained (sampled)"], table["trained (sampled)"]
    u, t = untrained["success_mean"], trained["success_mean"]
    if u == 0:
        return {"ratio": None, "note": "the untrained agent never won"}
    seeds = len(trained["per_seed_success"])
    t_se = trained["success_std"] / np.sqrt(seeds) if seeds > 1 else trained["success_se"]
    ratio = t / u
    rel = np.sqrt((t_se / max(t, 1e-9)) ** 2 + (untrained["success_se"] / u) ** 2)
    return {"ratio": ratio, "ratio_se": float(ratio * rel),
            "per_seed_ratio": [s / u for s in trained["per_seed_success"]]}


def save(args, runs: list[dict], wall_s: float) -> dict:
    """Write the result (the table over seeds and the issue's target) as JSON and PNG."""
    table = summarise(runs)
    return save_result("textworld", args, runs, plot, table=table, target=target(table), wall_s=wall_s)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["table"]
    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, metric, label in [(axes[0], "success", "success rate (games won)"),
                              (axes[1], "score", "score / max score")]:
        means = [table[n][f"{metric}_mean"] for n in names]
        stds = [table[n][f"{metric}_std"] for n in names]
        colors = ["tab:gray", "silver", "tab:blue", "lightsteelblue", "tab:red", "tab:green"]
        ax.bar(range(len(names)), means, yerr=stds, color=colors[: len(names)], capsize=4)
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    for color, r in zip(["tab:blue", "tab:orange", "tab:purple", "tab:brown"] * 4, result["runs"]):
        returns = np.array([u["rollout/mean_return"] for u in r["updates"]])
        episodes = np.cumsum([u["rollout/episodes"] for u in r["updates"]])
        ax.plot(episodes, returns, color=color, alpha=0.3)
        k = min(4, len(returns))
        if k:
            ax.plot(episodes[k - 1:], np.convolve(returns, np.ones(k) / k, mode="valid"), color=color,
                    label=f"seed {r['seed']}")
    ax.set_xlabel("training episodes")
    ax.set_ylabel("mean training return per update\n(thin; thick: mean of 4 updates)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    cfg = result["config"]
    episodes = sorted({r.get("episodes", cfg["episodes"]) for r in result["runs"]})
    fig.suptitle(f"TextWorld held-out games (16), SmolLM2-135M + LoRA, PPO {'/'.join(map(str, episodes))} episodes "
                 f"(lr {cfg['lr']:g}, intermediate reward {cfg.get('intermediate_reward', 0):g}, "
                 f"entropy bonus {cfg.get('ent_coef', 0.01):g}); "
                 f"seeds {cfg['seeds']} (error bars: std over seeds)", fontsize=10)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=15)
    parser.add_argument("--intermediate-reward", type=float, default=0.0,
                        help="weight of TextWorld's intermediate reward in training (evaluation counts wins only)")
    parser.add_argument("--sampled-episodes", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--minibatch-size", type=int, default=4,
                        help="steps per gradient step (PPO's default 16 of these long prompts needs ~20 GB)")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs over each batch")
    parser.add_argument("--ent-coef", type=float, default=0.01,
                        help="weight of PPO's entropy bonus (over the admissible commands' distribution)")
    parser.add_argument("--lora-top-layers", type=int, default=8,
                        help="LoRA on the top N transformer blocks only (0: every block); 8 of 30 made an "
                             "update 1.6x faster and its peak RSS 5.6 -> 2.4 GB")
    parser.add_argument("--train-minutes", type=float, default=0,
                        help="stop training after the update that passes this many minutes (0: no limit)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="save the training state to DIR/seed<N> after every update and resume from it")
    parser.add_argument("--untrained-from", default=None, metavar="JSON",
                        help="reuse the untrained evaluation of an earlier result file of the same agent")
    parser.add_argument("--eval-batch", type=int, default=8, help="evaluation episodes played side by side")
    add_common_args(parser, "textworld")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine result files (finished or .partial.json) of runs made apart into --name")
    args = parser.parse_args()
    if args.merge:
        runs = load_runs(args.merge)
        made = json.loads(Path(args.merge[0]).read_text())["config"]  # the settings the runs were made with
        for key in {*TRAINING_CONFIG, *UNTRAINED_CONFIG, "episodes", "train_minutes"}:
            setattr(args, key, made.get(key, getattr(args, key)))
        args.seeds = [r["seed"] for r in runs]
        save(args, runs, wall_s=sum(r["wall_s"] for r in runs))
        return
    set_threads(args)
    t0 = time.perf_counter()
    runs = []
    for seed in args.seeds:
        runs.append(run(seed, args))
        save_partial(args.name, runs)
    result = save(args, runs, wall_s=time.perf_counter() - t0)
    for name, row in result["table"].items():
        print(f"{name:22s} success {row['success_mean']:.3f} ± {row['success_std']:.3f}  "
              f"score {row['score_mean']:.3f} ± {row['score_std']:.3f}")
    if result["target"]["ratio"] is not None:
        print(f"trained / untrained success (sampled): {result['target']['ratio']:.2f} "
              f"± {result['target']['ratio_se']:.2f}")


if __name__ == "__main__":
    main()
