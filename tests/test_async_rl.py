"""Asynchronous training: policy versions, staleness correction, Ray rollout workers and a learner."""

from __future__ import annotations

import pytest
import torch

from rllama.algorithms.losses import old_unit_logprobs
from tests.conftest import ChoiceAgent, ChoiceEnv, make_tiny_lm, make_tokenizer, right_probability


def test_steps_record_the_policy_version_and_sync_training_is_never_stale(make_agent):
    agent = make_agent(algorithm_config={"batch_episodes": 4, "minibatch_size": 4, "policy_head": 0})
    history = agent.train(ChoiceEnv(steps=2), 8, seed=0, progress=False)
    assert len(history) == 2 and not any("rollout/stale_steps" in h for h in history)
    agent.trainer.auto_update = False
    agent.train(ChoiceEnv(steps=2), 2, seed=1, progress=False)
    assert {s.policy_version for e in agent.algorithm.buffer.episodes for s in e.steps} == {2}


def test_stale_steps_are_corrected_with_capped_importance_weights(make_agent):
    agent = make_agent(algorithm_config={"batch_episodes": 4, "minibatch_size": 16, "learning_rate": 5e-2,
                                         "epochs": 1, "max_importance_weight": 1.05})
    agent.trainer.auto_update = False
    agent.train(ChoiceEnv(steps=2), 8, seed=0, progress=False)  # 8 episodes acted by version 0
    fresh, stale = agent.algorithm.buffer.episodes[:4], agent.algorithm.buffer.episodes[4:]
    agent.algorithm.buffer.episodes = fresh
    first = agent.algorithm.update()  # now at version 1
    assert "rollout/stale_steps" not in first and agent.algorithm.num_updates == 1
    steps = [s for e in stale for s in e.steps]
    behaviour = old_unit_logprobs(steps)
    old_values = [s.value for s in steps]
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps)
    prox = torch.stack([d[s.action_index] for d, s in zip(ev.distributions, steps)])
    expected = (prox - behaviour).exp().clamp(max=1.05)
    assert not torch.allclose(prox, behaviour, atol=1e-4)  # the update moved the policy
    agent.algorithm.buffer.episodes = stale
    second = agent.algorithm.update()
    assert second["rollout/stale_steps"] == len(steps) == 8 and second["rollout/mean_staleness"] == 1.0
    assert second["policy/importance_weight"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert second["policy/importance_weight_capped"] == pytest.approx(float((expected >= 1.05).float().mean()))
    # the stale steps' values were recomputed by the current critic
    assert [s.value for s in steps] == pytest.approx(ev.values.tolist(), abs=1e-5)
    assert [s.value for s in steps] != pytest.approx(old_values, abs=1e-6)


# ---------------------------------------------------------------------------------------------- on Ray
def make_choice_agent(seed):
    torch.set_num_threads(1)
    # PPO's default for a scoring agent: a policy head on whitened features, the adapter frozen (the
    # workers must receive the fitted whitening with the heads); it starts with the first batch here.
    return ChoiceAgent(make_tiny_lm(seed=0), make_tokenizer(), seed=seed, precision="fp32",
                       algorithm_config={"batch_episodes": 8, "minibatch_size": 8, "learning_starts": 16,
                                         "head_learning_rate": 5e-2})


def make_choice_env():
    return ChoiceEnv(steps=2)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from rllama.async_rl import AsyncTrainer

    trainer = AsyncTrainer(make_choice_agent, make_choice_env, num_workers=1)  # initialises Ray as the library does
    trainer._init_ray()
    yield ray
    ray.shutdown()


@pytest.mark.timeout(300)
def test_two_ray_workers_and_a_learner(ray_cluster, capsys):
    from rllama.async_rl import AsyncTrainer

    trainer = AsyncTrainer(make_choice_agent, make_choice_env, num_workers=2, episodes_per_task=4, max_staleness=1)
    before = right_probability(trainer.agent, 3)
    with trainer:
        history = trainer.train(24, progress=False)
        capsys.readouterr()
        history += trainer.train(24, progress=True)  # continues with the tasks still in flight
    err = capsys.readouterr().err  # the synchronous bars' fields, and a closing line
    assert "ret100=" in err and "steps/s=" in err and "upd=" in err and "dropped=" in err and "s/ep" not in err
    assert "train (async): 24 episodes in " in err and "stale episodes dropped" in err
    assert trainer.stats.episodes == 48 and len(history) == 6 and not trainer.workers
    # every task was acted by weights the learner published, and later tasks by newer ones
    assert 0 in trainer.published and all(t["checksum"] == pytest.approx(trainer.published[t["version"]], rel=1e-9)
                                       for t in trainer.tasks)
    assert max(t["version"] for t in trainer.tasks) >= 3
    # staleness: episodes at most one update behind were trained on (and corrected), older ones dropped
    assert all(t["dropped"] == (t["lag"] > 1) for t in trainer.tasks)
    assert trainer.stats.dropped == sum(t["episodes"] for t in trainer.tasks if t["dropped"])
    assert any(h.get("rollout/stale_steps", 0) > 0 for h in history)
    assert all(h["rollout/mean_staleness"] <= 1 for h in history if "rollout/mean_staleness" in h)
    assert trainer.stats.env_steps >= 2 * (trainer.stats.episodes + trainer.stats.dropped)
    # and it learns: "right" is rewarded
    assert right_probability(trainer.agent, 3) > before + 0.05


@pytest.mark.timeout(300)
def test_zero_staleness_drops_every_late_episode(ray_cluster):
    from rllama.async_rl import AsyncTrainer

    with AsyncTrainer(make_choice_agent, make_choice_env, num_workers=2, episodes_per_task=4,
                      max_staleness=0) as trainer:
        history = trainer.train(24, progress=False)
    assert trainer.stats.episodes == 24 and history
    assert all(t["dropped"] == (t["lag"] > 0) for t in trainer.tasks)
    assert not any("rollout/stale_steps" in h for h in history)


def test_async_trainer_errors(make_agent):
    from rllama.async_rl import AsyncTrainer

    def dqn_agent(seed):
        return ChoiceAgent(make_tiny_lm(), make_tokenizer(), seed=seed, algorithm="dqn")

    with pytest.raises(Exception, match="on-policy algorithm without groups"):
        AsyncTrainer(dqn_agent, make_choice_env)
    with pytest.raises(ValueError, match="max_staleness=-1"):
        AsyncTrainer(make_choice_agent, make_choice_env, max_staleness=-1)
