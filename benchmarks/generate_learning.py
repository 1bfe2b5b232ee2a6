"""Generate mode learning Blackjack: the RLlama README's agent, its replies and its return, as it trains.

    python benchmarks/generate_learning.py --threads 1                       # the committed results
    python benchmarks/generate_learning.py --variants verbatim --episodes 32  # a smoke run
    python benchmarks/generate_learning.py --merge results/parts/a.json results/parts/b.json --name c  # side by side

The agent is the RLlama README's Blackjack agent (``generation.readme_agent_class``: it asks for "stay"
or "hit" and ``extract_action`` is ``0 if "stay" in reply else 1``), trained by PPO with its defaults on
16 vector envs, generating on the default backend (llama.cpp where installed), one variant per process:

- ``verbatim``: the hooks as the README writes them;
- ``format``: the same, plus ``is_valid_reply`` (a reply is valid when it says "stay" or "hit"),
  ``format_penalty=-0.1`` (RAGEN's) and ``reply_prefix = "My answer:"`` (among the prefixes probed, the
  one after which the untrained model names an action most often: 7 of 15 sampled replies, none 2);
- ``choices``: the reply constrained to ``Choices("stay", "hit")`` (:mod:`rllama.replies`).

Each run logs, per update, the training return and the share of replies that name neither word (counted
in every variant; only ``format`` tells the agent, through ``is_valid_reply``),
and at the end plays ``--eval-episodes`` fixed deals greedily (env seeds 10000+) and reads the greedy
policy map (the action in each of the 280 decision states) and its exact value; with ``--sampled-map K``
also the sampled policy (K replies sampled in each state, as in training), which greedy decoding need
not follow. Writes ``results/<name>.json`` and ``.png``.

A long run sits across sessions with ``--checkpoint DIR --train-minutes M``: the training state is saved
to ``DIR/<name>-<variant>-seed<seed>`` after every ``--chunk`` episodes, a sitting ends after the first
chunk past ``M`` minutes, and the same command run again resumes there (bit for bit: the loop's random
state is in the checkpoint) until ``--episodes`` are trained and the evaluation runs::

    python benchmarks/generate_learning.py --variants verbatim --episodes 6400 --eval-episodes 1000 \
        --threads 1 --checkpoint .cache/generate_learning --train-minutes 150   # run again to resume
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
from common import (  # noqa: E402
    EVAL_SEED,
    REFERENCE_RETURNS,
    RESULTS,
    add_common_args,
    cpu_name,
    plot_policy_map,
    save_figure,
    save_partial,
    save_result,
    set_threads,
)

VARIANTS = ["verbatim", "format", "choices"]
SITTING_OVER = 3  # a child's exit status: trained as far as --train-minutes allowed, checkpoint saved
COLORS = {"verbatim": "tab:red", "format": "tab:blue", "choices": "tab:green"}


def named_action(reply: str) -> bool:
    """Whether a reply says one of the words the README agent's hooks look for."""
    text = reply.lower()
    return "stay" in text or "hit" in text


def agent_class(variant: str):
    from generation import readme_agent_class

    from rllama.replies import Choices

    base = readme_agent_class()
    if variant == "verbatim":
        return base
    if variant == "format":
        return type("StayOrHitFormat", (base,), {"reply_prefix": "My answer:",
                                                 "is_valid_reply": lambda self, reply: named_action(reply)})
    if variant == "choices":
        return type("StayOrHitChoices", (base,), {"reply_shape": Choices("stay", "hit")})
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def act_in_states(agent, states: list, greedy: bool) -> list[tuple[int, str]]:
    """The action and reply in each of ``states`` (Blackjack observations), each a fresh episode, 32 at a time."""
    out = []
    with agent.evaluating(greedy=greedy):
        for start in range(0, len(states), 32):
            chunk = states[start:start + 32]
            agent.reset()
            actions = agent.act_batch([(t, d, int(a)) for t, d, a in chunk])
            out += [(int(action), agent.last_replies[i]) for i, action in enumerate(actions)]
        agent.reset()
    return out


def greedy_map(agent) -> tuple[dict, float]:
    """The greedy action in each decision state, and the share of those replies that name an action."""
    from rllama.agents.blackjack import STATES

    acted = act_in_states(agent, STATES, greedy=True)
    policy = {state: action for state, (action, _) in zip(STATES, acted)}
    return policy, sum(named_action(reply) for _, reply in acted) / len(STATES)


