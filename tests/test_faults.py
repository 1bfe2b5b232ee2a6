"""Fault injection: processes killed with SIGKILL at random points of ``agent.save``, of checkpoint
writes and of the runner's ``final/`` (20 kills each). After every kill the folder must load, whole:
the version whose save had finished or the one in flight, never a mixture, memory included; and the
temporary folders of killed writers must not pile up."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from rllama.checkpoint import load_training_state
from tests.workers.fault_target import build_agent, save_loop

KILLS = 20


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that has imported torch, transformers and rllama but run nothing:
    they start in a fraction of a second, safely (no thread pools are copied)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.workers.fault_target", "tests.conftest", "safetensors.torch", "peft",
                                "transformers.models.llama.modeling_llama",
                                "transformers.models.byt5.tokenization_byt5"])
    return ctx


def version_of(agent) -> int:
    values = {float(v) for p in agent.policy.trainable_parameters() for v in p.detach().flatten().unique()}
    assert len(values) == 1, f"a mixture of versions: {sorted(values)[:5]}"
    return int(values.pop())


def load_version(agent, area: str, folder: Path, start: int) -> int:
    """Load what the killed child left; the version it holds (checked whole: weights, memory, state)."""
    if area == "agent":
        agent.load(folder)
        version = version_of(agent)
    else:
        checkpoint = folder / "final" if area == "final" else folder
        version = load_training_state(agent, checkpoint)["version"]
        assert version_of(agent) == version
        if area == "final":  # the latest checkpoint loads too, at least as new as final/
            latest = json.loads((folder / "checkpoints" / "latest.json").read_text())["checkpoint"]
            assert load_training_state(agent, folder / "checkpoints" / latest)["version"] >= version
            load_training_state(agent, checkpoint)
    memories = [e.reward for e in agent.episodic_memory]
    assert memories == [float(k) for k in range(start, version + 1)], (start, version, memories)
    return version


def leftovers(folder: Path, alive: int | None) -> list[str]:
    """Temporary files and folders beside ``folder`` of writers other than ``alive``."""
    found = []
    for parent in {folder.parent, folder, folder / "checkpoints"}:
        if parent.is_dir():
            found += [p.name for p in parent.iterdir() if p.name.startswith(".") and f"-{alive}-" not in p.name]
    return found


def operations_per_save(forkserver, area: str, folder: Path) -> int:
    """How many file-system operations one save cycle of ``area`` takes (a child counts them)."""
    count = folder.parent / "count.txt"
    child = forkserver.Process(target=save_loop, args=(area, str(folder), str(folder.parent / "count-done.txt"),
                                                       0, None, str(count)), daemon=True)
    child.start()
    child.join(120)
    assert child.exitcode == 0, child.exitcode
    return int(count.read_text())


@pytest.mark.parametrize("area", ["agent", "checkpoint", "final"])
def test_kill_9_at_every_point_of_a_save_always_leaves_a_whole_loadable_state(tmp_path, forkserver, area):
    """Kill ``k`` lands just before file-system operation ``1 + k * n / KILLS`` of a save of ``n``
    operations: the kills cover the whole save, from its first write to its last rename."""
    agent = build_agent(seed=1)
    folder = tmp_path / "saves" / ("run" if area == "final" else "saved")
    folder.parent.mkdir()
    per_save = operations_per_save(forkserver, area, tmp_path / "calibration" / folder.name)
    in_flight_won, mid_write, start = 0, 0, 0
    for kill in range(KILLS):
        done = tmp_path / "progress" / "done.txt"  # apart, so that its own temporaries are not counted
        done.parent.mkdir(exist_ok=True)
        done.unlink(missing_ok=True)
        kill_at = 1 + kill * per_save // KILLS
        # versions (and the runner's segment numbers) keep growing from child to child, as in a resumed run
        child = forkserver.Process(target=save_loop, args=(area, str(folder), str(done), start, kill_at), daemon=True)
        child.start()
        child.join(120)
        if child.exitcode is None:  # never reached its kill point: kill it from outside
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        assert child.exitcode == -signal.SIGKILL, child.exitcode
        # the earlier killed writers' temporaries are gone once this one has saved
        assert not [p for p in leftovers(folder, child.pid) if "rllama-tmp" in p and f"-{child.pid}-" not in p]
        finished = int(done.read_text())
        mid_write += bool([p for p in leftovers(folder, None) if f"-{child.pid}-" in p])  # its temporary is left
        version = load_version(agent, area, folder, start)
        assert version in (finished, finished + 1), (kill, finished, version)
        in_flight_won += version == finished + 1
        start = finished + 2
    assert mid_write >= KILLS // 4, "too few kills landed inside a write"
    print(f"{area}: {KILLS} kills over a save of {per_save} file operations, all loadable and whole; "
          f"{mid_write} inside a write (a temporary left), {in_flight_won} after the save's commit point")


def test_the_fault_children_make_distinct_versions():
    agent = build_agent()
    from tests.workers.fault_target import set_version

    set_version(agent, 3)
    assert version_of(agent) == 3 and [e.reward for e in agent.episodic_memory] == [3.0]
    assert torch.is_tensor(next(iter(agent.policy.trainable_parameters())))
