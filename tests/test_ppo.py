"""PPO: it moves probability toward rewarded actions, trains only the adapter and heads."""

from __future__ import annotations

import pytest
import torch

from rllama.algorithms import PPO, PPOConfig
from tests.conftest import ChoiceEnv, FreeTextAgent


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_generate_mode_update_raises_logprob_of_positive_and_lowers_negative_replies(make_agent):
    """Free text: replies with positive advantage become likelier, negative ones less likely."""
    agent = make_agent(FreeTextAgent, max_new_tokens=3,
                       algorithm_config={"batch_episodes": 8, "minibatch_size": 8, "epochs": 1,
                                         "learning_rate": 1e-3, "kl_coef": 0.0, "ent_coef": 0.0,
                                         "normalize_advantages": True})
    # The reward depends on the first byte of the reply, so replies differ in advantage.
    agent.extract_action = lambda response: 1 if response[:1] < "\x80" else 0
    agent.action_space = ChoiceEnv().action_space
    steps = []
    for k in range(8):
        agent.act(k)
        agent.assign_reward(1.0 if k % 2 == 0 else -1.0)
        steps.append(agent.recorder[0].steps[-1])
        stats = agent.terminate_episode()
    assert stats, "the update should have run"
    with torch.no_grad():
        after = agent.policy.evaluate_actions(steps, with_entropy=False).distributions
    for k, (step, dist) in enumerate(zip(steps, after)):
        delta = float(dist.sum()) - step.logprob
        if k % 2 == 0:
            assert delta > 0, (k, delta)
        else:
            assert delta < 0, (k, delta)


def test_base_weights_never_change_and_every_trainable_parameter_does(make_agent):
    agent = make_agent(algorithm_config={"policy_head": 0, "batch_episodes": 4, "minibatch_size": 4,
                                         "learning_rate": 1e-3})
    before = _params(agent.policy)
    agent.train(ChoiceEnv(steps=2), 4, seed=0, progress=False)
    after = _params(agent.policy)
    trainable = {n for n, p in agent.policy.named_parameters() if p.requires_grad}
    for name in before:
        if name in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not change"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"


def test_kl_to_reference_is_zero_before_training_and_grows(make_agent):
    agent = make_agent(algorithm_config={"policy_head": 0, "batch_episodes": 4, "minibatch_size": 2, "epochs": 2,
                                         "learning_rate": 5e-3})
    stats = agent.train(ChoiceEnv(), 4, seed=0, progress=False)[0]
    # The adapter starts as the identity (LoRA B = 0), so the first minibatch has KL 0; later ones do not.
    assert stats["policy/kl_ref"] > 0
    steps = []
    for k in range(3):
        agent.act(k)
        steps.append(agent.recorder[0].steps[-1])
        agent.assign_reward(0.0)
        agent.terminate_episode()
    reference = agent.algorithm.reference_distributions(steps)
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps)
    from rllama.algorithms import kl_to_reference

    assert torch.all(kl_to_reference(ev, reference, steps) > 0)
    assert torch.allclose(kl_to_reference(ev, ev.distributions, steps), torch.zeros(3), atol=1e-6)


def test_target_kl_stops_epochs_early(make_agent):
    agent = make_agent(algorithm_config={"policy_head": 0, "batch_episodes": 8, "minibatch_size": 2, "epochs": 8,
                                         "learning_rate": 5e-2, "target_kl": 1e-4})
    stats = agent.train(ChoiceEnv(), 8, seed=0, progress=False)[0]
    assert stats["train/minibatches"] < 8 * 4


@pytest.mark.parametrize("field,value", [("epochs", 0), ("clip_range", 0.0), ("gamma", 1.5),
                                         ("learning_rate", -1.0), ("batch_episodes", 0), ("kl_coef", -0.1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})


def test_auto_sizes_follow_what_the_policy_is():
    """The adapter alone as the policy (a scoring agent without a head, every generating agent) gets the
    large batches it learns with; beside a head, and wherever the user set a value, nothing changes."""
    from rllama.algorithms.a2c import A2CConfig

    def sizes(config):
        return config.learning_rate, config.batch_episodes, config.minibatch_size

    assert sizes(PPOConfig(policy_head=0).resolved(scoring=True)) == (1e-3, 64, 64)
    assert sizes(PPOConfig().resolved(scoring=True)) == (5e-5, 16, 4)              # a policy head
    assert sizes(PPOConfig(train_adapter=True).resolved(scoring=True)) == (5e-5, 16, 4)
    assert sizes(PPOConfig().resolved(scoring=False)) == (1e-3, 64, 64)            # generate mode: no head
    assert sizes(PPOConfig().resolved(scoring=None)) == (1e-3, 64, 64)             # unknown: no head either
    assert sizes(PPOConfig(policy_head=8).resolved(scoring=False)) == (5e-5, 16, 4)
    assert sizes(PPOConfig(policy_head=0, learning_rate=3e-4, batch_episodes=8).resolved(scoring=True)) == \
        (3e-4, 8, 64)
    for field in ("learning_rate", "batch_episodes", "minibatch_size"):
        with pytest.raises(ValueError, match=f"A2CConfig.{field}='auto' must be"):
            A2CConfig(**{field: "auto"})  # only algorithms measured with them take "auto"
        with pytest.raises(ValueError, match=f"PPOConfig.{field}='fast' must be .* or 'auto'"):
            PPOConfig(**{field: "fast"})


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "grpo"])
def test_learning_rates_decay_linearly_to_their_floor_over_the_episodes_named(make_agent, algorithm):
    config = {"policy_head": 0, "batch_episodes": 4, "minibatch_size": 4, "learning_rate": 1e-3,
              "lr_decay_episodes": 8, "lr_decay_to": 0.25}
    if algorithm == "grpo":
        config.update(group_size=2)
    agent = make_agent(algorithm=algorithm, algorithm_config=config)
    stats = agent.train(ChoiceEnv(steps=2), 16, seed=0, progress=False)
    # Before the first update no episode has trained: full rate; after 4 of 8: 1 - 0.75 / 2; then the floor.
    assert [round(s["train/learning_rate"] / 1e-3, 6) for s in stats] == [1.0, 0.625, 0.25, 0.25]
    heads = agent.algorithm.optimizer.param_groups[1]
    assert heads["lr"] == pytest.approx(agent.algorithm.base_learning_rates[1] * 0.25)
    late = make_agent(algorithm=algorithm, algorithm_config={**config, "lr_decay_start": 8})
    assert [round(s["train/learning_rate"] / 1e-3, 6)
            for s in late.train(ChoiceEnv(steps=2), 24, seed=0, progress=False)] == [1.0, 1.0, 1.0, 0.625, 0.25, 0.25]
    constant = make_agent(algorithm=algorithm, algorithm_config={**config, "lr_decay_episodes": None})
    assert {s["train/learning_rate"] for s in constant.train(ChoiceEnv(steps=2), 8, seed=0, progress=False)} == {1e-3}


