"""``score_normalization="relative"``: a candidate's score minus the base model's, so the untrained policy is
uniform whatever the prompt makes the model prefer, the adapter alone moves it, and the reference is uniform."""

from __future__ import annotations

import math

import pytest
import torch

from rllama.policy import PolicyModel, default_lora_config
from rllama.replies import Choices
from tests.conftest import ChoiceEnv, FreeTextAgent, right_probability
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


class RelativeChoosingAgent(FreeTextAgent):
    """Generates, constrained to "left" / "right", under a relative policy."""

    reply_shape = Choices("left", "right")


def test_replies_to_declared_choices_are_relative_to_the_base_model(make_agent):
    agent = make_agent(RelativeChoosingAgent, algorithm="ppo", score_normalization="relative")

    def refuse(*args, **kwargs):
        raise AssertionError("a relative policy's choices are not sampled token by token")

    agent.backend.generate = refuse
    agent.reset()
    agent.act_batch([1, 2, 3, 4])
    untrained = [agent.recorder[i].steps[0] for i in range(4)]
    choices = untrained[0].choice_ids
    branch = next(t for t in range(9) if choices[0][t] != choices[1][t])
    for step in untrained:  # even at the token where the choices branch, certain elsewhere
        assert step.response_ids in step.choice_ids and step.text in ("left", "right")
        assert step.logprob == pytest.approx(math.log(0.5), abs=1e-6)
        assert step.token_logprobs[branch] == pytest.approx(math.log(0.5), abs=1e-6)
        assert sum(abs(t) for t in step.token_logprobs) == pytest.approx(math.log(2), abs=1e-5)
    perturb_adapter(agent.policy)
    agent.reset()
    agent.act_batch([1, 2, 3, 4])
    steps = [agent.recorder[i].steps[0] for i in range(4)]
    with torch.no_grad():
        evaluation = agent.policy.evaluate_actions(steps, with_values=False)
        reference = agent.policy.reference_distributions(steps)
        prompts = [s.prompt_ids for s in steps]
        owner = [b for b, s in enumerate(steps) for _ in s.choice_ids]
        rows = [c for s in steps for c in s.choice_ids]
        adapted = agent.policy.continuation_logprobs(prompts, rows, owner).token_logprobs
        with agent.policy.reference():
            base = agent.policy.continuation_logprobs(prompts, rows, owner).token_logprobs
    for b, (step, dist, ref) in enumerate(zip(steps, evaluation.distributions, reference)):
        # the learner re-evaluates the step as it was chosen: one decision over the whole choices
        k = step.choice_ids.index(step.response_ids)
        assert evaluation.action_indices[b] == k and dist.shape == (2,)
        assert dist[k].item() == pytest.approx(step.logprob, abs=1e-5)
        assert step.logprob == pytest.approx(sum(step.token_logprobs), abs=1e-5)
        # at the branch: the softmax of the adapted model's log-probs minus the base model's
        diff = adapted[2 * b:2 * b + 2, branch] - base[2 * b:2 * b + 2, branch]
        torch.testing.assert_close(dist, torch.log_softmax(diff, -1), atol=1e-5, rtol=0)
        assert step.token_logprobs[branch] == pytest.approx(torch.log_softmax(diff, -1)[k].item(), abs=1e-5)
        # the reference stays uniform
        torch.testing.assert_close(ref, torch.full((2,), math.log(0.5)), atol=1e-6, rtol=0)
    assert any(abs(s.token_logprobs[branch] - math.log(0.5)) > 0.01 for s in steps)


def test_ppo_learns_declared_choices_from_a_uniform_start(make_agent):
    agent = make_agent(RelativeChoosingAgent, algorithm="ppo", score_normalization="relative",
                       algorithm_config={"learning_rate": 1e-3, "batch_episodes": 8, "minibatch_size": 4,
                                         "epochs": 4})

    def right_share(agent) -> float:
        with torch.no_grad():
            prompt = agent.chat.prompt_ids([{"role": "system", "content": agent.get_system_prompt()},
                                            {"role": "user", "content": agent.format_observation(3)}])
            outputs, _ = agent.policy.choice_outputs([prompt], [agent._compile_shape(agent.reply_shape)[0]])
        return float(outputs.logprobs[0][1].exp())

    assert right_share(agent) == pytest.approx(0.5, abs=1e-6)
    stats = agent.train(ChoiceEnv(), 48, seed=0, progress=False)
    assert stats and all(s["rollout/parse_failures"] == 0 for s in stats)
    assert right_share(agent) > 0.7


def test_an_agent_whose_replies_are_relative_choices_generates_nothing_on_a_backend(make_agent, monkeypatch):
    import rllama.agent as agent_module

    asked, real = [], agent_module.make_backend

    def recording(backend, policy, generates, lazy):
        asked.append((generates, lazy))
        return real(backend, policy, generates, lazy)

    monkeypatch.setattr(agent_module, "make_backend", recording)
    make_agent(RelativeChoosingAgent, algorithm="ppo", score_normalization="relative")  # the learner chooses
    make_agent(RelativeChoosingAgent, algorithm="ppo")  # sampled token by token: llama.cpp where it serves

    class Shaped(RelativeChoosingAgent):
        def get_reply_shape(self, observation):  # may be free text for some observations
            return self.reply_shape

    make_agent(Shaped, algorithm="ppo", score_normalization="relative")
    assert asked == [(False, False), (True, False), (True, True)]  # llama.cpp, where chosen, loads at a first reply
