"""Generate mode at engine speed: the torch path, the llama.cpp backend and LlamaGym's loop, in one run.

    python benchmarks/generation.py --threads 1              # the committed results (~25 min, 2 cores)
    python benchmarks/generation.py --threads 1 --quick      # a smoke run

On the embedded model (SmolLM2-135M-Instruct: the learner dequantises the GGUF that llama.cpp reads),
each part in a fresh process (peak memory is the part's own):

- ``naive``: LlamaGym's loop: one Blackjack env, ``model.generate`` for every step with the chat
  template, the reply parsed (as ``benchmarks/throughput.py``'s naive part).
- ``acting``: env steps/s and ms per generated token of an agent written like the RLlama README's
  Blackjack agent (it asks for "stay" or "hit", ``extract_action`` = ``0 if "stay" in reply else 1``)
  and of ``TextWorldAgent(generate=True)``, at 1 and 16 envs, on each backend (``torch``: the learner's
  own model; ``llamacpp``), sampling as in training (no update runs).
- ``floor``: llama.cpp's own high-level ``Llama.generate`` on the same Blackjack prompts (ms per
  token: the engine's floor at one sequence), and its compute floor for batching: the time of one
  ``llama_decode`` of 16 tokens against one of 1 token (16 sequences can gain at most
  ``16 * t1 / t16`` over one).
- ``train``: PPO in generate mode on 16 Blackjack envs, updates and adapter swaps included: env
  steps/s, the engine-learner log-prob mismatch, the swap's cost, the share of replies that name no
  action, peak RSS (learner + engine: one process).

Writes ``results/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, save_figure, save_result, set_threads  # noqa: E402

PARTS = {}
TEXTWORLD_STEPS = 8  # TextWorld episodes are cut after this many steps (replies rarely finish a game)


def part(fn):
    PARTS[fn.__name__.removeprefix("part_")] = fn
    return fn


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def readme_agent_class():
    """A Blackjack agent with the hooks of the RLlama README's: free text, "stay" or else hit."""
    from rllama import RLlamaAgent

    class StayOrHitAgent(RLlamaAgent):
        def get_system_prompt(self):
            return ("You are an expert blackjack player. Every turn, you'll see your current sum, the card the "
                    "dealer is showing, and whether you have a usable ace. Win by exceeding the dealer's hand but "
                    "not exceeding 21. Decide whether to stay with your current sum by writing \"Action: 0\" or "
                    "accept another card by writing \"Action: 1\". Reply with stay or hit.")

        def format_observation(self, observation):
            total, dealer, ace = observation
            return (f"You: {total}. Dealer: {dealer}. You have {'a' if ace else 'no'} usable ace. "
                    "Do you stay or hit?")

        def extract_action(self, response):
            return 0 if "stay" in response.lower() else 1

    return StayOrHitAgent


def make_agent(task: str, backend: str, precision: str, new_tokens: int, shape: str = "none", **kwargs):
    if task == "textworld":
        from rllama.agents import TextWorldAgent

        return TextWorldAgent(generate=True, seed=0, precision=precision, max_new_tokens=new_tokens,
                              backend=backend, **kwargs)
    cls = readme_agent_class()
    if shape == "choices":  # the same agent, declaring its reply's shape
        from rllama.replies import Choices

        cls = type("StayOrHitChoices", (cls,), {"reply_shape": Choices("stay", "hit")})
    return cls(None, seed=0, precision=precision, max_new_tokens=new_tokens, backend=backend, **kwargs)


def make_envs(task: str, n: int):
    import gymnasium as gym

    if task == "textworld":
        import rllama.envs  # noqa: F401 (registers rllama/TextWorld-v0)

        return gym.vector.SyncVectorEnv([lambda: gym.make("rllama/TextWorld-v0", max_episode_steps=TEXTWORLD_STEPS)
                                         for _ in range(n)])
    return gym.vector.SyncVectorEnv([lambda: gym.make("Blackjack-v1", sab=True) for _ in range(n)])


