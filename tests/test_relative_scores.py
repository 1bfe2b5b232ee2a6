"""``score_normalization="relative"``: a candidate's score minus the base model's, so the untrained policy is
uniform whatever the prompt makes the model prefer, the adapter alone moves it, and the reference is uniform."""

from __future__ import annotations

import pytest
import torch

from rllama.policy import PolicyModel, default_lora_config
from tests.conftest import ChoiceEnv, right_probability
from tests.test_prefix_cache import candidates, episode_prompts, make_deep_lm


def make_policy(tokenizer, normalization: str) -> PolicyModel:
    return PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32",
                       score_normalization=normalization)


def perturb_adapter(policy: PolicyModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def test_relative_scores_are_the_adapted_model_against_the_base_model(tokenizer):
    relative, mean = make_policy(tokenizer, "relative"), make_policy(tokenizer, "mean")
    prompts, cands = episode_prompts()[:3], [candidates(i) for i in range(3)]
    with torch.no_grad():
        untrained = relative.candidate_outputs(prompts, cands).logprobs
        base = mean.candidate_outputs(prompts, cands).logprobs
    for lp, b in zip(untrained, base):  # uniform, where the base model's own preference is not
        torch.testing.assert_close(lp, torch.full_like(lp, -torch.log(torch.tensor(float(len(lp))))))
        assert b.max() - b.min() > 0.01
    perturb_adapter(relative)
    perturb_adapter(mean)
    with torch.no_grad():
        adapted = mean.candidate_outputs(prompts, cands).logprobs
        out = relative.candidate_outputs(prompts, cands).logprobs
        with relative.reference():  # the reference policy: the adapter disabled, relative to itself
            ref = relative.candidate_outputs(prompts, cands).logprobs
    for lp, a, b, r in zip(out, adapted, base, ref):
        # the "mean" scores' log-softmax differs from the scores by a constant per prompt, which cancels
        torch.testing.assert_close(lp, torch.log_softmax(a - b, -1), atol=1e-5, rtol=0)
        assert lp.max() - lp.min() > 0.01
        torch.testing.assert_close(r, torch.full_like(r, r[0].item()))


def test_recorded_steps_are_evaluated_as_they_were_scored_and_only_the_adapter_gets_gradients(make_agent):
    agent = make_agent(algorithm="ppo", score_normalization="relative", algorithm_config={"policy_head": 0})
    perturb_adapter(agent.policy)
    agent.reset()
    agent.act(3)
    steps = agent.recorder[0].steps
    evaluation = agent.policy.evaluate_actions(steps, with_values=False)
    chosen = evaluation.distributions[0][steps[0].action_index]
    assert chosen.item() == pytest.approx(steps[0].logprob, abs=1e-5)
    chosen.backward()
    grads = [p.grad for name, p in agent.policy.lm.named_parameters() if p.requires_grad and "lora" in name]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for name, p in agent.policy.lm.named_parameters() if "lora" not in name)


def test_ppo_with_relative_scores_learns_from_a_uniform_start(make_agent):
    agent = make_agent(algorithm="ppo", score_normalization="relative",
                       algorithm_config={"policy_head": 0, "learning_rate": 1e-3, "batch_episodes": 8,
                                         "minibatch_size": 4, "epochs": 4})
    assert right_probability(agent, 3) == pytest.approx(0.5, abs=1e-6)
    stats = agent.train(ChoiceEnv(), 48, seed=0, progress=False)
    assert any("policy/kl_ref" in s for s in stats)  # KL to the uniform reference, which is the base model's
    assert right_probability(agent, 3) > 0.7


def test_relative_scores_are_refused_where_the_base_model_is_out_of_reach(make_agent):
    from rllama.backends import OpenAIBackend
    from rllama.policy.outputs import candidate_score

    with pytest.raises(ValueError, match="score_normalization='relative'.*OpenAIBackend"):
        make_agent(backend=OpenAIBackend("http://127.0.0.1:9", model="m"), score_normalization="relative",
                   algorithm_config={"policy_head": 0})
    with pytest.raises(ValueError, match="relative"):
        candidate_score([-1.0, -2.0], "relative")
