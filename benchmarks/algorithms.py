"""Every algorithm on Blackjack-v1 with the embedded default model: learning curves and policy maps.

    python benchmarks/algorithms.py --threads 1                      # the committed results
    python benchmarks/algorithms.py --algorithms ppo dqn --seeds 0   # a subset
    python benchmarks/algorithms.py --merge results/parts/a.json results/parts/b.json --name algorithms

Each (algorithm, seed) starts from the same untrained agent (``rllama.agents.BlackjackAgent``,
scoring "stick"/"hit") with the algorithm's default config and trains on 16 vector envs for
``--episodes`` episodes. Every ``--map-every`` episodes it reads the greedy **policy map** (the
action in each of the 280 decision states at an episode's first step) and its exact value
(``rllama.agents.blackjack.policy_value``: no sampling noise, a few seconds); at the end it is
evaluated greedily on ``--eval-episodes`` fixed deals (env seeds 10000+). Writes
``results/<name>.json`` (table, curves against episodes and wall time, final maps),
``results/<name>.png`` (curves) and ``results/<name>_policy.png`` (maps beside the optimal one).
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
from common import (  # noqa: E402
    EVAL_SEED,
    REFERENCE_RETURNS,
    REFERENCE_STYLES,
    RESULTS,
    chunk_seed,
    plot_policy_map,
    save_figure,
    versions,
)

ALGORITHMS = ["ppo", "a2c", "reinforce", "grpo", "dqn", "sac"]
COLORS = {"ppo": "tab:blue", "a2c": "tab:purple", "reinforce": "tab:brown", "grpo": "tab:cyan", "dqn": "tab:pink",
          "sac": "tab:gray"}


def label(run: dict) -> str:
    """A run's label: its algorithm, the policy head if its config has one, the adapter if it trains
    beside one, and the agent when it is not the demo's."""
    config = run.get("config", {})
    head = " + policy head" if config.get("policy_head") else ""
    agent = f" ({run['agent']} agent)" if run.get("agent", "demo") != "demo" else ""
    decay = f", lr decayed from {config.get('lr_decay_start', 0)}" if config.get("lr_decay_episodes") else ""
    adapter = " + adapter" if head and config.get("train_adapter") is True else ""
    return run["algorithm"] + head + adapter + agent + decay


def user_agent_class(keep_history: bool = True):
    """A Blackjack agent as a user writes it from the README (issue 41, item 3): its own prompt and
    hooks, scoring "stand"/"hit", and the chat history kept (``keep_history = True``: every prompt
    shows the episode's earlier turns; ``False`` for the ``user-no-history`` probe). It inherits only
    :class:`BlackjackAgent`'s policy-map machinery, which reads the policy at an episode's first step,
    where no earlier turn exists."""
    from rllama.agents import BlackjackAgent

    class UserBlackjackAgent(BlackjackAgent):
        def get_system_prompt(self):
            return ("You are a Blackjack player. Try to beat the dealer: finish closer to 21 than the dealer "
                    "without going over. Answer 'hit' to draw a card or 'stand' to keep your hand.")

        def format_observation(self, observation):
            player, dealer, ace = (int(x) for x in observation)
            return f"Player sum: {player}. Dealer card: {dealer}. Usable ace: {'yes' if ace else 'no'}. Stand or hit?"

        def get_valid_actions(self, observation):
            return ["stand", "hit"]

        def extract_action(self, response):
            return 1 if "hit" in response.lower() else 0

    UserBlackjackAgent.keep_history = keep_history
    return UserBlackjackAgent


def readme_scoring_agent_class():
    """The RLlama README's Blackjack agent (``generation.readme_agent_class``: its prompt, "stay" or "hit")
    scoring the two words instead of writing them, without the history: the generate-mode benchmark's
    agent in scoring mode, to tell its prompt's prior from the generating path."""
    from generation import readme_agent_class

    from rllama.agents import BlackjackAgent

    readme = readme_agent_class()

    class ReadmeScoringAgent(BlackjackAgent):
        get_system_prompt = readme.get_system_prompt
        format_observation = readme.format_observation
        extract_action = readme.extract_action

        def get_valid_actions(self, observation):
            return ["stay", "hit"]

    ReadmeScoringAgent.keep_history = False
    return ReadmeScoringAgent


