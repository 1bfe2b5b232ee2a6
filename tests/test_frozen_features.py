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
    assert pol.prefix_cache_stats()["top"]["bytes"] > 0


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


def test_sac_needs_its_adapter():
    from rllama.algorithms.sac import SACConfig

    with pytest.raises(ValueError, match="train_adapter"):
        SACConfig(train_adapter=False)


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
    ev = pol.evaluate(steps, frozen_body=True)
    for d, h in zip(ev.distributions, with_head):
        assert torch.allclose(d, h, atol=1e-5)
    pol.zero_grad(set_to_none=True)
    torch.stack([d[1] for d in ev.distributions]).sum().backward()
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in pol.named_parameters() if p.requires_grad and "lora_" in n)


def test_on_policy_config_refuses_a_frozen_adapter_without_a_policy_head():
    from rllama.algorithms.ppo import PPOConfig

    with pytest.raises(ValueError, match="train_adapter"):
        PPOConfig(train_adapter=False)
    with pytest.raises(ValueError, match="policy_head"):
        PPOConfig(policy_head=-1)


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
