"""Train the top, remember the bottom: the default path (LoRA on the top 8 blocks, frozen-bottom prefix
cache) against the path before it, side by side in one run.

    python benchmarks/prefix_cache.py --threads 1                # the committed results (~25 min, 2 cores)
    python benchmarks/prefix_cache.py --threads 1 --quick        # a smoke run of a few minutes
    python benchmarks/prefix_cache.py --threads 1 --layouts baseline default --baseline-commit 3d0de4a \
        --name engine_refactor                                   # this checkout's default path against a commit's

Layouts (``--layouts``; by default the first three, and ``baseline`` too when ``--baseline-commit`` is given):

- ``before``: the library as it was before the cache (``--before-commit``, checked out into a
  temporary git worktree and imported from there): LoRA on every block, nothing cached.
- ``default``: this checkout's defaults (LoRA on the top 8 of 30 blocks, prefix cache on).
- ``top4``: this checkout with LoRA on the top 4 blocks (what fewer adapted blocks buy).
- ``baseline``: the ``default`` layout (the defaults: top 8 blocks + prefix cache) of the library at
  ``--baseline-commit``, imported from a temporary git worktree as ``before`` is: a change of this
  checkout against a commit, measured in one run. With ``default`` it adds ``default_over_baseline``
  to the result, the ratio default / baseline of every figure (so above 1 is faster for env steps/s,
  slower for seconds and ms per token).

Each layout runs in a fresh process, one after the other (so peak memory is its own and two never
share the cores), on the embedded SmolLM2-135M, Blackjack-v1, the same seeds and the same precision
(``--precision``, default ``auto``: resolved once by this checkout and passed to all). Measured per layout:

- ``scoring_1`` / ``scoring_16``: acting env steps/s with 1 and 16 vector envs, scoring "stick"/"hit"
  and sampling as in training, after a warm-up of ``--warmup`` episodes (what a run's cache holds
  after its first minutes; the warm-up is the same for both layouts).
- ``generate_1`` / ``generate_16``: the same in generate mode (replies of up to ``--new-tokens``
  tokens), env steps/s and ms per generated token.
- ``ppo_update_s``: a PPO update of 16 episodes (one epoch, as in ``throughput.py``): the mean of
  the updates of the ``train`` part, which follows a first update (shapes, optimizer state).
- ``dqn_step_s``: one DQN gradient step on a replayed minibatch of 16 transitions, training the adapter.
- ``train_defaults``, ``dqn_default_step_s`` (this checkout's layouts only): PPO training at its
  defaults (a policy head on whitened features, the adapter frozen, the first update after 500
  steps) over ``--defaults-episodes`` episodes, and a DQN gradient step at its defaults (64
  transitions, heads only); ``gemv_floor_ms``: every linear weight read once at batch 1, the
  memory-bandwidth floor of one generated token.
- ``train``: PPO training env steps/s over ``--train-episodes`` episodes with 16 envs, updates
  included; peak RSS of the whole process.
- the naive LlamaGym-style loop of ``throughput.py`` (one env, ``model.generate`` per step, a
  second model copy as reference), once: its env steps/s against ``train``.

Every layout records ``part_s``, the seconds each of its parts took. ``--naive-steps 0`` skips the naive
loop. ``--quick`` shortens what no flag sets: ``--quick --train-episodes 16`` keeps the 16.

Writes ``results/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import add_common_args, cpu_name, save_figure, save_result, set_threads  # noqa: E402

LAYOUTS = {"before": "before: every block, no cache", "default": "default: top 8 blocks + prefix cache",
           "top4": "top 4 blocks + prefix cache", "baseline": "default layout at {commit}"}
COLOURS = {"before": "tab:gray", "default": "tab:blue", "top4": "tab:cyan", "baseline": "tab:orange"}
WORKTREE_LAYOUTS = {"before": "before_commit", "baseline": "baseline_commit"}  # layout: the flag naming its commit


def label(run: dict) -> str:
    return run.get("label") or LAYOUTS[run["layout"]].format(commit=run.get("commit", "?"))


def resolve_precision(precision: str) -> str:
    """``--precision`` resolved for the CPU by the imported library (``rllama.policy.model`` at the commits
    measured so far; ``rllama.policy`` tried next, in case a refactor moves it)."""
    import importlib

    import torch

    for module in ("rllama.policy.model", "rllama.policy"):
        try:
            return importlib.import_module(module).resolve_precision(precision, torch.device("cpu"))
        except (ImportError, AttributeError):
            continue
    raise ImportError("resolve_precision is in neither rllama.policy.model nor rllama.policy")


def ppo_config(**fields) -> dict:
    """PPO on the adapter alone, as the committed figures measured it: ``policy_head: 0`` where the imported
    library has that field (the "before" commit predates it)."""
    import dataclasses

    from rllama.algorithms.ppo import PPOConfig

    if "policy_head" in {f.name for f in dataclasses.fields(PPOConfig)}:
        fields["policy_head"] = 0
    return fields


def make_agent(layout: str, precision: str, generate: bool = False, **kwargs):
    from rllama.agents import BlackjackAgent
    from rllama.policy import default_lora_config, load_model

    cls = BlackjackAgent
    if generate:
        class GeneratingBlackjackAgent(BlackjackAgent):
            def get_valid_actions(self, observation):
                return None

        cls = GeneratingBlackjackAgent
    if layout == "top4":
        kwargs.update(lora_config=default_lora_config(layers=range(26, 30)))
    # "before", "baseline" and "default" take the defaults of the library they import: the worktree of
    # --before-commit (every block, no cache), that of --baseline-commit and this checkout (top 8 + cache)
    lm, tokenizer = load_model(None)
    return cls(lm, tokenizer, seed=0, precision=precision, **kwargs)


def acting(agent, n_envs: int, warmup: int, episodes: int) -> dict:
    """Env steps/s of sampled acting on ``n_envs`` Blackjack envs, after ``warmup`` episodes."""
    import gymnasium as gym
    from throughput import Recorder

    from rllama.loops import run_episodes

    envs = gym.make_vec("Blackjack-v1", num_envs=n_envs, vectorization_mode="sync", sab=True)
    with agent.evaluating(greedy=False):
        if warmup:
            run_episodes(agent, envs, warmup, seed=1)
        recorder = Recorder(agent.policy)
        t0 = time.perf_counter()
        run_episodes(agent, envs, episodes, seed=2)
        wall = time.perf_counter() - t0
        recorder.restore()
    envs.close()
    row = {"envs": n_envs, "episodes": episodes, "env_steps": recorder.env_steps, "wall_s": wall,
           "env_steps_per_s": recorder.env_steps / wall}
    tokens = sum(c[3] for c in recorder.calls)
    if tokens:
        row.update(generated_tokens=tokens, ms_per_token=1000 * wall / tokens)
    return row


def stats_of(agent) -> dict:
    """What the policy's engine keeps (``policy.engine.stats()``; ``prefix_cache_stats()`` in libraries before the
    engine layer, nothing in libraries before the cache)."""
    policy = agent.policy
    if hasattr(policy, "engine"):
        return policy.engine.stats()
    return policy.prefix_cache_stats() if hasattr(policy, "prefix_cache_stats") else {}


def part(args) -> dict:
    import resource

    import gymnasium as gym

    import rllama

    clock = [time.perf_counter()]

    def lap(name: str) -> None:  # the seconds a part took, loading included
        now = time.perf_counter()
        out["part_s"][name] = now - clock[0]
        clock[0] = now

    out = {"layout": args.layout, "precision": resolve_precision(args.precision),
           "rllama_imported_from": str(Path(rllama.__file__).parent), "part_s": {}}
    # The update measured is one pass over 16 episodes in minibatches of 16 (the committed figures' setting).
    agent = make_agent(args.layout, args.precision,
                       algorithm_config=ppo_config(batch_episodes=16, minibatch_size=16, epochs=1))
    out["prefix_cache"] = bool(stats_of(agent))
    out["adapted_blocks"] = sorted({int(n.split("layers.")[1].split(".")[0])
                                    for n, _ in agent.policy.named_parameters() if "lora_" in n})
    for n, episodes in ((16, args.act_episodes), (1, args.act_episodes // 4)):
        out[f"scoring_{n}"] = acting(agent, n, args.warmup if n == 16 else 0, episodes)
        print(args.layout, f"scoring {n}", out[f"scoring_{n}"], flush=True)
    out["cache_after_acting"] = stats_of(agent)
    lap("scoring")
    # PPO: a first update (shapes, optimizer state), then the measured one.
    envs = gym.make_vec("Blackjack-v1", num_envs=16, vectorization_mode="sync", sab=True)
    agent.train(envs, 16, seed=3, progress=False)
    t0, steps0 = time.perf_counter(), agent.total_steps
    history = agent.train(envs, args.train_episodes, seed=4, progress=False)
    wall = time.perf_counter() - t0
    # The mean of the training part's updates (after a first, unmeasured one): single updates vary by ±30 %.
    out["ppo_update_s"] = sum(h["time/update_s"] for h in history) / len(history)
    out["ppo_update_steps"] = sum(h["rollout/steps"] for h in history) / len(history)
    out["train"] = {"episodes": args.train_episodes, "updates": len(history), "env_steps": agent.total_steps - steps0,
                    "wall_s": wall, "env_steps_per_s": (agent.total_steps - steps0) / wall,
                    "update_s": [h["time/update_s"] for h in history]}
    out["cache_after_training"] = stats_of(agent)
    print(args.layout, "ppo", out["ppo_update_s"], out["train"], flush=True)
    del agent
    lap("ppo")
    # DQN training the adapter on minibatches of 16 (what "before" ran): two updates of 8 gradient steps; the
    # second one is measured.
    agent = make_agent(args.layout, args.precision, algorithm="dqn",
                       algorithm_config=adapter_dqn_config(batch_episodes=16, learning_starts=16, gradient_steps=8))
    agent.train(envs, 32, seed=5, progress=False)
    history = agent.train(envs, 16, seed=6, progress=False)
    out["dqn_step_s"] = history[-1]["time/update_s"] / 8
    print(args.layout, "dqn step", out["dqn_step_s"], flush=True)
    del agent
    lap("dqn")
    if args.layout != "before":
        out.update(defaults_part(args, envs, lap))
    agent = make_agent(args.layout, args.precision, generate=True, max_new_tokens=args.new_tokens)
    for n, episodes in ((16, args.gen_episodes), (1, max(2, args.gen_episodes // 4))):
        out[f"generate_{n}"] = acting(agent, n, 0, episodes)
        print(args.layout, f"generate {n}", out[f"generate_{n}"], flush=True)
    lap("generate")
    print(args.layout, "part_s", {k: round(v, 1) for k, v in out["part_s"].items()}, flush=True)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def adapter_dqn_config(**fields) -> dict:
    """DQN training the adapter on minibatches of 16, as the committed "before" figures measured it (the
    defaults changed since: a frozen adapter and whitened heads)."""
    import dataclasses

    from rllama.algorithms.dqn import DQNConfig

    if "train_adapter" in {f.name for f in dataclasses.fields(DQNConfig)}:
        fields.update(train_adapter=True, whiten_features=0, minibatch_size=16)
    return fields


def defaults_part(args, envs, lap=lambda name: None) -> dict:
    """What this checkout's defaults cost: PPO training at its defaults (a policy head on whitened features,
    the adapter frozen, the first update after 500 steps), a DQN gradient step at its defaults (64
    transitions, heads only), and the floor of generation (every weight read once)."""
    out = {}
    agent = make_agent(args.layout, args.precision)
    t0 = time.perf_counter()
    history = agent.train(envs, args.defaults_episodes, seed=7, progress=False)
    wall = time.perf_counter() - t0
    steps = agent.total_steps
    out["train_defaults"] = {"episodes": args.defaults_episodes, "updates": len(history), "env_steps": steps,
                             "wall_s": wall, "env_steps_per_s": steps / wall,
                             "update_s": [h["time/update_s"] for h in history]}
    print(args.layout, "train (defaults)", out["train_defaults"], flush=True)
    del agent
    lap("train_defaults")
    agent = make_agent(args.layout, args.precision, algorithm="dqn", algorithm_config={"learning_starts": 128})
    agent.train(envs, 160, seed=8, progress=False)
    history = agent.train(envs, 16, seed=9, progress=False)
    steps = agent.algorithm.config.gradient_steps
    out["dqn_default_step_s"] = history[-1]["time/update_s"] / steps
    out["dqn_default_minibatch"] = agent.algorithm.config.minibatch_size
    print(args.layout, "dqn step (defaults)", out["dqn_default_step_s"], flush=True)
    out["gemv_floor_ms"] = gemv_floor_ms(agent.policy)
    del agent
    lap("dqn_defaults")
    return out


def gemv_floor_ms(policy, repeats: int = 5) -> float:
    """Milliseconds to read every linear weight of the model once at batch 1 (each one GEMV, the language-model
    head included): the memory-bandwidth floor of generating one token."""
    import torch

    weights = [m.weight for m in policy.lm.modules() if isinstance(m, torch.nn.Linear) and m.weight.dim() == 2]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
            best = min(best, time.perf_counter() - t)
    return 1000 * best


def textworld_part(args) -> dict:
    """TextWorld (≈ 640-token prompts): acting env steps/s and one PPO update of 4 short episodes."""
    import resource

    import rllama
    from examples.textworld import TRAIN_SEEDS, TextWorldAgent, make_env

    kwargs = {}
    if args.layout == "top4":
        from rllama.policy import default_lora_config

        kwargs["lora_config"] = default_lora_config(layers=range(26, 30))
    agent = TextWorldAgent(None, seed=0, precision=args.precision,
                           algorithm_config=ppo_config(batch_episodes=4, minibatch_size=4, epochs=1),
                           **kwargs)
    envs = make_env(TRAIN_SEEDS[:8], max_episode_steps=args.textworld_steps, num_envs=4)
    t0 = time.perf_counter()
    history = agent.train(envs, 4, seed=0, progress=False)
    wall = time.perf_counter() - t0
    update_s = history[0]["time/update_s"]
    steps = int(history[0]["rollout/steps"])
    return {"layout": args.layout, "rllama_imported_from": str(Path(rllama.__file__).parent),
            "env_steps": steps, "acting_s": wall - update_s, "acting_env_steps_per_s": steps / (wall - update_s),
            "update_s": update_s, "update_tokens_per_s": history[0]["time/update_tokens_per_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_part(layout: str, args, tmp: Path, precision: str, textworld: bool = False) -> dict:
    out = tmp / f"{layout}{'-textworld' if textworld else ''}.json"
    cmd = [sys.executable, __file__, "--part", "textworld" if textworld else "layout", "--layout", layout,
           "--out", str(out), "--textworld-steps", str(args.textworld_steps),
           "--precision", precision, "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--act-episodes", str(args.act_episodes), "--gen-episodes", str(args.gen_episodes),
           "--train-episodes", str(args.train_episodes), "--new-tokens", str(args.new_tokens),
           "--defaults-episodes", str(args.defaults_episodes)]
    env = dict(os.environ)
    commit = getattr(args, WORKTREE_LAYOUTS[layout]) if layout in WORKTREE_LAYOUTS else None
    if commit:  # import the library of --before-commit / --baseline-commit, not this checkout's
        tree = tmp / layout
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                       check=True, capture_output=True)
        env["RLLAMA_BEFORE_TREE"] = str(tree)
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, env=env)
    finally:
        if commit:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - t0
    if commit:
        result["commit"] = commit
    result["label"] = label(result)
    return result


def run_naive(args, tmp: Path) -> dict:
    out = tmp / "naive.json"
    cmd = [sys.executable, str(HERE / "throughput.py"), "--part", "naive", "--model-name", "default",
           "--out", str(out), "--precision", args.precision, "--threads", str(args.threads),
           "--naive-steps", str(args.naive_steps), "--new-tokens", str(args.new_tokens)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def ratios(before: dict, default: dict, naive: dict | None) -> dict:
    """``default`` against ``before`` (and the naive loop): the issue's targets are these ratios."""
    speed = {key: default[key]["env_steps_per_s"] / before[key]["env_steps_per_s"]
             for key in ("scoring_1", "scoring_16", "generate_1", "generate_16", "train")}
    out = {**{f"{k}_speedup": v for k, v in speed.items()},
           "ppo_update_speedup": before["ppo_update_s"] / default["ppo_update_s"],
           "dqn_step_speedup": before["dqn_step_s"] / default["dqn_step_s"],
           "peak_rss_ratio": default["peak_rss_mb"] / before["peak_rss_mb"]}
    if naive:  # --naive-steps 0 skips the naive loop
        out["train_over_naive"] = default["train"]["env_steps_per_s"] / naive["env_steps_per_s"]
    if "train_defaults" in default:  # results from before these rows were measured lack them
        speed = default["train_defaults"]["env_steps_per_s"]
        if naive:
            out["train_defaults_over_naive"] = speed / naive["env_steps_per_s"]
        out.update(train_defaults_speedup=speed / before["train"]["env_steps_per_s"],
                   dqn_default_step_speedup=before["dqn_step_s"] / default["dqn_default_step_s"],
                   generate_1_ms_per_token_over_floor=default["generate_1"]["ms_per_token"] / default["gemv_floor_ms"])
    return out


