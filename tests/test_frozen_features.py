"""Q heads on the model's own features: whitening, head-only updates through the prefix cache."""

from __future__ import annotations

import pytest
import torch

from rllama.errors import RLlamaError
from rllama.policy import PolicyModel, default_lora_config
from rllama.policy.model import ValueHead
from tests.conftest import ChoiceEnv
from tests.test_prefix_cache import candidates, episode_prompts, make_deep_lm


def test_whitening_fits_once_and_gives_unit_variance_components():
    torch.manual_seed(0)
    head = ValueHead(16, whiten=4)
    hidden = torch.randn(500, 16) * torch.logspace(0, -3, 16)  # variances spread over six decades
    assert not head.fitted
    head.linear.bias.data.fill_(0.3)
    assert torch.allclose(head(hidden), torch.full((500, 1), 0.3))  # before the fit: the bias alone
    head.fit_whitening(hidden)
    assert head.fitted and head.linear.bias.item() == 0.0
    x = torch.nn.functional.layer_norm(hidden, (16,)) / 4.0
    z = (x - head.white_mean) @ head.white_basis  # what the linear layer reads
    cov = torch.cov(z.T) * 4  # times k: each component has variance 1/k
    assert torch.allclose(cov, torch.eye(4), atol=5e-3)
    with pytest.raises(RLlamaError, match="already fitted"):
        head.fit_whitening(hidden)
    clone = ValueHead(16, whiten=4)
    clone.load_state_dict(head.state_dict())
    assert clone.fitted and torch.equal(clone(hidden), head(hidden))


@pytest.mark.parametrize("bad", [torch.randn(1, 16), torch.randn(5, 8), torch.full((5, 16), float("nan"))])
def test_whitening_refuses_bad_input(bad):
    with pytest.raises(RLlamaError, match="fit_whitening"):
        ValueHead(16, whiten=4).fit_whitening(bad)
    with pytest.raises(ValueError, match="whiten"):
        ValueHead(16, whiten=17)
    with pytest.raises(RLlamaError, match="no whitening"):
        ValueHead(16).fit_whitening(torch.randn(5, 16))


def test_frozen_body_equals_the_full_forward_and_gives_gradients_to_the_heads_only(tokenizer):
    pol = PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32")
    pol.add_head("q")
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.normal_(0, 0.1)
    prompts = episode_prompts()[:4]
    cands = [candidates(i) for i in range(4)]
    full = pol.candidate_outputs(prompts, cands, q_heads=("q",))
    for _ in range(2):  # the second time from the adapted blocks' cache
        frozen = pol.candidate_outputs(prompts, cands, q_heads=("q",), frozen_body=True)
        for a, b in zip(full.q["q"], frozen.q["q"]):
            assert torch.allclose(a, b, atol=1e-5)
    pol.zero_grad(set_to_none=True)
    torch.stack([q.sum() for q in frozen.q["q"]]).sum().backward()
    head_params = {id(p) for p in pol.heads["q"].parameters()}
    for p in pol.trainable_parameters():
        if id(p) in head_params:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None
    assert pol.engine.stats()["top"]["bytes"] > 0


def test_dqn_with_a_frozen_adapter_trains_its_whitened_q_head_only(make_agent):
    config = {"train_adapter": False, "whiten_features": 8, "learning_starts": 8, "batch_episodes": 4,
              "gradient_steps": 3, "minibatch_size": 4}
    agent = make_agent(algorithm="dqn", algorithm_config=config)
    adapter_before = {k: v for k, v in agent.policy.snapshot(heads=()).items()}
    assert set(agent.algorithm.target) == {"heads.q.linear.weight", "heads.q.linear.bias"}  # no adapter copy
    stats = agent.train(ChoiceEnv(steps=2), 12, seed=0, progress=False)
    assert stats and agent.policy.heads["q"].fitted
    for name, value in agent.policy.snapshot(heads=()).items():
        assert torch.equal(value, adapter_before[name]), name
    assert agent.policy.heads["q"].linear.weight.abs().sum() > 0


