"""Training checkpoints: a run saved and resumed continues exactly like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch

from rllama.checkpoint import CheckpointError, load_training_state, save_training_state
from rllama.loops import run_episodes
from rllama.memory import EpisodicMemory
from tests.conftest import ChoiceEnv

CONFIGS = {
    "ppo": {"batch_episodes": 4, "minibatch_size": 4, "policy_head": 0},  # the adapter trains
    "ppo-lr-decay": {"batch_episodes": 4, "minibatch_size": 4, "policy_head": 0, "lr_decay_episodes": 12},
    "reinforce": {"batch_episodes": 6, "minibatch_size": 4, "baseline": "mean",  # buffer non-empty at saves
                  "policy_head": 0},
    "dqn": {"batch_episodes": 2, "learning_starts": 2, "minibatch_size": 4, "target_update_interval": 3},
    "sac": {"batch_episodes": 2, "learning_starts": 2, "minibatch_size": 4},  # policy head, adapter frozen
    "sac-adapter": {"batch_episodes": 2, "learning_starts": 2, "minibatch_size": 4, "train_adapter": True,
                    "whiten_features": 0},
    "dqn-frozen-adapter": {"batch_episodes": 2, "learning_starts": 2, "minibatch_size": 4, "target_update_interval": 3,
                           "train_adapter": False, "whiten_features": 4},  # whitening fitted before the save
    "ppo-policy-head": {"batch_episodes": 4, "minibatch_size": 4, "policy_head": 4, "train_adapter": False,
                        "learning_starts": 8},
}


def segments(agent, envs, start: int, stop: int) -> None:
    for k in range(start, stop):
        run_episodes(agent, envs, 4, seed=1000 + k)


def params(agent) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_resume_continues_bit_for_bit(make_agent, tmp_path, case):
    algorithm = case.split("-")[0]

    def new_agent():
        return make_agent(algorithm=algorithm, algorithm_config=CONFIGS[case],
                          memory=EpisodicMemory("hashing", k=1))

    def envs():
        return gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=2) for _ in range(2)])

    straight = new_agent()
    segments(straight, envs(), 0, 4)

    first = new_agent()
    segments(first, envs(), 0, 2)
    save_training_state(first, tmp_path / "ckpt", extra={"segment": 2})
    del first
    resumed = make_agent(algorithm=algorithm, algorithm_config=CONFIGS[case], seed=123,  # other seed: all
                         memory=EpisodicMemory("hashing", k=1))                              # state comes from disk
    assert load_training_state(resumed, tmp_path / "ckpt") == {"segment": 2}
    segments(resumed, envs(), 2, 4)

    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight.algorithm.num_updates == resumed.algorithm.num_updates > 0
    assert (straight.total_steps, straight.total_episodes) == (resumed.total_steps, resumed.total_episodes)
    assert [vars(e) for e in straight.episodic_memory] == [vars(e) for e in resumed.episodic_memory]


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce", "grpo", "dqn", "sac"])
def test_only_algorithms_that_keep_episodes_have_and_save_an_episode_buffer(make_agent, algorithm):
    """On-policy algorithms (and plain ``Algorithm`` subclasses) buffer finished episodes and save them;
    off-policy ones keep their experience in the replay buffer alone."""
    on_policy = algorithm in ("ppo", "reinforce", "grpo")
    agent = make_agent(algorithm=algorithm, algorithm_config={"batch_episodes": 8})  # 3 episodes: no update
    run_episodes(agent, ChoiceEnv(steps=2), 3, seed=0)
    algo = agent.algorithm
    assert algo.keeps_episodes is on_policy and hasattr(algo, "buffer") is on_policy
    _, meta = algo.state_dict()
    if on_policy:
        assert len(meta["buffer"]) == 3
    else:
        assert "buffer" not in meta and len(algo.replay) == 6
        tensors, meta = algo.state_dict()
        algo.load_state_dict(tensors, {**meta, "buffer": []})  # as older versions saved it
        assert not hasattr(algo, "buffer") and len(algo.replay) == 6


def test_checkpoint_refuses_mismatches_and_half_episodes(make_agent, tmp_path):
    agent = make_agent(algorithm="ppo")
    agent.act(1)
    with pytest.raises(CheckpointError, match="mid-episode"):
        save_training_state(agent, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    agent.reset()
    save_training_state(agent, tmp_path / "x")
    with pytest.raises(CheckpointError, match="trained with 'ppo'"):
        load_training_state(make_agent(algorithm="a2c"), tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a complete"):
        load_training_state(agent, tmp_path / "nothing")


def test_save_replaces_an_existing_checkpoint_atomically(make_agent, tmp_path):
    agent = make_agent(algorithm="ppo")
    save_training_state(agent, tmp_path / "ckpt", extra={"n": 1})
    save_training_state(agent, tmp_path / "ckpt", extra={"n": 2})
    assert load_training_state(agent, tmp_path / "ckpt") == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("what", ["training state", "policy"])
def test_a_crash_between_the_two_renames_of_a_save_loses_nothing(make_agent, tmp_path, monkeypatch, what):
    from rllama import fileio

    agent = make_agent(algorithm="ppo")
    save = (lambda: save_training_state(agent, tmp_path / "ckpt", extra={"n": 1})) if what == "training state" \
        else (lambda: agent.save(tmp_path / "ckpt"))
    save()
    before = params(agent)
    with torch.no_grad():
        for p in agent.policy.trainable_parameters():
            p.add_(1.0)
    real = fileio.os.replace

    def crash_on_the_second_rename(src, dst):  # the old folder moved aside, the new one not yet in place
        if Path(dst) == tmp_path / "ckpt" and (tmp_path / ".ckpt.old").exists():
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", crash_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save()
    monkeypatch.setattr(fileio.os, "replace", real)
    assert not (tmp_path / "ckpt").exists()  # the old folder waits as .ckpt.old
    if what == "training state":
        assert load_training_state(agent, tmp_path / "ckpt") == {"n": 1}
    else:
        agent.load(tmp_path / "ckpt")
    after = params(agent)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the previous save, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left


def test_a_failed_write_leaves_the_previous_folder_and_no_temporary_one(tmp_path):
    from rllama.fileio import writing_dir

    with writing_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), writing_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("disk full")
    assert (tmp_path / "out" / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with writing_dir(tmp_path / "out", replace=False) as tmp:  # another process got there first: keep its copy
        (tmp / "a").write_text("mine")
    assert (tmp_path / "out" / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("algorithm", ["ppo", "dqn"])
def test_with_the_prefix_cache_a_run_that_saved_continues_as_its_resume_does(tokenizer, tmp_path, algorithm):
    from tests.conftest import ChoiceAgent
    from tests.test_prefix_cache import make_deep_lm

    def new_agent(seed=0):  # 10 blocks, the default LoRA adapts the top 8: two blocks are cached
        agent = ChoiceAgent(make_deep_lm(layers=10), tokenizer, seed=seed, precision="fp32", algorithm=algorithm,
                            algorithm_config=CONFIGS[algorithm])
        assert agent.policy.engine.stats()
        return agent

    def envs():
        return gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=2) for _ in range(2)])

    straight = new_agent()
    segments(straight, envs(), 0, 2)
    save_training_state(straight, tmp_path / "ckpt")  # and goes on: its cache was emptied by the save
    segments(straight, envs(), 2, 4)
    resumed = new_agent(seed=123)
    load_training_state(resumed, tmp_path / "ckpt")
    segments(resumed, envs(), 2, 4)
    a, b = params(straight), params(resumed)
    assert straight.algorithm.num_updates == resumed.algorithm.num_updates > 1
    for name in a:
        assert torch.equal(a[name], b[name]), name