FIGURES = [  # (name, row, field or None for a top-level number, label in the PNG)
    ("scoring_1_env_steps_per_s", "scoring_1", "env_steps_per_s", "score 1 env, steps/s"),
    ("scoring_16_env_steps_per_s", "scoring_16", "env_steps_per_s", "score 16 envs, steps/s"),
    ("generate_1_env_steps_per_s", "generate_1", "env_steps_per_s", "gen 1 env, steps/s"),
    ("generate_16_env_steps_per_s", "generate_16", "env_steps_per_s", "gen 16 envs, steps/s"),
    ("generate_1_ms_per_token", "generate_1", "ms_per_token", "gen 1 env, ms/token"),
    ("generate_16_ms_per_token", "generate_16", "ms_per_token", "gen 16 envs, ms/token"),
    ("ppo_update_s", "ppo_update_s", None, "PPO update, s"),
    ("dqn_step_s", "dqn_step_s", None, "DQN step (adapter), s"),
    ("train_env_steps_per_s", "train", "env_steps_per_s", "PPO training, steps/s"),
    ("train_defaults_env_steps_per_s", "train_defaults", "env_steps_per_s", "training at defaults, steps/s"),
    ("dqn_default_step_s", "dqn_default_step_s", None, "DQN step (defaults), s"),
    ("gemv_floor_ms", "gemv_floor_ms", None, "GEMV floor, ms"),
    ("peak_rss_mb", "peak_rss_mb", None, "peak RSS, MB"),
]
HIGHER_IS_BETTER = {name for name, *_ in FIGURES if name.endswith("_per_s")}