def test_sac_with_a_frozen_adapter_trains_its_policy_head_and_critics_only(make_agent):
    from rllama.policy.model import POLICY_HEAD

    config = {"whiten_features": 8, "learning_starts": 8, "batch_episodes": 4, "gradient_steps": 3,
              "minibatch_size": 4, "head_learning_rate": 3e-2}
    agent = make_agent(algorithm="sac", algorithm_config=config)  # train_adapter=False: the default
    groups = agent.algorithm.optimizer.param_groups  # adapter, critics, actor (its own rate)
    assert [g["lr"] for g in groups[1:]] == [3e-2, agent.algorithm.config.actor_learning_rate] and len(groups) == 3
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in agent.policy.heads[POLICY_HEAD].parameters()}
    adapter_before = agent.policy.snapshot(heads=())
    assert set(agent.algorithm.target) == {f"heads.{q}.linear.{w}" for q in ("q1", "q2") for w in ("weight", "bias")}
    probe = agent.chat.prompt_ids([{"role": "user", "content": "n=0"}])
    cands = [[agent.chat.reply_ids(c) for c in agent.candidates]]
    with torch.no_grad():
        before = agent.policy.candidate_outputs([probe], cands).logprobs[0]
    stats = agent.train(ChoiceEnv(steps=2), 12, seed=0, progress=False)
    assert stats and all(agent.policy.heads[h].fitted for h in ("q1", "q2", POLICY_HEAD))
    assert agent.policy.heads[POLICY_HEAD].linear.weight.abs().sum() > 0  # the actor moved
    with torch.no_grad():
        after = agent.policy.candidate_outputs([probe], cands).logprobs[0]
    assert not torch.allclose(before, after)
    for name, value in agent.policy.snapshot(heads=()).items():
        assert torch.equal(value, adapter_before[name]), name


def test_the_policy_head_adds_to_the_scores_but_not_to_the_reference(tokenizer):
    from rllama.algorithms.buffers import Step
    from rllama.policy.model import POLICY_HEAD

    pol = PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32")
    prompts = episode_prompts()[:3]
    cands = [candidates(i) for i in range(3)]
    with torch.no_grad():
        plain = pol.candidate_outputs(prompts, cands).logprobs
    head = pol.add_head(POLICY_HEAD, whiten=8)
    head.fit_whitening(pol.action_features(prompts, cands))
    with torch.no_grad():
        head.linear.weight.normal_(0, 1.0)
        with_head = pol.candidate_outputs(prompts, cands).logprobs
        with pol.reference():
            reference = pol.candidate_outputs(prompts, cands).logprobs
        bonus = torch.split(head(pol.action_features(prompts, cands)).squeeze(-1), [len(c) for c in cands])
    for p, h, r, b in zip(plain, with_head, reference, bonus):
        assert torch.allclose(torch.log_softmax(p + b, -1), h, atol=1e-5)  # logits: score + head
        assert torch.allclose(p, r, atol=1e-5)  # the reference is the model alone (adapter still zero)
    assert any(not torch.allclose(h, p, atol=1e-3) for h, p in zip(with_head, plain))
    steps = [Step(prompt_ids=p, candidate_ids=c, action_index=1, logprob=0.0) for p, c in zip(prompts, cands)]
    ev = pol.evaluate_actions(steps, frozen_body=True)
    for d, h in zip(ev.distributions, with_head):
        assert torch.allclose(d, h, atol=1e-5)
    pol.zero_grad(set_to_none=True)
    torch.stack([d[1] for d in ev.distributions]).sum().backward()
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in pol.named_parameters() if p.requires_grad and "lora_" in n)


def test_on_policy_config_refuses_a_frozen_adapter_without_a_policy_head():
    from rllama.algorithms.ppo import PPOConfig

    with pytest.raises(ValueError, match="train_adapter"):
        PPOConfig(train_adapter=False, policy_head=0)
    with pytest.raises(ValueError, match="train_adapter"):  # "auto" decided as no head: same error
        PPOConfig(train_adapter=False).resolved(scoring=False)
    for bad in ({"policy_head": -1}, {"policy_head": True}, {"policy_head": "64"}):
        with pytest.raises(ValueError, match="policy_head"):
            PPOConfig(**bad)
    with pytest.raises(ValueError, match="learning_starts"):
        PPOConfig(learning_starts="soon")
    with pytest.raises(ValueError, match="head_learning_rate"):
        PPOConfig(head_learning_rate="fast")
    from rllama.algorithms.dqn import DQNConfig

    with pytest.raises(ValueError, match="head_learning_rate"):  # "auto" only where a config decides it
        DQNConfig(head_learning_rate="auto")


