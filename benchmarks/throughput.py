"""Throughput: how close rllama's acting and updates come to the model's raw forward pass, and how far
they are ahead of a naive LlamaGym-style loop — all measured in one run.

    python benchmarks/throughput.py                          # the committed results (~25 min, 2 cores)
    python benchmarks/throughput.py --models tiny --quick    # a one-minute smoke run

For each model (the embedded SmolLM2-135M and a 2-layer tiny Llama with the same tokenizer), in a
fresh process per part (so peak memory is the part's own):

- ``acting``: Blackjack-v1 env steps/s with 1, 4, 16 and 64 vector envs, in scoring mode (the
  policy scores "stick"/"hit") and in generate mode (the policy writes up to ``--new-tokens``
  tokens), sampling as in training. Every forward the agent makes is recorded and replayed
  afterwards without the agent (``raw``: the same ``PolicyModel`` calls on the same token ids, i.e.
  the model time alone), and, for scoring, as a bare Hugging Face forward of each prompt with each
  candidate appended, padded into one batch (``bare``: no prefix sharing). Agent overhead =
  ours / raw - 1, in time per env step (scoring) or per generated token (generate).
- ``naive``: the loop LlamaGym users write: one env, ``model.generate`` for every step with the
  chat template, a full second copy of the model as the PPO reference, text parsing.
- ``update``: one PPO update on 16 Blackjack episodes: tokens/s (prompt + candidate tokens
  processed, counted as in ``rllama.algorithms.base.tokens_of``), peak RSS of the process, and the
  memory the update needs in principle: model weights + adapter and heads + their gradients and
  AdamW state + the activations autograd saves for one minibatch (measured with
  ``torch.autograd.graph.saved_tensors_hooks``). Peak RSS is reported also above the RSS of the
  process after importing torch and transformers (the interpreter's own share).
- ``async_env``: TextWorld with 8 envs, random admissible commands, ``SyncVectorEnv`` vs
  ``AsyncVectorEnv`` (``--skip-textworld`` to leave out).
- ``data_parallel``: PPO training env steps/s in one process vs two processes launched with
  ``torchrun`` (gloo), one thread each; both processes must end with identical weights.

Writes ``results/throughput.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, save_figure, save_result, tiny_model  # noqa: E402

ENV_COUNTS = [1, 4, 16, 64]
MODES = ["scoring", "generate"]


# ---------------------------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load(model_name: str, precision: str):
    """(model, tokenizer) of ``tiny`` or ``default``; the tiny model uses the default model's tokenizer."""
    from rllama.policy import load_model

    return tiny_model() if model_name == "tiny" else load_model(None)


def make_agent(model_name: str, mode: str, precision: str, new_tokens: int, **kwargs):
    from rllama.agents import BlackjackAgent

    cls = BlackjackAgent
    if mode == "generate":
        class GeneratingBlackjackAgent(BlackjackAgent):
            def get_valid_actions(self, observation):
                return None

        cls = GeneratingBlackjackAgent
    lm, tokenizer = load(model_name, precision)
    return cls(lm, tokenizer, seed=0, precision=precision, max_new_tokens=new_tokens, **kwargs)