def figures(run: dict) -> dict:
    """A layout's figures, flat (those it lacks left out)."""
    out = {}
    for name, row, field, _ in FIGURES:
        value = run.get(row)
        if field is not None:
            value = value.get(field) if isinstance(value, dict) else None
        if value is not None:
            out[name] = value
    return out


def compare(baseline: dict, default: dict) -> dict:
    """Both layouts' figures and ``default_over_baseline``, the ratio default / baseline of each."""
    b, d = figures(baseline), figures(default)
    return {"baseline_commit": baseline.get("commit"), "baseline": b, "default": d,
            "default_over_baseline": {k: d[k] / b[k] for k in d if k in b and b[k]}}


def print_comparison(comparison: dict) -> None:
    print(f"{'figure':34s} {'baseline':>11s} {'default':>11s} {'default/baseline':>17s}")
    for name, ratio in comparison["default_over_baseline"].items():
        better = (ratio > 1) == (name in HIGHER_IS_BETTER)
        print(f"{name:34s} {comparison['baseline'][name]:11.4g} {comparison['default'][name]:11.4g} "
              f"{ratio:16.3f}{' ' if abs(ratio - 1) < 1e-9 else '+' if better else '-'}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = {r["layout"]: r for r in result["runs"]}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    keys = ["scoring_1", "scoring_16", "generate_1", "generate_16", "train", "train_defaults"]
    costs = ["ppo_update_s", "dqn_step_s", "dqn_default_step_s"]
    x, width = np.arange(len(keys)), 0.8 / len(runs)
    nan = float("nan")
    for off, (layout, r) in enumerate(runs.items()):
        shift = (off - (len(runs) - 1) / 2) * width
        axes[0].bar(x + shift, [r[k]["env_steps_per_s"] if k in r else nan for k in keys], width,
                    label=label(r), color=COLOURS[layout])
        axes[1].bar(np.arange(len(costs)) + shift, [r.get(k, nan) for k in costs], width, color=COLOURS[layout])
    if result.get("naive"):
        axes[0].axhline(result["naive"]["env_steps_per_s"], color="tab:red", ls="--", lw=1,
                        label="naive LlamaGym loop")
    axes[0].set_xticks(x, ["score\n1 env", "score\n16 envs", "generate\n1 env", "generate\n16 envs",
                           "PPO training\n16 envs", "PPO training\nat defaults"])
    axes[0].set_ylabel("env steps / s")
    axes[0].set_yscale("log")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 6)  # room for the legend above the bars
    axes[0].tick_params(axis="x", labelsize=8)
    axes[1].tick_params(axis="x", labelsize=8)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[0].set_title("acting and training throughput")
    axes[1].set_xticks(np.arange(len(costs)), ["PPO update\n(16 episodes)", "DQN step, adapter\n(16 transitions)",
                                               "DQN step, defaults\n(64, heads only)"])
    axes[1].set_ylabel("seconds")
    axes[1].set_yscale("log")
    axes[1].set_title("update cost")
    rss = " / ".join(f"{runs[k]['peak_rss_mb'] / 1024:.1f}" for k in runs)
    if result.get("comparison"):  # default / baseline of every figure: green where the default is better
        ratio = result["comparison"]["default_over_baseline"]
        names = {name: text for name, _, _, text in FIGURES}
        rows = [(names[k], v, "tab:green" if (v >= 1) == (k in HIGHER_IS_BETTER) else "tab:red")
                for k, v in ratio.items()]
        xlabel = f"default / baseline ({result['comparison']['baseline_commit']}); green: default better"
        title = f"default against baseline; peak RSS {rss} GiB"
    else:
        sp = result.get("speedups", {})
        rows = [("score 1", "scoring_1_speedup"), ("score 16", "scoring_16_speedup"),
                ("gen 1", "generate_1_speedup"), ("gen 16", "generate_16_speedup"), ("train", "train_speedup"),
                ("train, defaults", "train_defaults_speedup"),
                ("PPO update", "ppo_update_speedup"), ("DQN step", "dqn_step_speedup"),
                ("DQN step, defaults", "dqn_default_step_speedup")]
        rows = [(text, sp[key], "tab:blue") for text, key in rows if key in sp]
        order = runs_order(result)
        xlabel = f"{order[1] if len(order) > 1 else 'default'} / {order[0]} (higher is better)"
        title = f"speed-up of the default; peak RSS {rss} GiB"
    if rows:
        near = "comparison" in result  # ratios of two versions of one layout: a linear axis around 1
        values = [r[1] for r in rows]
        axes[2].barh([r[0] for r in rows], [v - 1 for v in values] if near else values, left=1 if near else 0,
                     color=[r[2] for r in rows])
        axes[2].axvline(1, color="k", lw=0.8)
        for i, v in enumerate(values):
            axes[2].text(v, i, f" {v:.2f}x", va="center", fontsize=8)
        if near:
            axes[2].set_xlim(min(0.8, min(values) - 0.05), max(1.2, max(values) + 0.08))
        else:
            axes[2].set_xscale("log")
        axes[2].invert_yaxis()
        axes[2].tick_params(axis="y", labelsize=8)
        axes[2].set_xlabel(xlabel)
    else:  # one layout: nothing to compare
        axes[2].axis("off")
        title = f"peak RSS {rss} GiB"
    axes[2].set_title(title)
    first = next(iter(runs.values()))
    fig.suptitle(f"SmolLM2-135M, Blackjack-v1, {first['precision']}, {result['cpu']}, "
                 f"{result['config']['threads']} thread(s)")
    save_figure(fig, path)