@pytest.mark.parametrize("name,head_rate", [("ppo", 1e-2), ("a2c", 3e-2), ("reinforce", 3e-2), ("grpo", 3e-2)])
def test_auto_gives_scoring_agents_a_policy_head_and_generating_ones_the_adapter(name, head_rate):
    from rllama.algorithms import get_algorithm_class

    config = get_algorithm_class(name).config_class()
    assert config.policy_head == "auto"
    scoring = config.resolved(scoring=True)
    assert (scoring.policy_head, scoring.train_adapter, scoring.learning_starts, scoring.head_learning_rate) == \
        (64, False, 500, head_rate)
    for mode in (False, None):  # generating, or unknown: what works in both modes
        plain = config.resolved(scoring=mode)
        assert (plain.policy_head, plain.train_adapter, plain.learning_starts, plain.head_learning_rate) == \
            (0, True, 0, 1e-3)
    mine = type(config)(policy_head=0, learning_starts=7).resolved(scoring=True)  # set values are kept
    assert (mine.policy_head, mine.train_adapter, mine.learning_starts) == (0, True, 7)
    both = type(config)(train_adapter=True).resolved(scoring=True)
    assert (both.policy_head, both.train_adapter) == (64, True)


def test_the_agent_decides_auto_by_how_it_acts(make_agent):
    from rllama.policy.model import POLICY_HEAD
    from tests.conftest import FreeTextAgent

    scoring = make_agent(algorithm="ppo")
    assert scoring.algorithm.config.policy_head == 64 and POLICY_HEAD in scoring.policy.heads
    assert scoring.algorithm.config.train_adapter is False
    generating = make_agent(FreeTextAgent, algorithm="ppo")
    assert generating.algorithm.config.policy_head == 0 and POLICY_HEAD not in generating.policy.heads
    assert generating.algorithm.config.train_adapter is True
    chosen = make_agent(algorithm="ppo", algorithm_config={"policy_head": 0})
    assert POLICY_HEAD not in chosen.policy.heads and chosen.algorithm.config.train_adapter is True


def test_ppo_with_a_policy_head_waits_for_learning_starts_then_trains_the_heads_only(make_agent):
    config = {"policy_head": 8, "train_adapter": False, "learning_starts": 12, "batch_episodes": 4,
              "minibatch_size": 4, "head_learning_rate": 3e-2}
    agent = make_agent(algorithm="ppo", algorithm_config=config)
    lora_before = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if "lora_" in n}
    assert agent.policy.heads["value"].whiten == 8
    stats = agent.train(ChoiceEnv(steps=2), 4, seed=0, progress=False)  # 8 steps: under learning_starts
    assert stats == [] and not agent.policy.heads["policy"].fitted
    stats = agent.train(ChoiceEnv(steps=2), 8, seed=1, progress=False)
    assert stats and stats[0]["rollout/steps"] >= 12  # the first update trains on everything collected
    assert agent.policy.heads["policy"].fitted and agent.policy.heads["value"].fitted
    assert agent.policy.heads["policy"].linear.weight.abs().sum() > 0
    for n, p in agent.policy.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, lora_before[n]), n


def test_a_checkpoint_with_other_heads_gets_a_clear_error(make_agent, tmp_path):
    from rllama.errors import RLlamaError as Error

    trained = make_agent(algorithm="dqn", algorithm_config={"whiten_features": 0, "train_adapter": True})
    trained.save(tmp_path / "agent")
    other = make_agent(algorithm="dqn")  # the default: a whitened Q head, another shape
    with pytest.raises(Error, match="whiten_features"):
        other.load(tmp_path / "agent")


def test_a_generated_step_with_a_frozen_adapter_is_refused_when_acted(make_agent):
    """An agent that says it scores but returns no candidates learns at once that the defaults it got
    (a policy head, the adapter frozen) cannot train on free text, not hundreds of steps later."""
    from tests.conftest import FreeTextAgent

    class SaysItScores(FreeTextAgent):
        def scores_actions(self):
            return True

    agent = make_agent(SaysItScores, algorithm="ppo", max_new_tokens=3)
    assert agent.algorithm.config.train_adapter is False
    with pytest.raises(RLlamaError, match="frozen adapter"):
        agent.train(ChoiceEnv(), 1, progress=False)
    result = agent.evaluate(ChoiceEnv(), 2, seed=0)  # acting without recording is fine
    assert result["n_episodes"] == 2
