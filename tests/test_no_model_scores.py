"""``score_normalization="none"``: the policy is its head alone (no model scores, no reference), served
from the memo like any other, refused where nothing would choose."""

from __future__ import annotations

import pytest
import torch

from rllama.policy import PolicyModel, default_lora_config
from rllama.policy.model import POLICY_HEAD
from tests.conftest import ChoiceEnv, right_probability
from tests.test_prefix_cache import candidates, episode_prompts, make_deep_lm


def make_policy(tokenizer, normalization: str) -> PolicyModel:
    return PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32",
                       score_normalization=normalization)


def test_without_model_scores_the_policy_is_the_head_alone(tokenizer):
    with_scores, without = make_policy(tokenizer, "mean"), make_policy(tokenizer, "none")
    prompts, cands = episode_prompts()[:3], [candidates(i) for i in range(3)]
    with torch.no_grad():
        uniform = without.candidate_outputs(prompts, cands).logprobs
    for lp, c in zip(uniform, cands):  # no head yet: every candidate alike
        torch.testing.assert_close(lp, torch.full((len(c),), -torch.log(torch.tensor(float(len(c))))))
    for pol in (with_scores, without):
        head = pol.add_head(POLICY_HEAD, whiten=8)
        head.fit_whitening(pol.action_features(prompts, cands))
        torch.manual_seed(0)
        with torch.no_grad():
            head.linear.weight.normal_(0, 1.0)
    with torch.no_grad():
        head_logits = without.heads[POLICY_HEAD](without.action_features(prompts, cands)).squeeze(-1)
        out = without.candidate_outputs(prompts, cands).logprobs
        mixed = with_scores.candidate_outputs(prompts, cands).logprobs
    sizes = [len(c) for c in cands]
    for lp, logits, other in zip(out, torch.split(head_logits, sizes), mixed):
        torch.testing.assert_close(lp, torch.log_softmax(logits, -1), atol=1e-5, rtol=0)
        assert not torch.allclose(lp, other, atol=1e-3)  # the model's scores did count there
    with torch.no_grad(), without.reference():  # the reference has no head and no scores: uniform
        ref = without.candidate_outputs(prompts, cands).logprobs
    assert all(torch.allclose(r, torch.full_like(r, r[0].item())) for r in ref)


def test_features_without_log_probs_are_remembered_and_a_later_scoring_pass_still_computes_them(tokenizer):
    """The memo serves a "none" policy's repeated states without a forward; an entry stored without
    log-probs is not mistaken for one that has them."""
    pol = make_policy(tokenizer, "none")
    prompts, cands = episode_prompts()[:3], [candidates(i) for i in range(3)]
    with torch.no_grad():
        pol.candidate_outputs(prompts, cands)
        seen = dict(pol.engine.stats()["top"])
        again = pol.candidate_outputs(prompts[::-1], cands[::-1])
        assert pol.engine.stats()["top"] == seen  # no forward at all
        assert pol.engine.stats()["memo_continuations"] == sum(len(c) for c in cands)
        pol.score_normalization = "mean"  # now the log-probs are needed: computed, equal to a fresh policy's
        scored = pol.candidate_outputs(prompts, cands).logprobs
        fresh = make_policy(tokenizer, "mean").candidate_outputs(prompts, cands).logprobs
    assert again.logprobs[0].shape == (len(cands[2]),)
    for a, b in zip(scored, fresh):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert not torch.allclose(a, torch.full_like(a, a[0].item()))


