"""How far one observation travels on its way to an action: the library files entered and the calls between them.

    python benchmarks/observation_path.py --before-commit 3d0de4a   # this checkout against that commit

One ``agent.act(observation)`` of a small agent on a tiny random Llama (4 blocks, LoRA on the top 2, so the
frozen-prefix cache is on), after one warm-up step, is traced with ``sys.setprofile``: every call made
from a function of one ``rllama`` file into a function of another counts as a move between modules, and
every file with a function called counts as crossed. A move is *hidden* when the caller's file imports
nothing that names the callee's module: a call through ``self`` into another file (mixins, a base class
calling an override) or through a function handed over, which an import drawing cannot show. Scoring
mode (two listed actions) and generate mode (a reply of up to 8 tokens) are traced apart. The figures
measure the code's structure, not its speed.
With ``--before-commit`` the same trace runs on the library of that commit (a temporary git worktree, in a
subprocess) for a before/after table and figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import save_figure, save_result  # noqa: E402

MODES = ("scoring", "generate")


def tiny_agent(generate: bool):
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    from rllama import RLlamaAgent
    from rllama.policy import PolicyModel, default_lora_config

    class Agent(RLlamaAgent):
        def get_system_prompt(self):
            return "Pick left or right."

        def format_observation(self, observation):
            return f"You see {observation}."

        def extract_action(self, response):
            return "right" if "r" in response else "left"

        def get_valid_actions(self, observation):
            return None if generate else ["left", "right"]

        def scores_actions(self):
            return not generate

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    policy = PolicyModel(LlamaForCausalLM(config), tokenizer, lora_config=default_lora_config(layers=[2, 3]))
    return Agent(policy, tokenizer, "cpu", algorithm="ppo", max_new_tokens=8)


def imported_modules(package: str) -> dict[str, set[str]]:
    """Per ``rllama/...py`` file of ``package``, the modules its import statements name (type-checking ones too)."""
    import ast

    out = {}
    root = Path(package).parent
    for f in Path(package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: from the file's package
                    parts = f.relative_to(root).with_suffix("").parts[: -node.level]
                    base = ".".join(parts + ((node.module,) if node.module else ()))
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names)
        out[str(f.relative_to(root))] = names
    return out


def names(imports: set[str], callee: str) -> bool:
    """Whether a file importing ``imports`` names the module of file ``callee`` (or a package holding it)."""
    module = callee[: -len(".py")].replace("/", ".").removesuffix(".__init__")
    return any(module == m or module.startswith(m + ".") for m in imports)


def trace(agent, observation, package: str) -> dict:
    """The rllama files entered and the calls between two of them during ``agent.act(observation)``."""
    stack: list[str | None] = []
    files: set[str] = set()
    moves: dict[tuple[str, str], int] = {}

    def profile(frame, event, arg):
        if event == "call":
            name = frame.f_code.co_filename
            mine = name[len(package) - len("rllama"):] if name.startswith(package) else None
            caller = next((f for f in reversed(stack) if f is not None), None)
            if mine is not None:
                files.add(mine)
                if caller is not None and caller != mine:
                    moves[(caller, mine)] = moves.get((caller, mine), 0) + 1
            stack.append(mine)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        agent.act(observation)
    finally:
        sys.setprofile(None)
    imports = imported_modules(package)
    hidden = {f"{a} -> {b}": n for (a, b), n in sorted(moves.items()) if not names(imports.get(a, set()), b)}
    return {"files": sorted(files), "n_files": len(files), "moves": sum(moves.values()),
            "hidden_moves": sum(hidden.values()), "hidden": hidden,
            "distinct_moves": len(moves), "edges": {f"{a} -> {b}": n for (a, b), n in sorted(moves.items())}}


def measure() -> dict:
    """Both modes' traces with the ``rllama`` that is imported (this checkout's, or a worktree's)."""
    import rllama

    package = str(Path(rllama.__file__).parent)
    out = {"rllama_imported_from": package}
    for mode in MODES:
        agent = tiny_agent(generate=mode == "generate")
        agent.act("a wall")  # warm-up: lazy imports and first-call set-up are not the path
        agent.terminate_episode()
        out[mode] = trace(agent, "a door", package)
    return out


def measure_commit(commit: str) -> dict:
    """:func:`measure` on the library of ``commit``, checked out into a temporary worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--detach", str(tree), commit],
                       check=True, capture_output=True)
        try:
            # The worktree goes first on the path after this script's imports (common.py puts this checkout there).
            code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import observation_path; "
                    f"sys.path.insert(0, {str(tree)!r}); print(json.dumps(observation_path.measure()))")
            run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            return json.loads(run.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(tree)], check=True)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (key, label) in zip(axes, [("n_files", "rllama files entered"), ("moves", "calls between files"),
                                       ("hidden_moves", "calls no import shows")]):
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            xs = [m + i * width for m in range(len(MODES))]
            values = [run[mode][key] for mode in MODES]
            bars = ax.bar(xs, values, width, label=run["label"], color=["tab:gray", "tab:blue"][i % 2])
            ax.bar_label(bars, fmt="%d")
        ax.set_xticks([m + width * (len(runs) - 1) / 2 for m in range(len(MODES))], MODES)
        ax.set_title(f"one agent.act: {label}")
        ax.set_ylim(0, 1.4 * max(run[mode][key] for run in runs for mode in MODES))  # room for the legend
        ax.legend(loc="upper center", ncol=len(runs), fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before-commit", default=None, help="also trace the library of this commit")
    parser.add_argument("--name", default="observation_path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    if args.before_commit:
        runs.append({"label": f"before ({args.before_commit})", **measure_commit(args.before_commit)})
    runs.append({"label": "this checkout", **measure()})
    for run in runs:
        for mode in MODES:
            print(f"{run['label']}, {mode}: {run[mode]['n_files']} files, {run[mode]['moves']} calls between "
                  f"files ({run[mode]['distinct_moves']} distinct), {run[mode]['hidden_moves']} hidden: "
                  f"{run[mode]['hidden']}")
    save_result("observation_path", args, runs, plot, what=__doc__.strip().split("\n\n")[1])


if __name__ == "__main__":
    main()