class Recorder:
    """Wraps a PolicyModel's acting calls, recording their token ids and the time spent in them."""

    def __init__(self, policy) -> None:
        self.calls, self.seconds, self.env_steps = [], 0.0, 0
        self.policy = policy
        self._originals = {name: getattr(policy, name) for name in ("candidate_outputs", "generate")}
        for name, fn in self._originals.items():
            setattr(policy, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            tokens = sum(len(r.token_ids) for r in out) if name == "generate" else 0
            self.calls.append((name, args, kwargs, tokens))
            self.env_steps += len(args[0])  # one prompt per acting env
            return out

        return wrapped

    def restore(self) -> None:
        for name, fn in self._originals.items():
            setattr(self.policy, name, fn)


# ---------------------------------------------------------------------------------------------- parts
def part_acting(args) -> dict:
    import gymnasium as gym
    import torch

    from rllama.loops import run_episodes

    rows = []
    for mode in MODES:
        agent = make_agent(args.model_name, mode, args.precision, args.new_tokens)
        policy = agent.policy
        for n in args.env_counts:
            envs = gym.make_vec("Blackjack-v1", num_envs=n, vectorization_mode="sync", sab=True)
            target = max(args.min_steps, 3 * n)
            with agent.evaluating(greedy=False):
                run_episodes(agent, envs, n, seed=1)  # warm-up: first calls of each shape
                recorder = Recorder(policy)
                t0 = time.perf_counter()
                episodes = 0
                while recorder.env_steps < target:
                    run_episodes(agent, envs, n, seed=100 + episodes)
                    episodes += n
                wall = time.perf_counter() - t0
                recorder.restore()
            steps = recorder.env_steps
            calls = recorder.calls
            # raw: the same model calls on the same token ids, nothing else
            t = time.perf_counter()
            gen_tokens_raw = 0
            generator = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                for name, a, kw, _ in calls:
                    if name == "generate":
                        kw = dict(kw, generator=generator)
                        gen_tokens_raw += sum(len(r.token_ids) for r in policy.generate(*a, **kw))
                    else:
                        policy.candidate_outputs(*a, **kw)
            raw = time.perf_counter() - t
            row = {"mode": mode, "envs": n, "env_steps": steps, "wall_s": wall, "env_steps_per_s": steps / wall,
                   "model_calls": len(calls), "in_model_s": recorder.seconds, "raw_s": raw,
                   "raw_env_steps_per_s": steps / raw}
            if mode == "generate":
                gen_tokens = sum(c[3] for c in calls)
                row.update(generated_tokens=gen_tokens, raw_generated_tokens=gen_tokens_raw,
                           overhead=(wall / gen_tokens) / (raw / gen_tokens_raw) - 1)
            else:
                row["overhead"] = wall / raw - 1
                row["bare_s"] = bare_forward(policy, calls)
                row["bare_env_steps_per_s"] = steps / row["bare_s"]
            rows.append(row)
            print(f"[{args.model_name}] acting {mode:8s} envs {n:3d}: {row['env_steps_per_s']:7.1f} steps/s, "
                  f"raw {row['raw_env_steps_per_s']:7.1f}, overhead {100 * row['overhead']:+.0f}%", flush=True)
            envs.close()
        del agent, policy
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}


