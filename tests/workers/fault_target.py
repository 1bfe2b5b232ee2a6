"""Children for the kill -9 tests (tests/test_faults.py): each builds a tiny agent and saves in a loop,
version after version, until it is killed. Version ``k`` fills every trainable weight with ``k`` and
adds a memory of reward ``k``, so a load tells which version it got and whether it is whole."""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from rllama.fileio import atomic_write
from rllama.memory import EpisodicMemory, Experience


def build_agent(seed: int = 0):
    from tests.conftest import ChoiceAgent, make_tiny_lm, make_tokenizer

    torch.set_num_threads(1)
    return ChoiceAgent(make_tiny_lm(), make_tokenizer(), seed=seed, precision="fp32", algorithm="ppo",
                       algorithm_config={"batch_episodes": 2, "minibatch_size": 2},
                       memory=EpisodicMemory("hashing", k=1))


def set_version(agent, k: int) -> None:
    with torch.no_grad():
        for p in agent.policy.trainable_parameters():
            p.fill_(float(k))
    agent.episodic_memory.add(Experience(observation=f"version {k}", action="left", reward=float(k)))


def arm(kill_at: int | None, counted: list[int]) -> None:
    """Count this process's file-system operations (opening a file to write, fsync, rename, replace,
    unlink, mkdir, rmtree) in ``counted[0]``; with ``kill_at``, SIGKILL itself just before operation
    number ``kill_at``: a kill at an exact point of a save."""

    def wrap(owner, name, writes_only=False):
        real = getattr(owner, name)

        def counting(*args, **kwargs):
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if not writes_only or any(c in str(mode) for c in "wax+"):
                counted[0] += 1
                if kill_at is not None and counted[0] >= kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(owner, name, counting)

    for name in ("replace", "rename", "fsync", "unlink", "mkdir"):
        wrap(os, name)
    wrap(shutil, "rmtree")
    wrap(builtins, "open", writes_only=True)


def save_loop(area: str, folder: str, done_file: str, start: int = 0, kill_at: int | None = None,
              count_file: str | None = None) -> None:
    """Save version after version, from ``start``, into ``folder`` (``area``: agent, checkpoint or
    final); after each complete save write its version to ``done_file``. Version ``k`` holds
    ``k - start + 1`` memories. After the first save, with ``kill_at``, the process kills itself at
    its ``kill_at``-th file-system operation; with ``count_file``, it writes there how many operations
    one save takes and stops."""
    from rllama.checkpoint import save_training_state

    agent = build_agent()
    folder = Path(folder)
    experiment = None
    if area == "final":
        from rllama.experiment import Experiment, RunConfig

        config = RunConfig(agent="tests.conftest:ChoiceAgent", env="tests.conftest:ChoiceEnv", loggers=[],
                           progress=False, output_dir=str(folder.parent), name=folder.name, keep_checkpoints=2)
        experiment = Experiment(config)
        experiment.agent = agent
    k, counted = int(start), [0]
    while True:
        set_version(agent, k)
        if area == "agent":
            agent.save(folder)
        elif area == "checkpoint":
            save_training_state(agent, folder, extra={"version": k})
        else:
            experiment._checkpoint({"segment": k + 1, "episodes": k, "evals": [], "wall_s": 0.0, "version": k},
                                   final=True, record={})
        atomic_write(done_file, str(k))
        if k == start + 1 and count_file is not None:
            Path(count_file).write_text(str(counted[0]))
            return
        if k == start:
            arm(kill_at, counted)
        k += 1


if __name__ == "__main__":
    save_loop(*sys.argv[1:4], int(sys.argv[4]))
