"""The ``rllama`` command line: ``train``, ``eval``, ``sweep``, ``plot``, ``teach``.

    rllama train                                        # PPO on Blackjack with the embedded model
    rllama train --config run.yaml --set algorithm_config.learning_rate=1e-4
    rllama train --resume runs/blackjack-ppo-seed0      # continue a stopped run exactly
    rllama eval runs/blackjack-ppo-seed0 --episodes 500
    rllama sweep examples/sweep.yaml --trials 8
    rllama plot runs/blackjack-ppo-seed0 runs/blackjack-dqn-seed0 --output compare.png
    rllama teach                                        # the teaching page, on http://127.0.0.1:8000/
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from pathlib import Path

from rllama.errors import RLlamaError
from rllama.experiment.loggers import LOGGERS


def _config_from_args(args):
    from rllama.experiment import RunConfig, parse_overrides

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    overrides = {}
    for flag, key in [("env", "env"), ("agent", "agent"), ("algorithm", "algorithm"), ("model", "model"),
                      ("episodes", "episodes"), ("eval_episodes", "eval_episodes"), ("eval_every", "eval_every"),
                      ("segment_episodes", "segment_episodes"), ("seed", "seed"), ("num_envs", "num_envs"),
                      ("output_dir", "output_dir"), ("name", "name"), ("loggers", "loggers"),
                      ("precision", "precision"), ("threads", "threads")]:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "quiet", False):
        overrides["progress"] = False
        if "loggers" not in overrides:
            overrides["loggers"] = [x for x in config.loggers if x != "console"]
    overrides.update(parse_overrides(args.set or []))
    return config.with_overrides(overrides)


def _allow_code(args) -> bool | set[str]:
    """``True`` with --allow-code; else the agent/env specs typed on this command line (these the user
    asked for; a spec read from a file is not)."""
    if getattr(args, "allow_code", False):
        return True
    from rllama.experiment import parse_overrides

    typed = {getattr(args, "agent", None), getattr(args, "env", None)}
    typed |= {v for k, v in parse_overrides(getattr(args, "set", None) or []).items() if k in ("agent", "env")}
    return {v for v in typed if isinstance(v, str)}


def _add_allow_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-code", action="store_true", dest="allow_code",
                   help="let a config file or run folder name an agent or env class to import from a module or "
                        "file (code it runs); without it only built-in agents, registered env ids and classes "
                        "named on this command line are used")


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (``--episode`` is not ``--episodes``), and with a suggestion when an
    option or a command is misspelled."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        unknown = re.search(r"unrecognized arguments: (.+)", message)
        choice = re.search(r"invalid choice: '([^']+)' \(choose from (.+)\)", message)
        hints = []
        if unknown:
            parsers = [self] + [sp for a in self._actions if isinstance(a, argparse._SubParsersAction)
                                for sp in a.choices.values()]
            known = sorted({o for parser in parsers for action in parser._actions for o in action.option_strings})
            for word in unknown.group(1).split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1)
                if word.startswith("-") and close:
                    hints.append(f"{word}: did you mean {close[0]}?")
        elif choice:
            options = re.findall(r"'([^']+)'", choice.group(2))
            hints += [f"did you mean {m!r}?" for m in difflib.get_close_matches(choice.group(1), options, n=1)]
        super().error(message + "".join(f"\n  {h}" for h in hints))


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of RunConfig fields (see docs/experiments.md)")
    p.add_argument("--env", help="Gymnasium env id, or module:Class (default Blackjack-v1)")
    p.add_argument("--agent", help="blackjack | textworld | frozenlake | sokoban | module:Class | "
                                   "path/to/file.py:Class (default blackjack)")
    p.add_argument("--algorithm", help="a registered algorithm (default ppo): " + _algorithms())
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--episodes", type=int, help="training episodes (default 640)")
    p.add_argument("--eval-episodes", type=int, dest="eval_episodes",
                   help="greedy evaluation episodes at the start, every --eval-every episodes and at the end "
                        "(default 200; 0: none)")
    p.add_argument("--eval-every", type=int, dest="eval_every",
                   help="training episodes between evaluations (default 320; 0: only at the start and the end)")
    p.add_argument("--segment-episodes", type=int, dest="segment_episodes",
                   help="training episodes between checkpoints and evaluations (default 64)")
    p.add_argument("--seed", type=int, help="seeds the agent, the algorithm and the env resets (default 0)")
    p.add_argument("--num-envs", type=int, dest="num_envs", help="environments in the vector env (default 16)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="default auto")
    p.add_argument("--threads", type=_threads, help="torch threads: 'auto' (default: half the usable cores, at "
                   "least 1; one was fastest on 2 cores), a number, or 0 (torch's default, one per core)")
    p.add_argument("--output-dir", dest="output_dir", help="folder of run folders (default runs/)")
    p.add_argument("--name", help="run folder name (default <agent>-<algorithm>-seed<seed>)")
    p.add_argument("--loggers", nargs="+", choices=list(LOGGERS), help="default: console jsonl")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config field, dotted keys allowed: --set algorithm_config.learning_rate=1e-4")
    p.add_argument("--quiet", action="store_true", help="no progress bars or console lines")


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'auto', a number of threads, or 0 (torch's default)")
    return value


def _algorithms() -> str:
    from rllama.algorithms import available

    return ", ".join(available())


def cmd_train(args) -> dict:
    from rllama.experiment import parse_overrides, resume, train

    if args.resume:
        overrides = parse_overrides(args.set or [])
        if args.episodes is not None:
            overrides["episodes"] = args.episodes
        if args.quiet:
            overrides["progress"] = False
        return resume(args.resume, overrides=overrides, allow_code=args.allow_code)
    config = _config_from_args(args)
    if not args.quiet:
        print(f"rllama train: {config.plan()}", file=sys.stderr, flush=True)
    return train(config, allow_code=_allow_code(args))


def cmd_eval(args) -> dict:
    from rllama.experiment import make_agent, make_env
    from rllama.experiment.config import apply_threads, check_code

    run_dir, config, checkpoint = _run_checkpoint(args.run, "evaluate a checkpoint: rllama eval")
    overrides = {"num_envs": args.num_envs} if args.num_envs else {}
    config = config.with_overrides(overrides)
    check_code(config, args.allow_code, str(run_dir / "config.yaml"))
    apply_threads(args.threads if args.threads is not None else config.threads)
    agent = make_agent(config, args.allow_code)
    agent.load(checkpoint / "policy")
    envs = make_env(config, args.allow_code)
    try:
        result = agent.evaluate(envs, args.episodes, seed=args.seed, greedy=not args.sample,
                                progress=not args.quiet)
    finally:
        envs.close()
    returns = result.pop("returns")
    result["success_rate"] = float(sum(r > 0 for r in returns) / len(returns))
    result.update(checkpoint=str(checkpoint), greedy=not args.sample, seed=args.seed)
    return result


def cmd_sweep(args) -> dict:
    from rllama.experiment.sweep import load_sweep, run_sweep

    base = _config_from_args(args)
    mode = "offline" if args.offline else "online" if args.online else "auto"
    return run_sweep(load_sweep(args.sweep), base, trials=args.trials, mode=mode, allow_code=_allow_code(args))


def cmd_plot(args) -> dict:
    from rllama.experiment import plot_runs

    output = args.output or str(Path(args.runs[0]) / "learning_curve.png")
    return {"plot": str(plot_runs(args.runs, output))}


def cmd_teach(args) -> dict:
    import threading
    import time

    from rllama.experiment.config import apply_threads
    from rllama.skills import SkillModel
    from rllama.teach import Teacher, TeachServer
    from rllama.web import check_binding, require_web_stack

    require_web_stack("rllama teach")
    start = time.perf_counter()
    apply_threads(args.threads)
    api_key = args.api_key or os.environ.get("RLLAMA_API_KEY") or None
    check_binding(args.host, api_key, "the model and change its skills")  # before minutes of loading
    if args.run:
        agent, checkpoint = _trained_agent(args.run, args.allow_code)
        skills = SkillModel(policy=agent.policy)
    else:
        skills = SkillModel(args.model)
    teacher = Teacher(skills, args.folder, engine=args.engine, epochs=args.epochs, max_new_tokens=args.max_new_tokens)
    if args.run:
        name = "run-" + re.sub(r"[^A-Za-z0-9_-]", "-", Path(args.run).resolve().name)[:50]
        if name not in {s["name"] for s in teacher.list_skills()}:
            teacher.adopt_adapter(agent.policy.active_adapter, name)
    server = TeachServer(teacher, args.host, args.port, api_key=api_key).start()
    print(f"rllama teach: {server.url} (ready in {time.perf_counter() - start:.1f} s; chat on "
          f"{teacher.chat.name}; skills saved in {teacher.folder}). Ctrl-C stops.", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        teacher.close()
    return {"url": server.url}


def _run_checkpoint(run: str, hint: str):
    """``(run folder, its RunConfig, the checkpoint folder)`` of a run folder (its final/) or a checkpoint in one;
    ``hint`` completes the message when the run has no trained policy yet."""
    from rllama.experiment import RunConfig
    from rllama.fileio import recover_dir

    path = Path(run)
    run_dir = path if (path / "config.yaml").is_file() else path.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise RLlamaError(f"{path} is neither a run folder nor a checkpoint inside one (no config.yaml found)")
    config = RunConfig.from_yaml(run_dir / "config.yaml")
    checkpoint = path if (path / "policy").is_dir() else recover_dir(run_dir / "final")
    if not (checkpoint / "policy").is_dir():
        raise RLlamaError(f"no trained policy at {checkpoint}/policy (has the run finished? {hint} "
                          f"{run_dir}/checkpoints/segment-...)")
    return run_dir, config, checkpoint


def _trained_agent(run: str, allow_code: bool):
    """The agent of run folder ``run`` (or a checkpoint folder inside one) with its trained policy loaded."""
    from rllama.experiment import make_agent
    from rllama.experiment.config import check_code

    run_dir, config, checkpoint = _run_checkpoint(run, "teach a checkpoint: rllama teach --run")
    check_code(config, allow_code, str(run_dir / "config.yaml"))
    agent = make_agent(config, allow_code)
    agent.load(checkpoint / "policy")
    return agent, checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rllama", description="Train LLM agents with reinforcement learning in Gymnasium environments.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train an agent (or --resume a stopped run)",
                       description="Train an agent. Flags override the --config file; --set overrides any field. "
                                   "Writes a run folder with config.yaml, metrics.jsonl, checkpoints, final/ and "
                                   "learning_curve.png.")
    _add_run_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint, exactly (other flags ignored "
                        "except --episodes, --quiet and --set for loggers/progress)")
    _add_allow_code(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run or checkpoint",
                       description="Evaluate a run's final policy (or a checkpoint folder) on N episodes.")
    p.add_argument("run", help="run folder (uses final/) or a checkpoint folder inside it")
    p.add_argument("--episodes", type=int, default=200, help="evaluation episodes (default 200)")
    p.add_argument("--seed", type=int, default=10_000,
                   help="env seed of the evaluation episodes: the same seed, the same deals (default 10000)")
    p.add_argument("--num-envs", type=int, dest="num_envs", help="environments side by side (default: the run's)")
    p.add_argument("--sample", action="store_true", help="sample actions instead of greedy")
    p.add_argument("--threads", type=_threads, help="torch threads (default: the run's setting, normally 'auto')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_allow_code(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="hyperparameter sweep from a wandb sweep YAML",
                       description="Run a wandb sweep YAML (method, metric, parameters). With a W&B API key it "
                                   "uses wandb.sweep/wandb.agent; offline it runs the same search on Optuna, each "
                                   "trial an offline wandb run (with --loggers wandb) in one group.")
    p.add_argument("sweep", help="wandb sweep YAML")
    _add_run_flags(p)
    p.add_argument("--trials", type=int, help="number of trials (default: run_cap in the YAML, or the grid size)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="run on Optuna even if W&B is reachable")
    mode.add_argument("--online", action="store_true", help="require wandb.sweep / wandb.agent")
    _add_allow_code(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="plot learning curves of run folders",
                       description="Plot evaluation and training return against episodes from metrics.jsonl.")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--output", help="PNG path (default: <first run>/learning_curve.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("teach", help="the teaching page: chat, correct replies, learn skills in the browser",
                       description="Start the teaching page on a local web server and print its URL: chat with the "
                                   "model, correct or approve its replies, press learn, and watch the skill's adapter "
                                   "learn them while the chat keeps answering. Needs the ui extra.")
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--run", help="teach a trained agent's policy: a run folder (its final/) or a checkpoint in one; "
                                 "its adapter becomes the skill run-<folder name>")
    p.add_argument("--folder", default="skills", help="where skills and their examples are saved (default ./skills)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; any other needs a key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--api-key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' on the API (default: $RLLAMA_API_KEY; none on loopback)")
    p.add_argument("--engine", choices=["auto", "llama.cpp", "torch"], default="auto",
                   help="what the chat runs on (default auto: llama.cpp where it can serve the model)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of each learn (default 12)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64, help="longest reply (default 64)")
    p.add_argument("--threads", type=_threads, default="auto", help="torch threads (default auto)")
    _add_allow_code(p)
    p.set_defaults(func=cmd_teach)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (RLlamaError, FileNotFoundError, ValueError, TypeError) as exc:
        if os.environ.get("RLLAMA_DEBUG"):
            raise
        print(f"rllama {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.command in ("eval", "plot") or getattr(args, "quiet", False):
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
