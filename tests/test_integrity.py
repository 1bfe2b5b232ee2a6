"""Saves that are whole or absent, loads that check everything before changing anything (issue 23):
damaged, truncated, forged or mismatched files raise an error naming the file and leave the agent as
it was."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rllama import CorruptFileError
from rllama.checkpoint import CheckpointError, load_training_state, save_training_state
from rllama.fileio import write_manifest
from rllama.loops import run_episodes
from rllama.memory import EpisodicMemory
from tests.conftest import ChoiceEnv


def trained_agent(make_agent, **kwargs):
    agent = make_agent(algorithm="ppo", algorithm_config={"batch_episodes": 2, "minibatch_size": 2},
                       memory=EpisodicMemory("hashing", k=1), **kwargs)
    run_episodes(agent, ChoiceEnv(steps=2), 4, seed=0)
    return agent


def weights(agent) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}


def nudge(agent) -> None:
    with torch.no_grad():
        for p in agent.policy.trainable_parameters():
            p.add_(0.5)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_agent_save_is_whole_or_the_previous_one_memory_included(make_agent, tmp_path, monkeypatch):
    agent = trained_agent(make_agent)
    agent.save(tmp_path / "agent")
    saved, n_memories = weights(agent), len(agent.episodic_memory)
    nudge(agent)
    run_episodes(agent, ChoiceEnv(steps=2), 2, seed=1)  # more memories

    def killed(self, path):
        raise KeyboardInterrupt("killed while writing the memory")

    monkeypatch.setattr(EpisodicMemory, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        agent.save(tmp_path / "agent")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent"]  # no temporary folder left
    fresh = make_agent(algorithm="ppo", algorithm_config={"batch_episodes": 2, "minibatch_size": 2},
                       memory=EpisodicMemory("hashing", k=1))
    fresh.load(tmp_path / "agent")
    assert same(weights(fresh), saved) and len(fresh.episodic_memory) == n_memories


def test_a_save_that_lost_its_memory_is_refused(make_agent, tmp_path):
    import shutil

    agent = trained_agent(make_agent)
    agent.save(tmp_path / "agent")
    shutil.rmtree(tmp_path / "agent" / "memory")
    (tmp_path / "agent" / "manifest.json").unlink()  # even with no manifest to say so
    with pytest.raises(CorruptFileError, match="memory"):
        agent.load(tmp_path / "agent")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_every_damaged_file_of_a_save_is_named_and_the_agent_left_as_it_was(make_agent, tmp_path, damage):
    agent = trained_agent(make_agent)
    save_training_state(agent, tmp_path / "ckpt", extra={"n": 1})
    nudge(agent)
    before = weights(agent)
    rng = random.Random(0)
    checked = 0
    for path in files(tmp_path / "ckpt"):
        original = path.read_bytes()
        if not original:
            continue
        if damage == "flip":
            at = rng.randrange(len(original))
            path.write_bytes(original[:at] + bytes([original[at] ^ (1 << rng.randrange(8))]) + original[at + 1:])
        else:
            path.write_bytes(original[: rng.randrange(len(original))])
        with pytest.raises(CorruptFileError) as caught:
            load_training_state(agent, tmp_path / "ckpt")
        named = str(caught.value)
        assert path.name in named or "manifest.json" in named, named
        assert same(weights(agent), before)
        path.write_bytes(original)
        checked += 1
    assert checked >= 10  # policy, adapter, heads, memory store, state and their manifests
    assert load_training_state(agent, tmp_path / "ckpt") == {"n": 1}


def forge(folder: Path, edit) -> None:
    """Change a saved folder and write its manifests again, as a consistent but wrong save would be."""
    edit(folder)
    write_manifest(folder)


@pytest.mark.parametrize("case", ["nan-adapter", "nan-heads", "temperature", "normalization", "extra-tensor"])
def test_forged_values_are_refused_before_anything_changes(make_agent, tmp_path, case):
    agent = trained_agent(make_agent)
    agent.save(tmp_path / "agent")
    folder = tmp_path / "agent"

    def edit(folder):
        if case in ("nan-adapter", "extra-tensor"):
            file = folder / "adapter" / "adapter_model.safetensors"
            tensors = load_file(str(file))
            name = sorted(tensors)[0]
            if case == "extra-tensor":
                tensors["surprise"] = torch.zeros(2)
            else:
                tensors[name] = torch.full_like(tensors[name], float("nan"))
            save_file(tensors, str(file))
        elif case == "nan-heads":
            file = folder / "heads.safetensors"
            tensors = load_file(str(file))
            tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
            save_file(tensors, str(file))
        else:
            meta = json.loads((folder / "policy.json").read_text())
            meta.update({"temperature": -1} if case == "temperature" else {"score_normalization": "max"})
            (folder / "policy.json").write_text(json.dumps(meta))

    if case == "nan-heads" and not agent.policy.heads.state_dict():
        pytest.skip("no heads")
    forge(folder, edit)
    nudge(agent)
    before, temperature = weights(agent), agent.policy.temperature
    with pytest.raises(CorruptFileError, match={"nan-adapter": "NaN", "nan-heads": "NaN", "temperature": "temperature",
                                                "normalization": "score_normalization",
                                                "extra-tensor": "surprise"}[case]):
        agent.load(folder)
    assert same(weights(agent), before) and agent.policy.temperature == temperature


def test_an_agent_with_a_named_adapter_loads_its_own_save_and_resumes(make_agent, tmp_path):
    agent = trained_agent(make_agent, adapter="skill")
    assert agent.policy.active_adapter == "skill"
    save_training_state(agent, tmp_path / "ckpt", extra={"n": 1})
    saved = weights(agent)
    fresh = make_agent(algorithm="ppo", algorithm_config={"batch_episodes": 2, "minibatch_size": 2},
                       memory=EpisodicMemory("hashing", k=1), adapter="skill", seed=5)
    assert not same(weights(fresh), saved)
    assert load_training_state(fresh, tmp_path / "ckpt") == {"n": 1}
    assert same(weights(fresh), saved)


def test_a_checkpoint_that_fails_part_way_leaves_the_agent_as_it_was(make_agent, tmp_path):
    agent = trained_agent(make_agent)
    save_training_state(agent, tmp_path / "ckpt", extra={"n": 1})

    def edit(folder):  # a consistent folder whose optimizer state does not fit the agent
        state = json.loads((folder / "state.json").read_text())
        state["algorithm"]["optimizer"] = {"state": {}, "param_groups": []}
        (folder / "state.json").write_text(json.dumps(state))

    forge(tmp_path / "ckpt", edit)
    nudge(agent)
    before, steps = weights(agent), agent.total_steps
    with pytest.raises(CheckpointError, match="unchanged"):
        load_training_state(agent, tmp_path / "ckpt")
    assert same(weights(agent), before) and agent.total_steps == steps


@pytest.mark.parametrize("key", ["algorithm", "agent", "rng", "extra"])
def test_a_state_file_missing_a_part_is_named(make_agent, tmp_path, key):
    agent = trained_agent(make_agent)
    save_training_state(agent, tmp_path / "ckpt")

    def edit(folder):
        state = json.loads((folder / "state.json").read_text())
        del state[key]
        (folder / "state.json").write_text(json.dumps(state))

    forge(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=f"state.json: '{key}' is missing"):
        load_training_state(agent, tmp_path / "ckpt")


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(make_agent, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (tmp_path / f".ckpt.rllama-tmp-{pid}-abc").mkdir()
    (tmp_path / f".ckpt.rllama-tmp-{pid}-abc" / "heads.safetensors").write_bytes(b"half")
    (tmp_path / f".other.rllama-tmp-{pid}-x.tmp").write_text("{")  # any name's
    (tmp_path / f".ckpt.rllama-tmp-{os.getpid()}-live").mkdir()  # a live writer's: kept
    (tmp_path / ".ckpt-12-user-file").mkdir()  # not rllama's: kept
    agent = make_agent(algorithm="ppo")
    save_training_state(agent, tmp_path / "ckpt")
    from rllama.fileio import atomic_write

    atomic_write(tmp_path / "latest.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", "latest.json", ".ckpt-12-user-file",
                                                                 f".ckpt.rllama-tmp-{os.getpid()}-live"])