def runs_order(result: dict) -> list[str]:
    return [r["layout"] for r in result["runs"]]


def plot_textworld(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [label(r).replace(": ", ":\n") for r in runs]
    colours = [COLOURS[r["layout"]] for r in runs]
    axes[0].bar(names, [r["acting_env_steps_per_s"] for r in runs], color=colours)
    axes[0].set_ylabel("env steps / s")
    axes[0].set_title("TextWorld acting (4 envs)")
    axes[1].bar(names, [r["update_s"] for r in runs], color=colours)
    axes[1].set_ylabel("seconds")
    axes[1].set_title("one PPO update (4 episodes)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"SmolLM2-135M, TextWorld, {result['cpu']}, {result['config']['threads']} thread(s)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "prefix_cache", precision="auto")
    parser.add_argument("--part", choices=["layout", "textworld"], help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=128, help="episodes acted before the 16-env measurement")
    parser.add_argument("--act-episodes", type=int, default=96, help="episodes of the 16-env scoring measurement")
    parser.add_argument("--gen-episodes", type=int, default=16, help="episodes of the 16-env generate measurement")
    parser.add_argument("--train-episodes", type=int, default=64, help="PPO training episodes measured")
    parser.add_argument("--new-tokens", type=int, default=24, help="longest generated reply")
    parser.add_argument("--naive-steps", type=int, default=12, help="env steps of the naive loop")
    parser.add_argument("--defaults-episodes", type=int, default=640,
                        help="episodes of PPO training at this checkout's defaults (first update after 500 steps)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few episodes")
    parser.add_argument("--summarise", metavar="JSON", help="recompute the ratios and the PNG of a result file")
    parser.add_argument("--before-commit", default="f6395ac", help="the commit measured as 'before'")
    parser.add_argument("--textworld", action="store_true",
                        help="TextWorld only: acting and one PPO update of 4 episodes (writes <name>_textworld)")
    parser.add_argument("--textworld-steps", type=int, default=6, help="longest TextWorld episode (--textworld)")
    parser.add_argument("--baseline-commit", help="measure the 'baseline' layout: the default layout (top 8 "
                        "blocks + prefix cache) of the library at this commit, from a temporary git worktree")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS),
                        help="layouts to measure, in this order (default: before default top4, and baseline with "
                        "--baseline-commit); the first two are compared, and default against baseline")
    args = parser.parse_args()
    if args.layouts is None and not args.part:
        args.layouts = ["before", "default", "top4"] + (["baseline"] if args.baseline_commit else [])
    if not args.part and "baseline" in (args.layouts or []) and not args.baseline_commit:
        parser.error("the 'baseline' layout needs --baseline-commit")
    set_threads(args)
    if args.part:
        if os.environ.get("RLLAMA_BEFORE_TREE"):  # ahead of this checkout, which common.py put on the path
            sys.path.insert(0, os.environ["RLLAMA_BEFORE_TREE"])
        Path(args.out).write_text(json.dumps(textworld_part(args) if args.part == "textworld" else part(args)))
        return
    if args.summarise:
        result = json.loads(Path(args.summarise).read_text())
        runs = {r["layout"]: r for r in result["runs"]}
        for r in runs.values():  # the PPO update figure as defined above, from the recorded updates
            r["ppo_update_s"] = sum(r["train"]["update_s"]) / len(r["train"]["update_s"])
        if "before" in runs and "default" in runs:
            result["speedups"] = ratios(runs["before"], runs["default"], result.get("naive"))
            print(json.dumps(result["speedups"], indent=1))
        if "baseline" in runs and "default" in runs:
            result["comparison"] = compare(runs["baseline"], runs["default"])
            print_comparison(result["comparison"])
        Path(args.summarise).write_text(json.dumps(result, indent=1))
        plot(result, Path(args.summarise).with_suffix(".png"))
        return
    if args.quick:  # shortens what no flag set
        quick = dict(warmup=16, act_episodes=32, gen_episodes=4, train_episodes=32, naive_steps=4,
                     defaults_episodes=400)
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    import tempfile

    precision = resolve_precision(args.precision)
    if args.textworld:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [run_part(layout, args, Path(tmp), precision, textworld=True) for layout in args.layouts]
        speedups = {}
        if len(runs) > 1:
            before, default = runs[0], runs[1]
            speedups = {"acting_speedup": default["acting_env_steps_per_s"] / before["acting_env_steps_per_s"],
                        "update_speedup": before["update_s"] / default["update_s"]}
            print(json.dumps(speedups, indent=1))
        args.name += "_textworld"
        save_result("prefix_cache_textworld", args, runs, plot_textworld, cpu=cpu_name(), speedups=speedups)
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_part(layout, args, Path(tmp), precision) for layout in args.layouts]
        naive = run_naive(args, Path(tmp)) if args.naive_steps else None
    fields = {"cpu": cpu_name(), "naive": naive}
    if len(runs) > 1:
        fields["speedups"] = ratios(runs[0], runs[1], naive)
        print(json.dumps(fields["speedups"], indent=1))
    by_layout = {r["layout"]: r for r in runs}
    if "baseline" in by_layout and "default" in by_layout:
        fields["comparison"] = compare(by_layout["baseline"], by_layout["default"])
        print_comparison(fields["comparison"])
    for r in runs:
        print(r["layout"], f"{r['process_wall_s']:.0f} s:", {k: round(v, 1) for k, v in r["part_s"].items()})
    fields["wall_s"] = time.perf_counter() - t0
    print(f"wall {fields['wall_s']:.0f} s")
    save_result("prefix_cache", args, runs, plot, **fields)


if __name__ == "__main__":
    main()