def bare_forward(policy, calls) -> float:
    """Seconds of a plain Hugging Face forward over every (prompt + candidate) row of the recorded calls."""
    import torch

    lm = policy.lm
    t = time.perf_counter()
    with torch.inference_mode(), lm.disable_adapter():
        for _name, a, _kw, _ in calls:
            prompts, candidates = a[0], a[1]
            seqs = [list(p) + list(c) for p, cands in zip(prompts, candidates) for c in cands]
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), policy.engine.parts.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, L - len(s):] = torch.as_tensor(s)
                mask[i, L - len(s):] = 1
            lm(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - t


def part_naive(args) -> dict:
    """LlamaGym's loop: one env, generate per step, a separate reference model held in memory."""
    import gymnasium as gym
    import torch

    from rllama.agents import BlackjackAgent

    lm, tokenizer = load(args.model_name, args.precision)
    lm.eval()
    reference = copy.deepcopy(lm)  # LlamaGym/TRL keep a second full model as the PPO reference
    env = gym.make("Blackjack-v1", sab=True)
    prompter = BlackjackAgent.__new__(BlackjackAgent)  # only its text hooks
    generator_seed = 0
    steps, t0 = 0, None
    obs, _ = env.reset(seed=0)
    messages = [{"role": "system", "content": prompter.get_system_prompt()}]
    warmup = 3
    while steps < args.naive_steps + warmup:
        if steps == warmup:
            t0 = time.perf_counter()
        messages.append({"role": "user", "content": prompter.format_observation(obs)})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        torch.manual_seed(generator_seed + steps)
        with torch.no_grad():
            out = lm.generate(**ids, max_new_tokens=args.new_tokens, do_sample=True, top_k=0, top_p=1.0,
                              pad_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        try:
            action = prompter.extract_action(reply)
        except ValueError:
            action = int(env.action_space.sample())
        obs, _r, terminated, truncated, _ = env.step(action)
        steps += 1
        if terminated or truncated:
            obs, _ = env.reset()
            messages = messages[:1]
    wall = time.perf_counter() - t0
    del reference
    return {"env_steps": args.naive_steps, "wall_s": wall, "env_steps_per_s": args.naive_steps / wall,
            "peak_rss_mb": peak_rss_mb()}


def part_update(args) -> dict:
    import gymnasium as gym
    import peft  # noqa: F401  (imported before the baseline is taken)
    import torch
    import transformers  # noqa: F401

    import rllama  # noqa: F401

    baseline = current_rss_mb()  # the interpreter with torch, transformers and peft loaded
    agent = make_agent(args.model_name, "scoring", args.precision, args.new_tokens,
                       algorithm_config={"policy_head": 0, "batch_episodes": 16, "minibatch_size": 16, "epochs": 1})
    envs = gym.make_vec("Blackjack-v1", num_envs=16, vectorization_mode="sync", sab=True)
    history = agent.train(envs, 16, seed=0, progress=False)  # warm-up update: first shapes, optimizer state
    assert len(history) == 1
    history = agent.train(envs, 16, seed=1, progress=False)
    stats = history[0]
    # The activations autograd keeps for one minibatch.
    algo = agent.algorithm
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    episodes = algo.buffer.episodes or []
    steps = [s for e in episodes for s in e.steps][: algo.config.minibatch_size]
    if not steps:
        agent.train(envs, 8, seed=2, progress=False)  # refill without an update (batch of 16)
        steps = [s for e in algo.buffer.episodes for s in e.steps][: algo.config.minibatch_size]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ev = agent.policy.evaluate_actions(steps)
        loss = ev.values.sum() + sum(d.sum() for d in ev.distributions)
    loss.backward()
    agent.policy.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in agent.policy.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in agent.policy.trainable_parameters())
    needed = weights + 4 * trainable + saved[0]  # weights, trainable + grads + two AdamW moments, activations
    peak = peak_rss_mb()
    return {"update_s": stats["time/update_s"], "tokens_per_s": stats["time/update_tokens_per_s"],
            "minibatches": stats["train/minibatches"], "rollout_steps": stats["rollout/steps"],
            "weights_mb": weights / 2**20, "trainable_mb": trainable / 2**20,
            "activations_mb": saved[0] / 2**20, "needed_mb": needed / 2**20,
            "peak_rss_mb": peak, "baseline_rss_mb": baseline, "peak_above_baseline_mb": peak - baseline,
            "peak_over_needed": peak / (needed / 2**20),
            "peak_above_baseline_over_needed": (peak - baseline) / (needed / 2**20)}


def part_async_env(args) -> dict:
    import gymnasium as gym

    from examples.textworld import FAMILY, TRAIN_SEEDS
    from rllama.envs.textworld_games import make_games

    games = make_games(FAMILY, seeds=TRAIN_SEEDS[:8])
    out = {}
    for mode in ("sync", "async"):
        # Text observations have no fixed size: AsyncVectorEnv must pass them by pipe, not shared memory.
        envs = gym.make_vec("rllama/TextWorld-v0", num_envs=8, vectorization_mode=mode, games=games,
                            max_episode_steps=20, admissible_commands_in_observation=True,
                            vector_kwargs={"shared_memory": False} if mode == "async" else {})
        obs, _ = envs.reset(seed=0)
        rng = np.random.default_rng(0)
        steps, t0 = 0, time.perf_counter()
        while steps < args.textworld_steps:
            actions = [str(rng.choice(c)) for c in obs["admissible_commands"]]
            obs, *_ = envs.step(actions)
            steps += 8
        wall = time.perf_counter() - t0
        envs.close()
        out[mode] = {"env_steps": steps, "wall_s": wall, "env_steps_per_s": steps / wall}
        print(f"TextWorld {mode:5s}: {steps / wall:.1f} env steps/s", flush=True)
    out["async_over_sync"] = out["async"]["env_steps_per_s"] / out["sync"]["env_steps_per_s"]
    return out


def dp_worker(args) -> None:
    """One process of the data-parallel measurement (launched by torchrun, or alone)."""
    import gymnasium as gym
    import torch

    torch.set_num_threads(1)
    agent = make_agent(args.model_name, "scoring", args.precision, args.new_tokens,
                       algorithm_config={"policy_head": 0, "batch_episodes": 16, "minibatch_size": 16, "epochs": 1})
    rank = agent.data_parallel.rank if agent.data_parallel else 0
    envs = gym.make_vec("Blackjack-v1", num_envs=16, vectorization_mode="sync", sab=True)
    agent.train(envs, 16, seed=0, progress=False)  # warm-up
    t0, steps0 = time.perf_counter(), agent.total_steps
    history = agent.train(envs, args.dp_episodes, seed=1, progress=False)
    wall = time.perf_counter() - t0
    params = torch.cat([p.detach().reshape(-1) for p in agent.policy.trainable_parameters()])
    Path(args.out, f"dp_rank{rank}.json").write_text(json.dumps({
        "rank": rank, "env_steps": agent.total_steps - steps0, "wall_s": wall, "updates": len(history),
        "checksum": float(params.double().sum()), "abs_checksum": float(params.double().abs().sum())}))


def part_data_parallel(args) -> dict:
    out = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for procs in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            worker = [str(Path(__file__)), "--dp-worker", "--out", tmp, "--model-name", args.model_name,
                      "--precision", args.precision, "--dp-episodes", str(args.dp_episodes)]
            cmd = [sys.executable, *worker] if procs == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("dp_rank*.json"))]
        steps = sum(r["env_steps"] for r in ranks)
        wall = max(r["wall_s"] for r in ranks)
        out[f"{procs}_process"] = {"ranks": ranks, "env_steps": steps, "wall_s": wall, "env_steps_per_s": steps / wall,
                                   "identical_weights": len({(r["checksum"], r["abs_checksum"]) for r in ranks}) == 1}
        print(f"[{args.model_name}] data parallel {procs} process(es): {steps / wall:.1f} env steps/s", flush=True)
    out["speedup"] = out["2_process"]["env_steps_per_s"] / out["1_process"]["env_steps_per_s"]
    return out