# ---------------------------------------------------------------------------------------------- parts
@part
def part_naive(args) -> dict:
    """LlamaGym's loop: one env, ``generate`` per step, the reply parsed."""
    import gymnasium as gym
    import torch

    from rllama.policy import load_model

    lm, tokenizer = load_model(None)
    lm.eval()
    hooks = readme_agent_class().__new__(readme_agent_class())  # only its text hooks
    env = gym.make("Blackjack-v1", sab=True)
    obs, _ = env.reset(seed=0)
    messages = [{"role": "system", "content": hooks.get_system_prompt()}]
    steps, tokens, gen_s, t0, warmup = 0, 0, 0.0, None, 2
    while steps < args.naive_steps + warmup:
        if steps == warmup:
            t0, tokens, gen_s = time.perf_counter(), 0, 0.0
        messages.append({"role": "user", "content": hooks.format_observation(obs)})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        torch.manual_seed(steps)
        t = time.perf_counter()
        with torch.no_grad():
            out = lm.generate(**ids, max_new_tokens=args.new_tokens, do_sample=True, top_k=0, top_p=1.0,
                              pad_token_id=tokenizer.eos_token_id)
        gen_s += time.perf_counter() - t
        new = out[0, ids["input_ids"].shape[1]:]
        tokens += len(new)
        reply = tokenizer.decode(new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        obs, _r, terminated, truncated, _ = env.step(hooks.extract_action(reply))
        steps += 1
        if terminated or truncated:
            obs, _ = env.reset()
            messages = messages[:1]
    wall = time.perf_counter() - t0
    return {"env_steps": args.naive_steps, "wall_s": wall, "env_steps_per_s": args.naive_steps / wall,
            "ms_per_token": 1000 * gen_s / max(tokens, 1), "peak_rss_mb": peak_rss_mb()}


@part
def part_acting(args) -> dict:
    """Acting only (no update): env steps/s and ms per generated token, per task, backend and env count."""
    agent = make_agent(args.task, args.backend, args.precision, args.new_tokens, args.shape,
                       algorithm_config={"batch_episodes": 10**9})
    envs = make_envs(args.task, args.envs)
    timings = {"generate_s": 0.0, "tokens": 0, "prompt_tokens": 0}
    backend = agent.backend
    original = backend.generate

    def timed(prompts, *a, **k):
        t = time.perf_counter()
        out = original(prompts, *a, **k)
        timings["generate_s"] += time.perf_counter() - t
        timings["tokens"] += sum(len(r.token_ids) for r in out)
        timings["prompt_tokens"] += sum(len(p) for p in prompts)
        return out

    backend.generate = timed
    episode_steps = 1.5 if args.task == "blackjack" else TEXTWORLD_STEPS
    agent.train(envs, args.envs, seed=0, progress=False)  # warm-up
    steps0 = agent.trainer.total_steps
    timings.update(generate_s=0.0, tokens=0, prompt_tokens=0)
    backend.update_stats()  # the engine's counters from here on
    t0 = time.perf_counter()
    min_steps = args.min_steps * (4 if args.shape != "none" else 1)  # short replies: more steps to time
    agent.train(envs, max(args.envs, round(min_steps / episode_steps)), progress=False)
    wall = time.perf_counter() - t0
    steps = agent.trainer.total_steps - steps0
    envs.close()
    return {"task": args.task, "backend": type(backend).__name__, "envs": args.envs, "shape": args.shape,
            "env_steps": steps,
            "wall_s": wall, "env_steps_per_s": steps / wall,
            "ms_per_token": 1000 * timings["generate_s"] / max(timings["tokens"], 1),
            "tokens_per_step": timings["tokens"] / max(steps, 1), "parse_failures": agent.actor.parse_failures,
            "prompt_tokens_per_step": timings["prompt_tokens"] / max(steps, 1),
            "engine": backend.update_stats(), "peak_rss_mb": peak_rss_mb()}


@part
def part_floor(args) -> dict:
    """llama.cpp alone: its high-level generate per token, and one decode of 16 tokens against 1."""
    import ctypes

    import llama_cpp

    from rllama.policy.loading import default_model_gguf

    agent = make_agent("blackjack", "torch", "fp32", args.new_tokens)
    prompts = []
    for total, dealer in ((15, 10), (12, 4), (19, 7), (8, 2), (17, 9), (13, 6)):
        messages = [{"role": "system", "content": agent.get_system_prompt()},
                    {"role": "user", "content": agent.format_observation((total, dealer, 0))}]
        prompts.append(agent.chat.prompt_ids(messages))
    llm = llama_cpp.Llama(str(default_model_gguf()), n_ctx=2048, n_threads=args.threads or 1, verbose=False)
    tokens, seconds = 0, 0.0
    for i, prompt in enumerate(prompts * 2):
        llm.reset()
        llm.set_seed(i)
        t = time.perf_counter()
        for n, token in enumerate(llm.generate(prompt, temp=1.0, top_k=40, top_p=1.0, reset=True), 1):
            if token == llm.token_eos() or n >= args.new_tokens:
                break
        seconds += time.perf_counter() - t
        tokens += n
    # one llama_decode of n tokens (n sequences, one token each, after a shared prompt)
    from rllama.backends.llamacpp import EngineStats, _Engine

    engine = _Engine(default_model_gguf(), 4096, 16, 512, args.threads or 1, EngineStats())
    prompt = prompts[0]
    engine._decode([(t, p, 0, False) for p, t in enumerate(prompt)], {0})
    for s in range(1, 16):
        llama_cpp.llama_memory_seq_cp(engine.memory, 0, s, 0, len(prompt))
    per_decode = {}
    for n in (1, 16):
        times = []
        for rep in range(6):
            for s in range(n):
                llama_cpp.llama_memory_seq_rm(engine.memory, s, len(prompt), -1)
            entries = [(prompt[-1] if rep % 2 else 42, len(prompt), s, True) for s in range(n)]
            t = time.perf_counter()
            engine._decode(entries, set(range(16)))
            times.append(time.perf_counter() - t)
        per_decode[n] = sorted(times)[len(times) // 2]
    del ctypes
    return {"highlevel_ms_per_token": 1000 * seconds / tokens, "decode_1_ms": 1000 * per_decode[1],
            "decode_16_ms": 1000 * per_decode[16], "batch_gain_floor": 16 * per_decode[1] / per_decode[16]}


@part
def part_train(args) -> dict:
    """PPO in generate mode on 16 envs: env steps/s with updates and swaps, the mismatch, swaps, failures."""
    agent = make_agent("blackjack", args.backend, args.precision, args.new_tokens, args.shape)
    envs = make_envs("blackjack", 16)
    t0 = time.perf_counter()
    history = agent.train(envs, args.train_episodes, seed=0, progress=False)
    wall = time.perf_counter() - t0
    steps = agent.trainer.total_steps
    envs.close()
    keys = ("rollout/engine_logprob_diff_mean", "rollout/engine_logprob_diff_max", "engine/swap_ms",
            "engine/ms_per_token", "engine/prompt_reuse", "rollout/parse_failures", "rollout/steps",
            "policy/importance_weight", "policy/importance_weight_capped", "time/update_s", "rollout/mean_return")
    return {"backend": type(agent.backend).__name__, "shape": args.shape, "episodes": args.train_episodes,
            "env_steps": steps,
            "wall_s": wall, "env_steps_per_s": steps / wall, "updates": len(history),
            "history": [{k: h[k] for k in keys if k in h} for h in history], "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------- driver
def run_part(name: str, args, **options) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(Path(__file__)), "--part", name, "--out", out, "--precision", args.precision,
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--min-steps", str(args.min_steps),
           "--naive-steps", str(args.naive_steps), "--train-episodes", str(args.train_episodes)]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print("#", name, options, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["part_wall_s"] = time.perf_counter() - t
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return result


def summarise(r: dict) -> dict:
    naive = r["naive"]["env_steps_per_s"]
    acting = {(a["task"], a["backend"], a["envs"]): a for a in r["acting"] if a.get("shape", "none") == "none"}
    table = {"naive_env_steps_per_s": naive, "naive_ms_per_token": r["naive"]["ms_per_token"],
             "llamacpp_highlevel_ms_per_token": r["floor"]["highlevel_ms_per_token"],
             "batch_gain_floor_16": r["floor"]["batch_gain_floor"]}
    for (task, backend, envs), a in acting.items():
        key = f"{task}/{backend}/{envs}env"
        table[f"{key}/env_steps_per_s"] = a["env_steps_per_s"]
        table[f"{key}/ms_per_token"] = a["ms_per_token"]
        if task == "blackjack" and envs == 1:
            table[f"{key}/vs_naive"] = a["env_steps_per_s"] / naive
    for task in ("blackjack", "textworld"):
        for backend in ("InProcessBackend", "LlamaCppBackend"):
            one, many = acting.get((task, backend, 1)), acting.get((task, backend, 16))
            if one and many:
                gain = many["env_steps_per_s"] / one["env_steps_per_s"]
                table[f"{task}/{backend}/16env_over_1env"] = gain
                if backend == "LlamaCppBackend":
                    table[f"{task}/{backend}/share_of_batch_floor"] = gain / r["floor"]["batch_gain_floor"]
    for a in r["acting"]:
        if a.get("shape", "none") != "none":
            key = f"{a['task']}/{a['backend']}/{a['shape']}/{a['envs']}env"
            table[f"{key}/env_steps_per_s"] = a["env_steps_per_s"]
            table[f"{key}/tokens_per_step"] = a["tokens_per_step"]
            if a["envs"] == 1:
                table[f"{key}/vs_naive"] = a["env_steps_per_s"] / naive
    for t in r["train"]:
        key = f"train/{t['backend']}" + ("/choices" if t.get("shape") == "choices" else "")
        table[f"{key}/env_steps_per_s"] = t["env_steps_per_s"]
        table[f"{key}/peak_rss_mb"] = t["peak_rss_mb"]
        diffs = [h["rollout/engine_logprob_diff_mean"] for h in t["history"] if "rollout/engine_logprob_diff_mean" in h]
        if diffs:
            table[f"{key}/logprob_diff_mean"] = sum(diffs) / len(diffs)
            table[f"{key}/logprob_diff_max"] = max(h["rollout/engine_logprob_diff_max"] for h in t["history"]
                                                   if "rollout/engine_logprob_diff_max" in h)
        swaps = [h["engine/swap_ms"] for h in t["history"] if h.get("engine/swap_ms") == h.get("engine/swap_ms")
                 and "engine/swap_ms" in h]
        if swaps:
            table[f"{key}/swap_ms"] = sum(swaps) / len(swaps)
    trains = {(t["backend"], t.get("shape", "none")): t for t in r["train"]}
    torch_train = trains.get(("InProcessBackend", "none"))
    for shape in ("none", "choices"):
        engine_train = trains.get(("LlamaCppBackend", shape))
        if torch_train and engine_train:
            table[f"train/llamacpp_{shape}_over_torch"] = (engine_train["env_steps_per_s"]
                                                           / torch_train["env_steps_per_s"])
    return table


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    r = result["parts"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels, values, colors = ["LlamaGym loop\n1 env"], [r["naive"]["env_steps_per_s"]], ["tab:gray"]
    for a in r["acting"]:
        if a["task"] != "blackjack":
            continue
        shape = "\nChoices" if a.get("shape", "none") != "none" else ""
        labels.append(f"{'llama.cpp' if a['backend'] == 'LlamaCppBackend' else 'torch'}\n{a['envs']} env{shape}")
        values.append(a["env_steps_per_s"])
        colors.append("tab:green" if a["backend"] == "LlamaCppBackend" else "tab:blue")
    axes[0].bar(labels, values, color=colors)
    axes[0].tick_params(axis="x", labelsize=7)
    axes[0].set_ylabel("env steps/s (acting, sampled)")
    axes[0].set_title("Blackjack, generate mode")
    for i, v in enumerate(values):
        axes[0].text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    labels = ["LlamaGym\nloop", "llama.cpp\nhigh-level"]
    values = [r["naive"]["ms_per_token"], r["floor"]["highlevel_ms_per_token"]]
    colors = ["tab:gray", "tab:olive"]
    for a in r["acting"]:
        if a["task"] == "blackjack" and a["envs"] == 1 and a.get("shape", "none") == "none":
            labels.append(f"{'llama.cpp' if a['backend'] == 'LlamaCppBackend' else 'torch'}\nbackend")
            values.append(a["ms_per_token"])
            colors.append("tab:green" if a["backend"] == "LlamaCppBackend" else "tab:blue")
    axes[1].bar(labels, values, color=colors)
    axes[1].set_ylabel("ms per generated token, 1 env")
    axes[1].set_title("Per-token cost")
    for i, v in enumerate(values):
        axes[1].text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    trains = r["train"]
    axes[2].bar([("llama.cpp" if t["backend"] == "LlamaCppBackend" else "torch")
                 + ("\nChoices" if t.get("shape") == "choices" else "") + f"\n{t['episodes']} episodes"
                 for t in trains],
                [t["env_steps_per_s"] for t in trains], color=["tab:green" if t["backend"] == "LlamaCppBackend"
                                                               else "tab:blue" for t in trains])
    axes[2].set_ylabel("env steps/s, updates included")
    axes[2].set_title("PPO training, 16 envs")
    for i, t in enumerate(trains):
        axes[2].text(i, t["env_steps_per_s"], f"{t['env_steps_per_s']:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{result['versions']['cpu']}, {result['config']['threads'] or 'default'} thread(s)", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per reply")
    parser.add_argument("--min-steps", type=int, default=48, help="env steps timed per acting configuration")
    parser.add_argument("--naive-steps", type=int, default=16)
    parser.add_argument("--train-episodes", type=int, default=160, help="PPO episodes on the llama.cpp backend")
    parser.add_argument("--torch-train-episodes", type=int, default=160, help="PPO episodes on the torch backend")
    parser.add_argument("--skip-textworld", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="blackjack", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="llamacpp", help=argparse.SUPPRESS)
    parser.add_argument("--envs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="none", choices=["none", "choices"], help=argparse.SUPPRESS)
    add_common_args(parser, "generation", precision="auto")
    args = parser.parse_args()
    set_threads(args)
    if args.part:
        Path(args.out).write_text(json.dumps(PARTS[args.part](args)))
        return
    if args.quick:
        args.min_steps, args.naive_steps, args.train_episodes, args.torch_train_episodes = 8, 4, 32, 16
    t0 = time.perf_counter()
    parts = {"naive": run_part("naive", args), "floor": run_part("floor", args), "acting": [], "train": []}
    for task in ["blackjack"] + ([] if args.skip_textworld else ["textworld"]):
        for backend in ("torch", "llamacpp"):
            for envs in (1, 16):
                parts["acting"].append(run_part("acting", args, task=task, backend=backend, envs=envs))
    for envs in (1, 16):  # the same agent declaring its reply's shape: replies of one or two tokens
        parts["acting"].append(run_part("acting", args, task="blackjack", backend="llamacpp", envs=envs,
                                        shape="choices"))
    parts["train"].append(run_part("train", args, backend="llamacpp"))
    parts["train"].append(run_part("train", args, backend="llamacpp", shape="choices"))
    parts["train"].append(run_part("train", args, backend="torch", train_episodes=args.torch_train_episodes))
    table = summarise(parts)
    saved = save_result("generation", args, [], plot, parts=parts, table=table, wall_s=time.perf_counter() - t0)
    print(json.dumps(saved["table"], indent=1))


if __name__ == "__main__":
    main()
