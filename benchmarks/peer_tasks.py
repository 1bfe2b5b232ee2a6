"""The peers' own tasks on held-out maps and levels: FrozenLake (slippery, random 4×4 maps) and Sokoban
(6×6, one box, at most 10 actions), as RAGEN sets them, with RAGEN's published figures beside ours.

    python benchmarks/peer_tasks.py --task frozenlake --algorithms dqn ppo grpo gigpo --seeds 0 1 2
    python benchmarks/peer_tasks.py --task frozenlake --report          # table and PNG from the finished runs
    python benchmarks/peer_tasks.py --task sokoban --algorithms ppo --seeds 0 --checkpoint .cache/peer_tasks \
        --train-minutes 40                                               # one sitting; run again to resume

Each (task, algorithm, seed) run trains on training maps/levels (seeds 0-999) and is evaluated
greedily on the same held-out ones (seeds 10000+, never trained on) before training and every
``--eval-every`` episodes. A finished run is kept in ``results/parts/peer_tasks/`` and skipped when the
command is run again, so the benchmark resumes across sessions (with ``--checkpoint``, a larger
``--episodes`` extends a finished run; the table compares every run at the budget all of them
reached); ``--report`` (or the end of a run)
writes ``results/peer_tasks_<task>.json`` and ``.png`` from every finished run. Baselines: random
valid actions, the untrained agent, and the upper bound (FrozenLake: the optimal success of each
held-out map within the step limit, by value iteration; Sokoban: every generated level is solvable
within the step limit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_SEED, RESULTS, add_common_args, save_figure, set_threads, versions  # noqa: E402

PARTS = RESULTS / "parts" / "peer_tasks"
TRAIN_MAPS = range(0, 1000)
HELD_OUT = range(10_000, 10_100)

RAGEN = {  # RAGEN paper, Table 3: Qwen2.5-0.5B-Instruct, 200 training iterations on GPUs (veRL + vLLM)
    "frozenlake": {"low": 0.12, "high": 0.21, "model": "Qwen2.5-0.5B-Instruct", "budget": "200 iterations, GPUs"},
    "sokoban": {"low": 0.12, "high": 0.34, "model": "Qwen2.5-0.5B-Instruct", "budget": "200 iterations, GPUs"},
}


def make_env(task: str, maps):
    import gymnasium as gym

    import rllama  # noqa: F401  (registers the envs)

    if task == "frozenlake":
        return gym.make("rllama/FrozenLake-v0", maps=maps, is_slippery=True)
    return gym.make("rllama/Sokoban-v0", levels=maps)


def make_vec(task: str, maps, n: int):
    import gymnasium as gym

    return gym.vector.SyncVectorEnv([lambda: make_env(task, maps) for _ in range(n)])


def agent_class(task: str):
    from rllama.agents import FrozenLakeAgent

    if task == "frozenlake":
        return FrozenLakeAgent
    from rllama.agents.sokoban import SokobanAgent

    return SokobanAgent


def success(task: str, returns) -> float:
    """Share of solved episodes: FrozenLake pays 1 only at the goal; Sokoban's solved bonus (+10) outweighs
    every step penalty of an episode."""
    threshold = 0.5 if task == "frozenlake" else 5.0
    return float(np.mean(np.asarray(returns) > threshold))


def evaluate(agent, task: str, episodes: int, envs: int) -> dict:
    """Greedy success on the held-out maps/levels: ``envs`` sub-envs seeded ``EVAL_SEED + i`` once, each
    playing its share of the episodes; a sub-env's resets draw the same maps/levels whatever the policy
    does, so every policy meets the same ones (:func:`eval_slots`)."""
    vec = make_vec(task, HELD_OUT, envs)
    result = agent.evaluate(vec, episodes, seed=EVAL_SEED)
    vec.close()
    return {"success": success(task, result["returns"]), "mean_return": result["mean_return"],
            "episodes": agent.total_episodes, "steps": agent.total_steps}


def eval_slots(episodes: int, envs: int) -> list[tuple[int, bool]]:
    """The evaluation's episodes as :func:`evaluate` plays them: per sub-env ``i`` (seeded ``EVAL_SEED + i``
    at its first reset, then reset unseeded), its share of the episodes; ``(i, first)`` each."""
    quota = [episodes // envs + (1 if i < episodes % envs else 0) for i in range(envs)]
    return [(i, k == 0) for i in range(envs) for k in range(quota[i])]


def baselines(task: str, episodes: int, envs: int) -> dict:
    """Random valid actions, a fixed rule on what the described candidates say, and the upper bound, on the
    evaluation episodes (the same maps/levels as the agents')."""
    rng = np.random.default_rng(0)
    results = {}
    for name in ("random", "rule"):
        returns, bounds = [], []
        subs = [make_env(task, HELD_OUT) for _ in range(envs)]
        for i, first in eval_slots(episodes, envs):
            env = subs[i]
            env.reset(seed=EVAL_SEED + i if first else None)
            core = env.unwrapped
            bounds.append(core.optimal_success() if task == "frozenlake" else 1.0)
            total, done = 0.0, False
            while not done:
                action = int(rng.integers(4)) if name == "random" else rule(task, core, rng)
                _, r, terminated, truncated, _ = env.step(action)
                total, done = total + float(r), terminated or truncated
            returns.append(total)
        results[name] = success(task, returns)
    results["upper_bound"] = float(np.mean(bounds))
    return results


def rule(task: str, core, rng) -> int:
    """A fixed policy on the facts the described candidates state (no learning): FrozenLake, the move with the
    fewest holes among its three outcomes, then the nearest to the goal on average; Sokoban, push onto the
    target, else push closer, else walk toward the box, else anything but a push away or a bump (ties at
    random)."""
    if task == "frozenlake":
        n, (row, col) = core.size, divmod(core._position, core.size)
        offsets = [(0, -1), (1, 0), (0, 1), (-1, 0)]  # left, down, right, up

        def cost(action: int) -> tuple[int, int]:
            holes = distance = 0
            for turn in (-1, 0, 1):
                dr, dc = offsets[(action + turn) % 4]
                r, c = (row + dr, col + dc) if 0 <= row + dr < n and 0 <= col + dc < n else (row, col)
                holes += core.desc[r][c] == "H"
                distance += (n - 1 - r) + (n - 1 - c)
            return holes, distance

        return min(range(4), key=cost)
    from rllama.envs.sokoban import move

    level, box, player = core.level, core._box, core._player

    def distance(a, b) -> int:
        return abs(a[0] - b[0]) + abs(a[1] - b[1])

    def rank(action: int) -> float:
        new_box, new_player = move(level, box, player, action)
        if new_player == player:
            order = 5
        elif new_box != box:
            order = 0 if new_box == level.target else 1 if distance(new_box, level.target) < distance(
                box, level.target) else 4
        else:
            order = 2 if distance(new_player, box) < distance(player, box) else 3
        return order + 0.5 * rng.random()

    return min(range(4), key=rank)


def run(task: str, algorithm: str, seed: int, args) -> dict | None:
    """Train and evaluate one (task, algorithm, seed); ``None`` when ``--train-minutes`` ended the sitting first
    (with ``--checkpoint`` the next sitting resumes where this one stopped)."""
    from rllama.checkpoint import load_training_state, save_training_state

    label = algorithm + (f"-{args.variant}" if args.variant else "")
    path = args.parts / f"{task}-{label}-seed{seed}.json"
    if path.exists():
        done = json.loads(path.read_text())
        extend = args.checkpoint and done["curve"][-1]["episodes"] < args.episodes
        if not extend:
            print(f"{path.name}: done before, kept")
            return done
        print(f"{path.name}: done at {done['curve'][-1]['episodes']} episodes; extending to {args.episodes}")
    t0 = time.perf_counter()
    config = json.loads(args.config) if args.config else None
    extra = json.loads(args.agent_args) if args.agent_args else {}
    settings = {"episodes": args.episodes, "eval_every": args.eval_every, "eval_episodes": args.eval_episodes,
                "envs": args.envs, "config": config, "describe": args.describe, "model": args.model,
                "precision": args.precision, **({"agent_args": extra} if extra else {})}
    agent = agent_class(task)(args.model, seed=seed, algorithm=algorithm, algorithm_config=config,
                              precision=args.precision, describe=args.describe, **extra)
    settings["score_normalization"] = agent.policy.score_normalization  # the agent's default may change
    envs = make_vec(task, TRAIN_MAPS, args.envs)
    state = Path(args.checkpoint) / f"{task}-{label}-seed{seed}" if args.checkpoint else None
    if state is not None and state.exists():
        saved = load_training_state(agent, state)
        if {**saved["settings"], "episodes": None} != {**settings, "episodes": None}:  # a budget may grow
            raise SystemExit(f"--checkpoint {state} was trained with {saved['settings']}, not {settings}: resume "
                             "with its settings or use another --checkpoint folder")
        curve, chunk, spent = saved["curve"], saved["chunk"], saved["wall_s"]
        print(f"{task} {algorithm} seed {seed}: resumed after {agent.total_episodes} episodes", flush=True)
    else:
        curve, chunk, spent = [evaluate(agent, task, args.eval_episodes, args.envs)], 0, 0.0
        print(f"{task} {algorithm} seed {seed}: untrained success {curve[0]['success']:.3f}", flush=True)

    def save_state() -> None:
        if state is not None:
            save_training_state(agent, state, extra={"settings": settings, "curve": curve, "chunk": chunk,
                                                     "wall_s": spent + time.perf_counter() - t0})

    save_state()
    while agent.total_episodes < args.episodes:
        if args.train_minutes and time.perf_counter() - t0 > 60 * args.train_minutes:
            print(f"{task} {algorithm} seed {seed}: sitting over after {agent.total_episodes} episodes", flush=True)
            return None
        agent.train(envs, min(args.eval_every, args.episodes - agent.total_episodes),
                    seed=seed * 1_000_003 + chunk * args.envs, progress=False)
        chunk += 1
        curve.append(evaluate(agent, task, args.eval_episodes, args.envs))
        print(f"{task} {algorithm} seed {seed}: {agent.total_episodes} episodes, held-out success "
              f"{curve[-1]['success']:.3f} ({spent + time.perf_counter() - t0:.0f} s)", flush=True)
        save_state()
    record = {"task": task, "algorithm": algorithm, "variant": args.variant, "label": label, "seed": seed,
              "curve": curve, "settings": settings,
              "untrained": curve[0]["success"], "trained": curve[-1]["success"],
              "best": max(c["success"] for c in curve), "wall_s": spent + time.perf_counter() - t0,
              "versions": versions(), "command": "python " + " ".join(sys.argv)}
    args.parts.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def report(task: str, args) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(args.parts.glob(f"{task}-*.json"))]
    if not runs:
        raise SystemExit(f"no finished {task} runs in {args.parts}")
    for r in runs:
        r.setdefault("label", r["algorithm"])
    floor = baselines(task, args.eval_episodes, args.envs)
    table = {}
    budget = min(r["curve"][-1]["episodes"] for r in runs)  # every run has an evaluation there: equal episodes

    def at(run: dict, episodes: int) -> float:
        return next(c["success"] for c in run["curve"] if c["episodes"] == episodes)

    for algorithm in sorted({r["label"] for r in runs}):
        mine = [r for r in runs if r["label"] == algorithm]
        trained = np.array([at(r, budget) for r in mine])
        final = np.array([r["curve"][-1]["success"] for r in mine])
        table[algorithm] = {"seeds": [r["seed"] for r in mine], "episodes": budget,
                            "untrained": float(np.mean([r["untrained"] for r in mine])),
                            "trained": [float(v) for v in trained], "trained_mean": float(trained.mean()),
                            "trained_std": float(trained.std(ddof=1)) if len(trained) > 1 else 0.0,
                            "final_episodes": [r["curve"][-1]["episodes"] for r in mine],
                            "final_mean": float(final.mean()),
                            "wall_s_mean": float(np.mean([r["wall_s"] for r in mine]))}
    result = {"benchmark": "peer_tasks", "task": task, "held_out": [HELD_OUT.start, HELD_OUT.stop],
              "eval_episodes": args.eval_episodes, "baselines": floor, "table": table,
              "ragen": {**RAGEN[task], "theirs": True}, "versions": versions(),
              "command": "python " + " ".join(sys.argv), "runs": runs}
    out = RESULTS if args.parts == PARTS else args.parts  # probes' tables stay beside their parts
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peer_tasks_{task}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"peer_tasks_{task}.png")
    for name, row in table.items():
        print(f"{task} {name}: untrained {row['untrained']:.3f} -> {row['trained_mean']:.3f} "
              f"± {row['trained_std']:.3f} after {budget} episodes over seeds {row['seeds']} (at the end, "
              f"{row['final_episodes']} episodes: {row['final_mean']:.3f})")
    print(f"{task} random {floor['random']:.3f}, fixed rule on the described moves {floor['rule']:.3f}, upper bound "
          f"{floor['upper_bound']:.3f}, RAGEN 0.5B "
          f"{RAGEN[task]['low']:.2f}-{RAGEN[task]['high']:.2f} (theirs)")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["table"])
    trained = [result["table"][n]["trained_mean"] for n in names]
    errors = [result["table"][n]["trained_std"] if len(result["table"][n]["seeds"]) > 1 else np.nan for n in names]
    untrained = [result["table"][n]["untrained"] for n in names]
    x = np.arange(len(names))
    bars.bar(x - 0.2, untrained, 0.4, color="#bbbbbb", label="untrained (ours, 135M)")
    budget = result["table"][names[0]]["episodes"]
    bars.bar(x + 0.2, trained, 0.4, yerr=errors, capsize=3, color="tab:blue",
             label=f"after {budget} episodes (ours, 135M, CPU)")
    for i, name in enumerate(names):  # each seed's figure on its bar
        per_seed = result["table"][name]["trained"]
        bars.plot([x[i] + 0.2] * len(per_seed), per_seed, "k.", ms=4)
    bars.axhline(result["baselines"]["random"], color="tab:red", ls=":", label="random valid actions")
    bars.axhline(result["baselines"]["rule"], color="tab:purple", ls="-.", label="fixed rule on the described moves")
    bars.axhline(result["baselines"]["upper_bound"], color="tab:green", ls="--", label="upper bound")
    ragen = result["ragen"]
    bars.axhspan(ragen["low"], ragen["high"], color="tab:orange", alpha=0.25,
                 label=f"RAGEN {ragen['model']}, {ragen['budget']} (theirs)")
    bars.set_xticks(x, names)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("held-out success rate")
    bars.set_title(f"{result['task']}: held-out success ({result['eval_episodes']} fixed episodes)")
    bars.legend(fontsize=7)
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}  # one colour an algorithm, a line a seed
    for r in sorted(result["runs"], key=lambda r: (r["label"], r["seed"])):
        seeds = result["table"][r["label"]]["seeds"]
        curves.plot([c["episodes"] for c in r["curve"]], [c["success"] for c in r["curve"]], marker=".",
                    color=colours[r["label"]], alpha=0.8,
                    label=f"{r['label']} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"
                    if r["seed"] == min(seeds) else None)
    curves.set_ylim(0, 1.05)
    curves.set_xlabel("training episodes")
    curves.set_ylabel("held-out success rate")
    curves.set_title("learning curves")
    curves.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "peer_tasks")
    parser.add_argument("--task", choices=["frozenlake", "sokoban"], required=True)
    parser.add_argument("--algorithms", nargs="+", default=["dqn", "ppo", "grpo", "gigpo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=1000, help="training episodes a run")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--config", help="algorithm config as JSON")
    parser.add_argument("--agent-args", help="more arguments of the agent, as JSON (e.g. '{\"temperature\": 2}')")
    parser.add_argument("--variant", default="", help="a name for runs with other settings (--config, --describe): "
                        "their parts and table rows read <algorithm>-<variant>")
    parser.add_argument("--parts", type=Path, default=PARTS, help="folder of finished runs (default: "
                        "results/parts/peer_tasks; elsewhere, the table and PNG are written there too)")
    parser.add_argument("--describe", type=int, default=1,
                        help="the agent's describe=...: 1 (each candidate move says what it leads to) or 0 (bare "
                             "move names)")
    parser.add_argument("--checkpoint", metavar="DIR", help="save each run's training state to DIR after every "
                        "evaluation and resume from it (a budget spread over several sittings)")
    parser.add_argument("--train-minutes", type=float, default=0, help="end this sitting after so many minutes")
    parser.add_argument("--report", action="store_true", help="only write the table and PNG from finished runs")
    args = parser.parse_args()
    set_threads(args)
    args.describe = bool(args.describe)
    finished = True
    if not args.report:
        for algorithm in args.algorithms:
            for seed in args.seeds:
                finished = run(args.task, algorithm, seed, args) is not None and finished
                if not finished:
                    break
            if not finished:
                break
    if finished or args.report:
        report(args.task, args)


if __name__ == "__main__":
    main()