def color(label: str) -> str:
    if "decayed" in label:
        return "navy"
    return COLORS.get(label.split(" ")[0].rstrip(","), "black")


def _map_point(agent, t_train: float, deals=None) -> dict:
    """The greedy policy map's exact value and agreement; with ``deals`` (``(envs, episodes)``) also the greedy
    return on those fixed deals (what counts for an agent whose later steps see more than the map's states)."""
    from rllama.agents.blackjack import agreement, policy_value

    policy = agent.policy_map()
    point = {"episodes": agent.total_episodes, "steps": agent.total_steps, "train_s": t_train,
             "map_value": policy_value(policy), "agreement": agreement(policy)}
    if deals is not None:
        point["deals"] = agent.evaluate(deals[0], deals[1], seed=EVAL_SEED)["mean_return"]
    return point


def run(algorithm: str, seed: int, args) -> dict:
    import gymnasium as gym

    from rllama.agents import BlackjackAgent
    from rllama.agents.blackjack import STATES

    t0 = time.perf_counter()
    config = json.loads(args.config).get(algorithm) if args.config else None
    agent_class = (BlackjackAgent if args.agent == "demo" else readme_scoring_agent_class() if args.agent == "readme"
                   else user_agent_class(keep_history=args.agent == "user"))
    extra = json.loads(args.agent_args) if args.agent_args else {}
    agent = agent_class(args.model, seed=seed, algorithm=algorithm, algorithm_config=config,
                        precision=args.precision, **extra)
    envs = gym.make_vec("Blackjack-v1", num_envs=args.envs, vectorization_mode="sync", sab=True)
    deals = (envs, args.eval_episodes) if args.deals_at_maps else None
    curve, updates, train_s, chunk = [_map_point(agent, 0.0, deals)], [], 0.0, 0
    while agent.total_episodes < args.episodes:
        start = time.perf_counter()
        updates += [{k: float(v) for k, v in st.items()}
                    for st in agent.train(envs, 16, seed=chunk_seed(seed, chunk, envs), progress=False)]
        train_s += time.perf_counter() - start
        chunk += 1
        if agent.total_episodes % args.map_every < 16 or agent.total_episodes >= args.episodes:
            curve.append(_map_point(agent, train_s, deals))
            point = curve[-1]
            on_deals = f", {point['deals']:+.3f} on the deals" if deals else ""
            print(f"{algorithm} seed {seed} episodes {point['episodes']:5d}: map value {point['map_value']:+.3f}, "
                  f"agreement {point['agreement']:.0%}{on_deals} ({train_s:.0f} s training)", flush=True)
    final = agent.evaluate(envs, args.eval_episodes, seed=EVAL_SEED)
    policy = agent.policy_map()
    result = {"algorithm": algorithm, "agent": args.agent, "seed": seed, "curve": curve, "updates": updates,
              "trained": final["mean_return"], "trained_stderr": final["stderr"],
              "map_value": curve[-1]["map_value"], "agreement": curve[-1]["agreement"],
              "policy": [policy[s] for s in STATES], "train_s": train_s,
              "config": {k: v for k, v in vars(agent.algorithm.config).items()}, "wall_s": time.perf_counter() - t0}
    print(f"{algorithm} seed {seed}: {final['mean_return']:+.3f} ± {final['stderr']:.3f} on {args.eval_episodes} "
          f"fixed deals, {train_s / 60:.1f} min training", flush=True)
    envs.close()
    del agent, envs
    gc.collect()  # one process runs many agents: free each model before the next
    return result


TARGET = -0.08  # issue 21: every algorithm at least this, greedy


def first_reaching(run: dict, target: float = TARGET, key: str = "map_value") -> dict | None:
    """The first point of a run whose policy map (``key="deals"``: return on the fixed deals) is worth at
    least ``target``: its episodes and training minutes."""
    point = next((p for p in run["curve"] if p.get(key, -2.0) >= target), None)
    return None if point is None else {"episodes": point["episodes"], "train_min": point["train_s"] / 60}