def sampled_policy(agent, samples: int) -> dict:
    """Per decision state, the share of ``samples`` replies sampled as in training (a fresh episode
    each) whose action is hit: the policy PPO trains. Its mode is the action most replies take, which
    greedy decoding, following the likeliest token at each step, need not find: replies that stay
    share a few forms ("Stay.") while those that hit (any reply without "stay") are spread over many."""
    from rllama.agents.blackjack import STATES

    states = [s for s in STATES for _ in range(samples)]
    hits = dict.fromkeys(STATES, 0)
    for state, (action, _) in zip(states, act_in_states(agent, states, greedy=False)):
        hits[state] += action
    return {state: n / samples for state, n in hits.items()}


def run_variant(args) -> dict:
    """One variant: train, then evaluate greedily; the JSON of the run."""
    import gymnasium as gym

    from rllama.agents.blackjack import agreement, policy_value

    set_threads(args)
    counts = {"replies": 0, "named": 0}  # replies read since the last update, and those naming an action

    class Counted(agent_class(args.variant)):
        def extract_action(self, response):
            counts["replies"] += 1
            counts["named"] += named_action(response)
            return super().extract_action(response)

    cls = Counted
    kwargs = {"format_penalty": -0.1} if args.variant == "format" else {}
    kwargs.update(json.loads(args.agent_args) if args.agent_args else {})
    config = json.loads(args.algorithm_config) if args.algorithm_config else None
    kwargs = {"max_new_tokens": 32, **kwargs}  # LlamaGym's reply budget, unless --agent-args names another
    agent = cls(args.model, seed=args.seed, precision=args.precision, algorithm_config=config, **kwargs)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("Blackjack-v1", sab=True) for _ in range(16)])
    t0 = time.perf_counter()
    curve = []

    def log(stats):
        curve.append({"episodes": int(stats["rollout/total_episodes"]), "wall_s": time.perf_counter() - t0,
                      "mean_return": stats["rollout/mean_return"],
                      "invalid": stats.get("rollout/invalid_replies"),
                      "named": counts["named"] / max(counts["replies"], 1),
                      "parse_failures": stats.get("rollout/parse_failures"),
                      "kl_ref": stats.get("policy/kl_ref"), "entropy": stats.get("policy/entropy")})
        counts.update(replies=0, named=0)
        print(json.dumps(curve[-1]), flush=True)

    run_name = f"{Path(args.name).name}-{args.variant}-seed{args.seed}"
    state = Path(args.checkpoint) / run_name if args.checkpoint else None
    settings = {"variant": args.variant, "seed": args.seed, "algorithm_config": config, "agent_args": kwargs,
                "model": args.model, "precision": args.precision, "chunk": args.chunk}
    spent, chunk = 0.0, 0
    if state is not None and state.exists():
        from rllama.checkpoint import load_training_state

        saved = load_training_state(agent, state)
        if saved["settings"] != settings:
            raise SystemExit(f"--checkpoint {state} was trained with {saved['settings']}, not {settings}: resume "
                             "with those settings or use another --checkpoint folder")
        curve[:], spent, chunk = saved["curve"], saved["train_s"], saved["chunk"]
        print(f"# resumed after {agent.total_episodes} episodes ({spent / 60:.1f} min trained)", flush=True)
    t0 -= spent  # wall times continue from the sittings before
    sitting = time.perf_counter()
    while agent.total_episodes < args.episodes:
        if state is not None and args.train_minutes and time.perf_counter() - sitting > 60 * args.train_minutes:
            print(f"# sitting over after {agent.total_episodes} episodes; run the command again to resume",
                  flush=True)
            return None
        n = args.episodes - agent.total_episodes  # one call without --checkpoint, as the committed runs made
        if state is not None:
            n = min(args.chunk, n)
        agent.train(envs, n, seed=args.seed if chunk == 0 else args.seed * 1_000_003 + chunk * 16, progress=False,
                    callback=log)
        chunk += 1
        if state is not None:
            from rllama.checkpoint import save_training_state

            save_training_state(agent, state, extra={"settings": settings, "curve": curve, "chunk": chunk,
                                                     "train_s": time.perf_counter() - t0})
    train_s = time.perf_counter() - t0
    envs.close()
    policy, map_named = greedy_map(agent)
    sampled = sampled_policy(agent, args.sampled_map) if args.sampled_map else None
    env = gym.make("Blackjack-v1", sab=True)
    returns, replies = [], []
    with agent.evaluating(greedy=True):
        for i in range(args.eval_episodes):
            obs, _ = env.reset(seed=EVAL_SEED + i)
            done, total = False, 0.0
            while not done:
                action = agent.act(obs)
                replies.append(agent.last_reply)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += reward
                done = terminated or truncated
            agent.reset()
            returns.append(total)
    return {"variant": args.variant, "seed": args.seed, "algorithm_config": config, "agent_args": kwargs,
            "backend": type(agent.backend).__name__,
            "episodes": args.episodes, "env_steps": agent.total_steps, "train_s": train_s, "curve": curve,
            "eval_return": sum(returns) / len(returns), "eval_episodes": len(returns),
            "eval_named": sum(map(named_action, replies)) / len(replies), "eval_replies": replies[:12],
            "map_value": policy_value(policy), "map_agreement": agreement(policy), "map_named": map_named,
            "map_hits": sum(policy.values()), "policy": {f"{t},{d},{int(a)}": v for (t, d, a), v in policy.items()},
            **(sampled_fields(sampled, args.sampled_map) if sampled else {}),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def sampled_fields(sampled: dict, samples: int) -> dict:
    """The sampled policy's exact value, and its mode's (hit where most replies hit) value and agreement."""
    from rllama.agents.blackjack import agreement, policy_value

    mode = {state: int(p > 0.5) for state, p in sampled.items()}
    return {"sampled_samples": samples, "sampled_value": policy_value(sampled),
            "sampled_mode_value": policy_value(mode), "sampled_mode_agreement": agreement(mode),
            "sampled_hit": {f"{t},{d},{int(a)}": p for (t, d, a), p in sampled.items()}}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = result["runs"]
    several_seeds = len({r["seed"] for r in runs}) > 1
    fig, axes = plt.subplots(2, 2 + len(runs), figsize=(5 * 2 + 3.2 * len(runs), 7.5),
                             gridspec_kw={"width_ratios": [2.2, 2.2] + [1] * len(runs)})
    ret, inv = axes[0][0], axes[0][1]
    for j, run in enumerate(runs):
        c = COLORS.get(run["variant"], "black")
        label, style = run_label(run, several_seeds), ["-", "--", ":", "-."][j % 4] if several_seeds else "-"
        eps = [p["episodes"] for p in run["curve"]]
        ret.plot(eps, [p["mean_return"] for p in run["curve"]], color=c, ls=style, lw=0.9, label=f"{label} (training)")
        ret.scatter([run["episodes"]], [run["eval_return"]], color=c, marker="o", zorder=3)
        ret.scatter([run["episodes"]], [run["map_value"]], color=c, marker="*", s=90, zorder=3)
        inv.plot(eps, [1 - p["named"] for p in run["curve"]], color=c, ls=style, label=label)
        wall = axes[1][0]
        wall.plot([p["wall_s"] / 60 for p in run["curve"]], [p["mean_return"] for p in run["curve"]], color=c,
                  ls=style, lw=0.9, label=label)
    for name, value in REFERENCE_RETURNS.items():
        ret.axhline(value, color="gray", ls=":", lw=0.8)
        ret.text(0, value, name, fontsize=7, color="gray", va="bottom")
    ret.set(xlabel="training episodes", ylabel="return", ylim=(-1.05, 0.45),
            title="training return; greedy: fixed deals (o), map's value (*)")
    ret.legend(fontsize=7)
    inv.set(xlabel="training episodes", ylabel="share of replies", ylim=(-0.02, 1.02),
            title='replies naming neither "stay" nor "hit"')
    inv.legend(fontsize=7)
    axes[1][0].set(xlabel="training wall time (min)", ylabel="return per update", ylim=(-1.05, 0.45),
                   title="return against wall time")
    axes[1][1].axis("off")
    axes[1][1].text(0, 1, "\n\n".join(
        f"{run_label(r, several_seeds)} ({r['episodes']} episodes, {r['train_s'] / 60:.1f} min):\n  greedy "
        f"{r['eval_return']:+.3f} on {r['eval_episodes']} fixed deals\n  map {r['map_value']:+.3f}, "
        f"{r['map_agreement']:.0%} of states optimal\n  replies naming an action: {r['eval_named']:.0%}"
        + (f"\n  sampled ({r['sampled_samples']} a state): {r['sampled_value']:+.3f}; its mode "
           f"{r['sampled_mode_value']:+.3f} ({r['sampled_mode_agreement']:.0%})" if "sampled_value" in r else "")
        for r in runs)
        + "".join(f"\n\n{v}, mean of {m['runs']} runs: {m['eval_return']:+.3f}, map {m['map_value']:+.3f} "
                  f"({m['map_agreement']:.0%})" for v, m in result.get("means", {}).items())
        + f"\n\n{result['cpu']}", va="top", fontsize=8)
    for j, run in enumerate(runs):
        policy = {tuple(int(x) for x in k.split(",")): v for k, v in run["policy"].items()}
        policy = {(t, d, bool(a)): v for (t, d, a), v in policy.items()}
        plot_policy_map([axes[0][2 + j], axes[1][2 + j]], policy, run_label(run, several_seeds))
    save_figure(fig, path)


def run_label(run: dict, with_seed: bool) -> str:
    return f"{run['variant']} seed {run['seed']}" if with_seed else run["variant"]


def merge(paths: list[str], name: str) -> None:
    """One result of runs made apart (one seed each, say): their runs side by side, and per variant the
    means over them (``means``)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    unfinished = [p for p, part in zip(paths, parts) if part.get("benchmark") != "generate_learning"]
    if unfinished:
        raise SystemExit(f"--merge takes finished generate_learning results; not: {', '.join(unfinished)}")
    result = dict(parts[0])
    result["command"] = " && ".join(p["command"] for p in parts) + " && python " + " ".join(sys.argv)
    result["runs"] = [r for p in parts for r in p["runs"]]
    result["cpu"] = " / ".join(dict.fromkeys(p["cpu"] for p in parts))
    result["means"] = {}
    for variant in dict.fromkeys(r["variant"] for r in result["runs"]):
        mine = [r for r in result["runs"] if r["variant"] == variant]
        result["means"][variant] = {"runs": len(mine), **{k: sum(r[k] for r in mine) / len(mine) for k in (
            "eval_return", "map_value", "map_agreement", "eval_named", "train_s")}}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{name}.png")
    print(json.dumps(result["means"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "generate_learning", precision="auto")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=320)
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--algorithm-config", default="", help='JSON of PPO fields overriding the defaults')
    parser.add_argument("--agent-args", default="",
                        help='JSON of agent arguments, e.g. \'{"temperature": 2}\' or \'{"max_new_tokens": 8}\' '
                             '(32 unless named)')
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="save each run's training state to DIR every --chunk episodes and resume from it")
    parser.add_argument("--chunk", type=int, default=320, help="episodes between checkpoints (with --checkpoint)")
    parser.add_argument("--train-minutes", type=float, default=0,
                        help="with --checkpoint: end this sitting after the first chunk past this many minutes")
    parser.add_argument("--sampled-map", type=int, default=0, metavar="K",
                        help="also read the sampled policy: K replies sampled in each decision state")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine finished result files (e.g. one seed each) into results/<name>.json")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.name)
        return
    if args.checkpoint and args.chunk < 1:
        parser.error(f"--chunk must be at least 1; got {args.chunk}")
    if args.variant is not None:
        run = run_variant(args)
        if run is None:
            sys.exit(SITTING_OVER)
        Path(args.out).write_text(json.dumps(run))
        return
    runs = []
    for variant in args.variants:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--variant", variant, "--out", out, "--seed", str(args.seed),
               "--episodes", str(args.episodes), "--eval-episodes", str(args.eval_episodes),
               "--precision", args.precision, "--threads", str(args.threads), "--algorithm-config",
               args.algorithm_config, "--agent-args", args.agent_args, "--name", args.name, "--chunk", str(args.chunk),
               "--train-minutes", str(args.train_minutes), "--sampled-map", str(args.sampled_map)]
        if args.model:
            cmd += ["--model", args.model]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        print("#", variant, flush=True)
        status = subprocess.run(cmd).returncode
        if status == SITTING_OVER:
            save_partial(args.name, runs)
            raise SystemExit(f"{variant}: this sitting is over; run the same command again to resume")
        if status:
            raise SystemExit(f"{variant}: the run failed with exit status {status} (its output is above)")
        runs.append(json.loads(Path(out).read_text()))
        Path(out).unlink()
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("curve", "policy")}), flush=True)
        save_partial(args.name, runs)
    save_result("generate_learning", args, runs, plot, cpu=cpu_name())


if __name__ == "__main__":
    main()