PARTS = {"acting": part_acting, "naive": part_naive, "update": part_update, "async_env": part_async_env,
         "data_parallel": part_data_parallel}


# ---------------------------------------------------------------------------------------------- driver
def run_part(part: str, model_name: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(Path(__file__)), "--part", part, "--model-name", model_name, "--out", out,
           "--precision", args.precision, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
           "--min-steps", str(args.min_steps), "--naive-steps", str(args.naive_steps),
           "--dp-episodes", str(args.dp_episodes), "--textworld-steps", str(args.textworld_steps),
           "--env-counts", *map(str, args.env_counts)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["part_wall_s"] = time.perf_counter() - t
    return result


def summarise(result: dict) -> dict:
    table = {}
    for model_name, parts in result["models"].items():
        acting = {(r["mode"], r["envs"]): r for r in parts["acting"]["rows"]}
        naive = parts["naive"]["env_steps_per_s"]
        row = {f"{mode}_{n}_env_steps_per_s": acting[mode, n]["env_steps_per_s"] for mode, n in acting}
        row.update({f"{mode}_{n}_overhead": acting[mode, n]["overhead"] for mode, n in acting})
        row["naive_env_steps_per_s"] = naive
        for mode, n in acting:
            row[f"{mode}_{n}_over_naive"] = acting[mode, n]["env_steps_per_s"] / naive
        upd = parts["update"]
        row.update(update_tokens_per_s=upd["tokens_per_s"], update_peak_rss_mb=upd["peak_rss_mb"],
                   update_needed_mb=upd["needed_mb"], update_peak_over_needed=upd["peak_over_needed"],
                   update_peak_above_baseline_over_needed=upd["peak_above_baseline_over_needed"])
        if "data_parallel" in parts:
            row["data_parallel_speedup"] = parts["data_parallel"]["speedup"]
            row["data_parallel_identical_weights"] = parts["data_parallel"]["2_process"]["identical_weights"]
        table[model_name] = row
    if "async_env" in result:
        table["textworld_async_over_sync"] = result["async_env"]["async_over_sync"]
    return table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * len(models) + 5, 4.5))
    for ax, model_name in zip(axes, models):
        parts = result["models"][model_name]
        for mode, color in [("scoring", "tab:blue"), ("generate", "tab:orange")]:
            rows = [r for r in parts["acting"]["rows"] if r["mode"] == mode]
            n = [r["envs"] for r in rows]
            ax.plot(n, [r["env_steps_per_s"] for r in rows], "o-", color=color, label=f"rllama, {mode}")
            ax.plot(n, [r["raw_env_steps_per_s"] for r in rows], "--", color=color, alpha=0.6,
                    label=f"raw model calls, {mode}")
            if mode == "scoring":
                ax.plot(n, [r["bare_env_steps_per_s"] for r in rows], ":", color="tab:green",
                        label="bare HF forward, prompt+candidate rows")
        ax.axhline(parts["naive"]["env_steps_per_s"], color="tab:red", label="naive loop (1 env, generate)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ENV_COUNTS, [str(c) for c in ENV_COUNTS])
        ax.set_xlabel("vector envs")
        ax.set_ylabel("Blackjack env steps / s")
        ax.set_title(f"{model_name} model: acting", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels, values, colors = [], [], []
    for model_name in models:
        upd = result["models"][model_name]["update"]
        labels += [f"{model_name}\nneeded", f"{model_name}\npeak RSS", f"{model_name}\npeak - import"]
        values += [upd["needed_mb"], upd["peak_rss_mb"], upd["peak_above_baseline_mb"]]
        colors += ["tab:gray", "tab:purple", "plum"]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("PPO update memory: needed vs peak RSS", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"rllama throughput on {os.cpu_count()} CPU cores, {result['config']['precision']}, "
                 f"{result['config']['threads']} thread(s)", fontsize=10)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "default"], choices=["tiny", "default"])
    parser.add_argument("--env-counts", type=int, nargs="+", default=ENV_COUNTS)
    parser.add_argument("--new-tokens", type=int, default=16, help="max new tokens in generate mode (both loops)")
    parser.add_argument("--min-steps", type=int, default=96, help="env steps timed per acting configuration")
    parser.add_argument("--naive-steps", type=int, default=24)
    parser.add_argument("--dp-episodes", type=int, default=64)
    parser.add_argument("--textworld-steps", type=int, default=400)
    parser.add_argument("--skip-textworld", action="store_true")
    parser.add_argument("--skip-data-parallel", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    # internal: one part in this process
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--dp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-name", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_common_args(parser, "throughput")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.dp_worker:
        return dp_worker(args)
    if args.part:
        Path(args.out).write_text(json.dumps(PARTS[args.part](args)))
        return
    if args.quick:
        args.env_counts, args.min_steps, args.naive_steps, args.dp_episodes, args.textworld_steps = [1, 4], 8, 4, 16, 40
    t0 = time.perf_counter()
    result = {"models": {}}
    for model_name in args.models:
        parts = ["acting", "naive", "update"] + ([] if args.skip_data_parallel else ["data_parallel"])
        result["models"][model_name] = {part: run_part(part, model_name, args) for part in parts}
    if not args.skip_textworld:
        result["async_env"] = run_part("async_env", "tiny", args)
    table = summarise(result)
    saved = save_result("throughput", args, [], plot, models=result["models"], async_env=result.get("async_env"),
                        table=table, wall_s=time.perf_counter() - t0)
    print(json.dumps(saved["table"], indent=1))


if __name__ == "__main__":
    main()