def summarise(runs: list[dict]) -> dict:
    table = {}
    for algorithm in dict.fromkeys(label(r) for r in runs):
        rs = [r for r in runs if label(r) == algorithm]
        after = np.array([r["trained"] for r in rs])
        table[algorithm] = {
            "trained_mean": float(after.mean()), "trained_min": float(after.min()), "trained_max": float(after.max()),
            "map_value_mean": float(np.mean([r["map_value"] for r in rs])),
            "agreement_mean": float(np.mean([r["agreement"] for r in rs])),
            "agreement_max": float(np.max([r["agreement"] for r in rs])),
            "episodes": rs[0]["curve"][-1]["episodes"],
            "train_min_mean": float(np.mean([r["train_s"] for r in rs]) / 60),
            "seeds": [r["seed"] for r in rs],
            f"first_map_at_least_{TARGET}": [first_reaching(r) for r in rs],  # per seed; None: never
            **({f"first_deals_at_least_{TARGET}": [first_reaching(r, key="deals") for r in rs]}
               if all("deals" in r["curve"][0] for r in rs) else {}),
        }
    return table


def plot(result: dict, path: Path) -> None:
    """Exact value of the greedy policy map against episodes (left) and training time (middle), each seed
    a thin line and the mean a thick one; right: the return on the fixed deals, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, tx, bx) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 3, 2]})
    table = result["table"]
    for algorithm in table:
        rs = [r for r in result["runs"] if label(r) == algorithm]
        n = min(len(r["curve"]) for r in rs)
        y = np.array([[p["map_value"] for p in r["curve"][:n]] for r in rs])
        x = np.array([[p["episodes"] for p in r["curve"][:n]] for r in rs]).mean(0)
        t = np.array([[p["train_s"] / 60 for p in r["curve"][:n]] for r in rs]).mean(0)
        for axis, xs in ((ax, x), (tx, t)):
            for row in y:
                axis.plot(xs, row, color=color(algorithm), lw=0.7, alpha=0.5)
            axis.plot(xs, y.mean(0), color=color(algorithm), lw=2.2, label=f"{algorithm} (mean of {len(rs)})")
    for name, value in REFERENCE_RETURNS.items():
        for axis in (ax, tx, bx):
            axis.axhline(value, ls="--", lw=1, color=REFERENCE_STYLES[name],
                         label=f"{name} ({value:+.3f})" if axis is ax else None)
    names = list(table)
    for i, algorithm in enumerate(names):
        rs = [r for r in result["runs"] if label(r) == algorithm]
        bx.bar(i, table[algorithm]["trained_mean"], width=0.6, color=color(algorithm), alpha=0.6)
        bx.plot([i] * len(rs), [r["trained"] for r in rs], "k.", ms=8, label="each seed" if i == 0 else None)
    bx.set_xticks(range(len(names)), [n.replace(" + policy head", "\n+ head").replace(", lr decayed", "\nlr decayed")
                                      .replace(" (", "\n(").replace("-no-history agent)", ",\nno history)")
                                      .replace(" agent)", ")") for n in names], fontsize=7)
    bx.set_ylabel(f"greedy mean return, {result['config']['eval_episodes']} fixed deals")
    bx.set_title("after training")
    bx.legend(fontsize=8, loc="lower right")
    for axis in (ax, tx, bx):
        axis.set_ylim(-0.45, 0.0)
        axis.grid(alpha=0.3)
    ax.set_xlabel("training episodes")
    tx.set_xlabel("training time, minutes (evaluation excluded)")
    ax.set_ylabel("exact value of the greedy policy map")
    ax.set_title("Blackjack-v1 (sab), SmolLM2-135M + LoRA (top 8 blocks)")
    tx.set_title(result["versions"].get("cpu", ""), fontsize=9)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    save_figure(fig, path)


def plot_policies(result: dict, path: Path) -> None:
    """The final greedy policy map of each algorithm (the seed with the median map value) beside the optimal one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rllama.agents.blackjack import STATES, optimal_policy

    maps = [("optimal", optimal_policy(), "")]
    for algorithm in result["table"]:
        rs = sorted((r for r in result["runs"] if label(r) == algorithm), key=lambda r: r["map_value"])
        r = rs[len(rs) // 2]
        maps.append((f"{algorithm} seed {r['seed']}", dict(zip(STATES, r["policy"])),
                     f"value {r['map_value']:+.3f}, {r['agreement']:.0%} optimal"))
    fig, axes = plt.subplots(2, len(maps), figsize=(2.3 * len(maps), 7), gridspec_kw={"height_ratios": [18, 10]})
    axes = np.array(axes).reshape(2, len(maps))
    for k, (title, policy, note) in enumerate(maps):
        plot_policy_map(axes[:, k], policy, f"{title}\n{note}" if note else title)
    fig.suptitle("Greedy policy maps at an episode's first step: hit dark, stick light, x = differs from optimal",
                 fontsize=10)
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
    plot_policies(result, RESULTS / f"{args.name}_policy.png")
    print_table(result)


def print_table(result: dict) -> None:
    for algorithm, row in result["table"].items():
        reached = ", ".join("never" if p is None else f"{p['episodes']} ({p['train_min']:.1f} min)"
                            for p in row.get(f"first_map_at_least_{TARGET}", []))
        print(f"{algorithm:10s} {row['trained_mean']:+.3f} on the fixed deals (seeds {row['trained_min']:+.3f}.."
              f"{row['trained_max']:+.3f}), map value {row['map_value_mean']:+.3f}, {row['agreement_mean']:.0%} of "
              f"states optimal, {row['episodes']} episodes, {row['train_min_mean']:.1f} min; "
              f"map >= {TARGET} first at: {reached}")
        if f"first_deals_at_least_{TARGET}" in row:
            print(" " * 11 + f"fixed deals >= {TARGET} first at: " + ", ".join(
                "never" if p is None else f"{p['episodes']} ({p['train_min']:.1f} min)"
                for p in row[f"first_deals_at_least_{TARGET}"]))


def center_logit_gradients(alpha: float) -> None:
    """The ``--centered-gradient`` probe: wraps the scoring rule so that, in a gradient step, the gradient
    of each candidate position's logit has ``alpha`` times its mean over the minibatch removed (Blackjack's
    steps all score ["stick", "hit"], so rows alternate between the two)."""
    from rllama.policy import scoring

    plain = scoring.ScoreRule.logits

    def logits(self, enc):
        out = plain(self, enc)
        if out.requires_grad and out.shape[0] % 2 == 0:
            def centre(grad):
                grad = grad.clone()
                for k in (0, 1):
                    grad[k::2] -= alpha * grad[k::2].mean()
                return grad
            out.register_hook(centre)
        return out

    scoring.ScoreRule.logits = logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=3200, help="training episodes per run")
    parser.add_argument("--map-every", type=int, default=320, help="episodes between two policy maps")
    parser.add_argument("--eval-episodes", type=int, default=1000, help="fixed deals of the final evaluation")
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--agent", choices=["demo", "user", "user-no-history", "readme"], default="demo",
                        help="demo: rllama.agents.BlackjackAgent (no history in its prompts); user: a user's own "
                             "hooks with the history kept (issue 41, item 3); user-no-history: the same hooks "
                             "with keep_history = False; readme: the RLlama README's agent (generate_learning.py's) "
                             "scoring 'stay'/'hit'")
    parser.add_argument("--model", default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--config", default="", help='JSON {algorithm: {field: value}} overriding the defaults')
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default="algorithms")
    parser.add_argument("--centered-gradient", type=float, default=0.0, metavar="ALPHA",
                        help="probe (issue 41), not library behaviour: remove ALPHA times the minibatch mean from "
                             "the gradient of every candidate's logit (per candidate position), so an update "
                             "pushes every state's preference the same way ALPHA-times less")
    parser.add_argument("--agent-args", default="", help="more arguments of the agent, as JSON")
    parser.add_argument("--deals-at-maps", action="store_true",
                        help="also play the --eval-episodes fixed deals greedily at every policy map (not counted "
                             "in the training time)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine result files of runs made in parallel into --name, then stop")
    args = parser.parse_args()
    if args.merge:
        merge(args)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.centered_gradient:
        center_logit_gradients(args.centered_gradient)
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
    plot_policies(result, RESULTS / f"{args.name}_policy.png")
    print_table(result)


if __name__ == "__main__":
    main()