@pytest.mark.parametrize("field,value", [("lr_decay_episodes", 0), ("lr_decay_episodes", 2.5),
                                         ("lr_decay_to", 1.5), ("lr_decay_to", -0.1), ("lr_decay_to", True),
                                         ("lr_decay_start", -1), ("lr_decay_start", 1.5)])
def test_decay_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})


def test_config_instance_and_dict_are_accepted(make_agent):
    agent = make_agent(algorithm_config=PPOConfig(epochs=3))
    assert isinstance(agent.algorithm, PPO) and agent.algorithm.config.epochs == 3
    agent = make_agent(algorithm_config={"epochs": 5})
    assert agent.algorithm.config.epochs == 5


@pytest.mark.parametrize("algorithm,cls", [("ppo", "scoring"), ("ppo", "free"), ("grpo", "scoring"), ("a2c", "free")])
def test_a_minibatch_split_into_passes_takes_the_step_of_one_pass(make_agent, monkeypatch, algorithm, cls):
    """``max_pass_tokens`` evaluates a minibatch in several passes whose gradients add up: the update ends at
    the weights (and statistics) of one pass over the whole minibatch, in more forward passes."""
    agent_cls = FreeTextAgent if cls == "free" else None
    config = {"policy_head": 0, "batch_episodes": 8, "minibatch_size": 8, "learning_rate": 1e-3}
    if algorithm != "a2c":
        config.update(epochs=1)
    if algorithm == "grpo":
        config.update(group_size=2)
    results = []
    for limit in (None, 40):
        kwargs = {"max_new_tokens": 3} if agent_cls else {}
        agent = make_agent(*(agent_cls,) if agent_cls else (), algorithm=algorithm,
                           algorithm_config={**config, "max_pass_tokens": limit}, **kwargs)
        if agent_cls:
            agent.extract_action = lambda response: 1 if response[:1] < "\x80" else 0
        # plain SGD: its step is linear in the gradient, where Adam's first step is its sign
        agent.algorithm.optimizer = torch.optim.SGD(
            [{"params": g["params"], "lr": g["lr"]} for g in agent.algorithm.optimizer.param_groups])
        passes = []
        minibatch = agent.algorithm.minibatch
        monkeypatch.setattr(agent.algorithm, "minibatch", lambda data, rows, passes=passes, minibatch=minibatch:
                            passes.append(len(rows)) or minibatch(data, rows))
        before = _params(agent.policy)
        stats = agent.train(ChoiceEnv(steps=2), 8, seed=0, progress=False)[0]
        results.append((_params(agent.policy), stats, passes))
    (one, one_stats, one_passes), (split, split_stats, split_passes) = results
    assert one_passes == [8, 8] and len(split_passes) > 4 and sum(split_passes) == 16, (one_passes, split_passes)
    assert any(not torch.equal(one[n], before[n]) for n in one), "the update should have moved the weights"
    for name in one:
        assert torch.allclose(one[name], split[name], atol=1e-6, rtol=1e-4), name
    for key in ("loss/total", "loss/policy", "policy/approx_kl", "train/grad_norm"):
        # abs: a policy loss near zero is a sum of terms that cancel, added in another order per pass
        # (1.5e-7 apart on an AMD EPYC); dropping the passes' weights moves it by its own size or more
        assert one_stats[key] == pytest.approx(split_stats[key], rel=1e-4, abs=1e-6), key


def test_max_pass_tokens_must_be_none_or_positive():
    assert PPOConfig(max_pass_tokens=None).max_pass_tokens is None
    for bad in (0, -5, 2.5, True, "8192"):
        with pytest.raises(ValueError, match="max_pass_tokens"):
            PPOConfig(max_pass_tokens=bad)
