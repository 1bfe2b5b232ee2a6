"""Saves that are whole or absent, loads that check everything before changing anything (issue 23):
damaged, truncated, forged or mismatched files raise an error naming the file and leave the agent as
it was."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rllama import CorruptFileError, PolicyModel, RLlamaError
from rllama.checkpoint import CheckpointError, load_training_state, save_training_state
from rllama.fileio import write_manifest
from rllama.loops import run_episodes
from rllama.memory import EpisodicMemory
from tests.conftest import ChoiceEnv, make_tiny_lm


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
    with pytest.raises(CorruptFileError, match="memory"):
        agent.load(tmp_path / "agent")
    set_format_version(tmp_path / "agent", 1)  # even in an old format with no manifest to say so
    (tmp_path / "agent" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="older than manifests"), pytest.raises(CorruptFileError, match="memory"):
        agent.load(tmp_path / "agent")


def set_format_version(folder: Path, version: int) -> None:
    meta = json.loads((folder / "policy.json").read_text())
    meta["format_version"] = version
    (folder / "policy.json").write_text(json.dumps(meta))


def flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_without_its_manifest_is_refused(make_agent, tmp_path):
    """The current formats always carry their checksums: a folder that lost them is refused, not loaded
    with whatever weights it now holds."""
    agent = trained_agent(make_agent)
    agent.save(tmp_path / "agent")
    save_training_state(agent, tmp_path / "ckpt")
    before = weights(agent)
    for folder in (tmp_path / "agent", tmp_path / "ckpt" / "policy"):
        (folder / "manifest.json").unlink()
        flip_a_byte(folder / "adapter" / "adapter_model.safetensors")
    with pytest.raises(CorruptFileError, match=r"agent/manifest.json is missing, but .*policy.json has "
                                               r"format_version 2, whose folders always carry one"):
        agent.load(tmp_path / "agent")
    with pytest.raises(CorruptFileError, match=r"adapter_model.safetensors does not match its checksum in .*ckpt/"):
        load_training_state(agent, tmp_path / "ckpt")  # the training state's own manifest still covers it
    (tmp_path / "ckpt" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt/manifest.json is missing, but .*state.json has version 2"):
        load_training_state(agent, tmp_path / "ckpt")
    write_manifest(tmp_path / "ckpt")  # a forged outer manifest: the policy's missing one still stops it
    with pytest.raises(CorruptFileError, match=r"policy/manifest.json is missing, but .*format_version 2"):
        load_training_state(agent, tmp_path / "ckpt")
    assert same(weights(agent), before)


def test_a_policy_folder_older_than_manifests_loads_with_a_warning(make_agent, tmp_path):
    agent = trained_agent(make_agent)
    agent.save(tmp_path / "agent")
    saved = weights(agent)
    set_format_version(tmp_path / "agent", 1)
    (tmp_path / "agent" / "manifest.json").unlink()
    nudge(agent)
    with pytest.warns(UserWarning, match=r"agent has no checksum manifest .* older than manifests"):
        agent.load(tmp_path / "agent")
    assert same(weights(agent), saved)
    set_format_version(tmp_path / "agent", 3)
    with pytest.raises(RLlamaError, match="format_version 3, newer than this rllama reads"):
        agent.load(tmp_path / "agent")


def test_a_memory_store_without_its_checksum_is_refused(tmp_path):
    from rllama.memory import Experience, MemoryStoreError

    memory = EpisodicMemory("hashing", k=1)
    memory.add([Experience(observation="a", action="b", reward=1.0)])
    memory.save(tmp_path / "store")
    path = tmp_path / "store" / "memory.json"
    manifest = json.loads(path.read_text())
    del manifest["content_sha256"]
    manifest["entries"][0]["reward"] = 99.0
    path.write_text(json.dumps(manifest))
    with pytest.raises(MemoryStoreError, match=r"memory.json has no content_sha256, but its version 2 always"):
        EpisodicMemory.load(tmp_path / "store")
    manifest["version"] = 1  # a store older than the digest: loads, with a warning
    path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="older than store checksums"):
        assert EpisodicMemory.load(tmp_path / "store").entries[0].reward == 99.0


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


# ------------------------------------------------------------------------------------------ another base model
def forge_copy(source: Path, target: Path, meta: dict) -> None:
    """A copy of a saved policy folder with another policy.json, its manifest written to match."""
    import shutil

    shutil.copytree(source, target)
    (target / "policy.json").write_text(json.dumps(meta))
    write_manifest(target)


def named_lm(name: str, kind: str = "llama", vocab_size: int = 384):
    lm = make_tiny_lm(kind, vocab_size=vocab_size)
    lm.config._name_or_path = name
    return lm


def test_a_checkpoint_of_another_base_model_is_refused_or_named(tokenizer, tmp_path):
    """Another vocabulary or architecture cannot take the adapter: refused, naming both models; another
    model of the same shapes can (a deliberate transfer): loaded, with a warning naming both."""
    saved = PolicyModel(named_lm("org/model-a"), tokenizer, precision="fp32")
    with torch.no_grad():
        for p in saved.trainable_parameters():
            p.add_(0.25)  # weights another tiny model does not start with
    saved.save(tmp_path / "ckpt")
    other_vocab = PolicyModel(named_lm("org/model-b", vocab_size=512), tokenizer, precision="fp32")
    before = {n: p.detach().clone() for n, p in other_vocab.named_parameters() if p.requires_grad}
    with pytest.raises(RLlamaError, match=r"vocabulary of 384 tokens, this policy's base model has 512 \(saved on "
                                          r"'org/model-a', loading into 'org/model-b'\)"):
        other_vocab.load(tmp_path / "ckpt")
    assert all(torch.equal(p, before[n]) for n, p in other_vocab.named_parameters() if p.requires_grad)
    other_kind = PolicyModel(named_lm("org/gpt", kind="gpt2"), tokenizer, precision="fp32")
    with pytest.raises(RLlamaError, match=r"trained on a 'llama' model, this policy's base model is a 'gpt2' one"):
        other_kind.load(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "policy.json").read_text())
    for key, value in (("vocab_size", "384"), ("architecture", ["llama"]), ("base_model", 5)):
        forged = tmp_path / f"forged-{key}"
        forge_copy(tmp_path / "ckpt", forged, dict(meta, **{key: value}))
        with pytest.raises(CorruptFileError, match=re.escape(f"policy.json: {key}={value!r}; expected")):
            other_vocab.load(forged)
    same_shapes = PolicyModel(named_lm("org/model-c"), tokenizer, precision="fp32")
    with pytest.warns(UserWarning, match="trained on base model 'org/model-a' and is loaded into 'org/model-c'"):
        same_shapes.load(tmp_path / "ckpt")
    for name, p in saved.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(same_shapes.named_parameters())[name]), name


def test_a_model_of_other_shapes_and_name_is_refused_naming_both_without_a_warning(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    saved = PolicyModel(named_lm("org/model-a"), tokenizer, precision="fp32")
    saved.save(tmp_path / "ckpt")
    config = named_lm("x").config.to_dict()
    config.update(intermediate_size=96)
    config.pop("_name_or_path", None)
    wide = LlamaForCausalLM(LlamaConfig(**config))
    wide.config._name_or_path = "org/model-wide"
    other = PolicyModel(wide, tokenizer, precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the shapes fit" before the refusal
        with pytest.raises(CorruptFileError, match=r"other modules or shapes than this policy's \(saved on "
                                                   r"'org/model-a', loading into 'org/model-wide'\)"):
            other.load(tmp_path / "ckpt")


def test_a_manifest_that_leaves_out_what_is_read_is_refused(make_agent, tmp_path):
    agent = trained_agent(make_agent)
    agent.save(tmp_path / "agent")
    save_training_state(agent, tmp_path / "ckpt")
    for folder in (tmp_path / "agent", tmp_path / "ckpt"):
        (folder / "manifest.json").write_text(json.dumps({"format": "rllama.manifest", "version": 1, "files": {}}))
    with pytest.raises(CorruptFileError, match=r"agent/manifest.json does not list \['policy.json'"):
        agent.load(tmp_path / "agent")
    with pytest.raises(CorruptFileError, match=r"ckpt/manifest.json does not list \['state.json'"):
        load_training_state(agent, tmp_path / "ckpt")


def test_warnings_point_at_the_users_line(make_agent, tmp_path):
    agent = trained_agent(make_agent)
    agent.save(tmp_path / "agent")
    set_format_version(tmp_path / "agent", 1)
    (tmp_path / "agent" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="older than manifests") as caught:
        agent.load(tmp_path / "agent")
    assert {Path(w.filename).name for w in caught} == {"test_integrity.py"}