def test_ppo_without_model_scores_learns_the_rewarded_action_with_no_reference_pass(make_agent):
    agent = make_agent(algorithm="ppo", score_normalization="none",
                       algorithm_config={"policy_head": 8, "learning_starts": 8, "batch_episodes": 8,
                                         "minibatch_size": 4, "epochs": 4, "head_learning_rate": 0.1,
                                         "kl_coef": 0.5})
    before = right_probability(agent, 3)
    assert before == pytest.approx(0.5, abs=1e-6)  # uniform before training
    calls = []
    original = agent.algorithm.reference_distributions
    agent.algorithm.reference_distributions = lambda steps: calls.append(len(steps)) or original(steps)
    stats = agent.train(ChoiceEnv(), 48, seed=0, progress=False)
    assert stats and not calls and all("policy/kl_ref" not in s for s in stats)  # nothing to pull toward
    assert right_probability(agent, 3) > 0.7


def test_a_choice_nothing_trains_is_refused_and_dqn_is_not(make_agent):
    with pytest.raises(ValueError, match="score_normalization='none'.*PPO"):
        make_agent(algorithm="ppo", score_normalization="none", algorithm_config={"policy_head": 0})
    with pytest.raises(ValueError, match="score_normalization"):
        make_agent(score_normalization="max")
    agent = make_agent(algorithm="dqn", score_normalization="none")  # the Q head chooses
    assert agent.policy.score_normalization == "none"


def test_auto_leaves_the_model_scores_out_where_a_head_on_the_frozen_adapter_chooses(make_agent):
    """The default: an on-policy algorithm's policy head trained on the frozen adapter's features decides
    alone; where the adapter is (part of) the policy, for DQN and SAC, or when the agent generates, the
    model's scores stay."""
    from tests.conftest import ChoiceAgent

    def resolved(**kwargs):
        return make_agent(score_normalization="auto", **kwargs).policy.score_normalization

    assert make_agent().policy.score_normalization == resolved() == "none"  # PPO's defaults: a head, adapter frozen
    assert resolved(algorithm="grpo") == resolved(algorithm="a2c") == resolved(algorithm="reinforce") == "none"
    assert resolved(algorithm="sac") == "mean"  # its actor learned as well beside the scores (measured)
    assert resolved(algorithm_config={"policy_head": 0}) == "mean"  # the adapter alone is the policy
    assert resolved(algorithm_config={"train_adapter": True}) == "mean"  # the adapter learns beside the head
    assert resolved(algorithm="dqn") == "mean"  # Q heads choose; the scores break their ties
    assert resolved(cls=type("Generating", (ChoiceAgent,), {"candidates": ()})) == "mean"
    for name in ("mean", "sum", "none"):  # an explicit choice is kept
        assert make_agent(score_normalization=name).policy.score_normalization == name
    with pytest.raises(ValueError, match="score_normalization='max'.*'auto'"):
        make_agent(score_normalization="max")


def test_described_moves_leave_the_model_scores_out_unless_asked(make_agent):
    from rllama.agents import FrozenLakeAgent
    from rllama.agents.sokoban import SokobanAgent

    for cls in (SokobanAgent, FrozenLakeAgent):
        assert make_agent(cls=cls).policy.score_normalization == "none"
        assert make_agent(cls=cls, describe=False).policy.score_normalization == "none"  # "auto": a head chooses
        assert make_agent(cls=cls, describe=False, algorithm_config={"policy_head": 0}).policy.score_normalization \
            == "mean"
        assert make_agent(cls=cls, score_normalization="sum").policy.score_normalization == "sum"


def test_an_agent_acting_through_a_server_keeps_the_model_scores(make_agent):
    """A server backend serves no heads, so a described-move agent on one scores with the model; asking
    for "none" there is refused rather than leaving a uniform policy that never learns."""
    from rllama.agents.sokoban import SokobanAgent
    from rllama.backends import OpenAIBackend

    agent = make_agent(cls=SokobanAgent, backend=OpenAIBackend("http://127.0.0.1:9", model="m"))
    assert agent.policy.score_normalization == "mean"
    with pytest.raises(ValueError, match="score_normalization='none'"):
        make_agent(cls=SokobanAgent, backend=OpenAIBackend("http://127.0.0.1:9", model="m"),
                   score_normalization="none")
