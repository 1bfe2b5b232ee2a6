"""Declared reply shapes: generation constrained to choices, and the learner computing the same log-probs."""

from __future__ import annotations

import pytest
import torch

from rllama.algorithms.buffers import step_from_dict, step_to_dict
from rllama.errors import HookError, MissingExtraError
from rllama.replies import Choices, ChoiceTrie, Grammar, Regex, constrained_logprobs, mask_logits
from tests.conftest import ChoiceAgent, ChoiceEnv, FreeTextAgent
from tests.test_relative_scores import perturb_adapter


class ChoosingAgent(FreeTextAgent):
    """Generates, constrained to "left" / "right"."""

    reply_shape = Choices("left", "right")


def recorded_steps(agent):
    return [s for e in agent.algorithm.buffer.episodes for s in e.steps]


def test_constrained_logprobs_renormalise_over_the_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 10)  # three positions of one shared context
    choices = [[1, 2, 9], [1, 3, 9], [4, 9]]
    # the unconstrained log-prob of each choice's tokens (positions shared along common prefixes)
    full = torch.log_softmax(logits, -1)
    per_choice = [full[torch.arange(len(c)), torch.tensor(c)] for c in choices]
    lp, ent = constrained_logprobs(per_choice, choices, [1, 3, 9])
    first = torch.log_softmax(logits[0, [1, 4]], -1)[0]  # 1 among {1, 4}
    second = torch.log_softmax(logits[1, [2, 3]], -1)[1]  # 3 among {2, 3}
    assert torch.allclose(lp, torch.stack([first, second, torch.tensor(0.0)]), atol=1e-6)
    assert ent[2] == 0 and ent[0] > 0
    masked = mask_logits(logits[:1], [[1, 4]])
    assert torch.isinf(masked[0, 0]) and masked[0, 1] == logits[0, 1]
    with pytest.raises(ValueError, match="none of the choices"):
        constrained_logprobs(per_choice, choices, [4, 2])


def test_choices_are_checked():
    with pytest.raises(HookError, match="duplicate"):
        Choices("a", "a")
    with pytest.raises(HookError, match="non-empty"):
        Choices("a", "")
    assert Choices(["a", "b"]) == Choices("a", "b")
    with pytest.raises(HookError, match="prefix"):
        ChoiceTrie([[1, 2], [1, 2, 3]])
    assert ChoiceTrie([[1, 2], [1, 3], [4]]).allowed([1]) == [2, 3]


def test_constrained_replies_parse_and_the_learner_agrees(make_agent):
    agent = make_agent(ChoosingAgent, algorithm_config={"batch_episodes": 99})
    agent.train(ChoiceEnv(steps=3), 4, seed=0, progress=False)
    steps = recorded_steps(agent)
    assert len(steps) == 12 and agent.actor.parse_failures == 0
    assert {s.text for s in steps} <= {"left", "right"} and len({s.text for s in steps}) == 2
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps, with_values=False, with_entropy=True)
    for step, dist, index, ent in zip(steps, ev.distributions, ev.action_indices, ev.entropy):
        assert step.choice_ids is not None and step.response_ids in step.choice_ids
        # one decision: a distribution over the whole choices, the taken one's the sum of its sampled tokens'
        assert dist.shape == (2,) and dist.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
        assert index == step.choice_ids.index(step.response_ids)
        assert dist[index].item() == pytest.approx(sum(step.token_logprobs), abs=1e-5)
        assert dist[index].item() == pytest.approx(step.logprob, abs=1e-5)
        assert ent.item() == pytest.approx(-(dist.exp() * dist).sum().item(), abs=1e-6)  # exact, over the choices
        assert step.token_logprobs[-1] == pytest.approx(0.0, abs=1e-6)  # the end of turn is certain
    assert step_from_dict(step_to_dict(steps[0])).choice_ids == steps[0].choice_ids
    # greedy takes the likelier choice; an update trains on constrained steps
    agent.algorithm.config.batch_episodes = 4
    stats = agent.train(ChoiceEnv(steps=3), 4, seed=1, progress=False)
    assert len(stats) == 1 and stats[0]["policy/approx_kl"] < 0.5


def test_a_reply_to_declared_choices_is_one_decision_with_an_exact_kl(make_agent):
    from rllama.algorithms.losses import kl_to_reference

    agent = make_agent(ChoosingAgent, algorithm_config={"batch_episodes": 99})
    agent.train(ChoiceEnv(steps=2), 3, seed=0, progress=False)
    steps = recorded_steps(agent)
    perturb_adapter(agent.policy)  # the adapted policy moves away from the reference (the base model)
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps, with_values=False, with_entropy=True)
        reference = agent.policy.reference_distributions(steps)
    logprobs, owner = ev.unit_logprobs()
    assert owner.tolist() == list(range(len(steps)))  # one unit a step, however many tokens the choice has
    for direction in ("reverse", "forward"):
        kl = kl_to_reference(ev, reference, steps, direction)
        for value, dist, ref in zip(kl, ev.distributions, reference):
            p, q = (dist, ref) if direction == "reverse" else (ref, dist)
            assert value.item() == pytest.approx((p.exp() * (p - q)).sum().item(), abs=1e-6)
    assert kl.max() > 1e-4  # the perturbation shows
    assert step_from_dict(step_to_dict(steps[0])).unit_index == steps[0].unit_index is not None
    broken = step_from_dict({**step_to_dict(steps[0]), "response_ids": [1, 2, 3]})
    with pytest.raises(ValueError, match="none of the step's declared choices"):
        _ = broken.unit_index


@pytest.mark.parametrize("normalization", ["mean", "relative"])
def test_scored_chosen_and_free_steps_evaluate_in_one_batch_as_alone(make_agent, normalization):
    recorded = []
    for cls in (ChoiceAgent, ChoosingAgent, FreeTextAgent):  # scored, declared choices, free text
        agent = make_agent(cls, algorithm_config={"batch_episodes": 99}, max_new_tokens=8)
        agent.train(ChoiceEnv(steps=2), 2, seed=0, progress=False)
        recorded.append(recorded_steps(agent))
    mixed = [s for trio in zip(*recorded) for s in trio]
    assert [s.is_scored for s in mixed[:3]] == [True, False, False] and mixed[1].choice_ids and not mixed[2].choice_ids
    policy = make_agent(FreeTextAgent, score_normalization=normalization).policy
    perturb_adapter(policy)
    with torch.no_grad():
        together = policy.evaluate_actions(mixed, with_values=True, with_entropy=True)
        alone = [policy.evaluate_actions([s], with_values=True, with_entropy=True) for s in mixed]
    _, owner = together.unit_logprobs()
    units = torch.bincount(owner, minlength=len(mixed)).tolist()
    for i, (step, one) in enumerate(zip(mixed, alone)):
        assert units[i] == (len(step.response_ids) if step.unit_index is None else 1)
        assert together.action_indices[i] == one.action_indices[0] == step.unit_index
        torch.testing.assert_close(together.distributions[i], one.distributions[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.entropy[i], one.entropy[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.values[i], one.values[0], atol=1e-5, rtol=0)


def test_reply_shape_errors_are_clear(make_agent):
    class Wrong(FreeTextAgent):
        def get_reply_shape(self, observation):
            return ["left", "right"]

    with pytest.raises(HookError, match="get_reply_shape.*expected None or one of rllama.replies.Choices"):
        make_agent(Wrong).act(1)

    class Long(FreeTextAgent):
        reply_shape = Choices("left", "a much longer reply than allowed")

    with pytest.raises(ValueError, match="max_new_tokens=8"):
        make_agent(Long, max_new_tokens=8).act(1)


class RegexAgent(FreeTextAgent):
    """Generates "go left" / "go right", with "!" or not, as a regular expression allows."""

    reply_shape = Regex(r"go (left|right)!?")


class GrammarAgent(FreeTextAgent):
    """The same replies, from a llama.cpp GBNF grammar."""

    reply_shape = Grammar('root ::= "go " side "!"?\nside ::= "left" | "right"')


@pytest.mark.parametrize("cls", [RegexAgent, GrammarAgent])
def test_grammar_replies_parse_and_the_learner_computes_the_same_masked_logprobs(make_agent, cls):
    pytest.importorskip("llguidance")
    import re

    agent = make_agent(cls, algorithm_config={"batch_episodes": 99}, max_new_tokens=12)
    agent.train(ChoiceEnv(steps=3), 6, seed=0, progress=False)
    steps = recorded_steps(agent)
    assert len(steps) == 18 and agent.actor.parse_failures == 0
    texts = {s.text for s in steps}
    assert all(re.fullmatch(r"go (left|right)!?", t) for t in texts) and len(texts) > 1, texts
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps, with_values=False, with_entropy=True)
        free = agent.policy.evaluate_actions([step_from_dict({**step_to_dict(s), "reply_grammar": None})
                                              for s in steps], with_values=False, with_entropy=False)
    for step, dist, unmasked, ent in zip(steps, ev.distributions, free.distributions, ev.entropy):
        assert step.reply_grammar is not None and step.choice_ids is None
        assert torch.allclose(dist.float(), torch.tensor(step.token_logprobs), atol=1e-5)
        assert (dist >= unmasked - 1e-6).all() and (dist > unmasked + 1e-3).any()  # renormalised over fewer tokens
        assert torch.isfinite(ent) and ent >= 0
    # forced tokens ("g", "o", " ", ...) are certain under the mask
    assert steps[0].token_logprobs[0] == pytest.approx(0.0, abs=1e-6)
    assert step_from_dict(step_to_dict(steps[0])).reply_grammar == steps[0].reply_grammar
    # steps restored from a checkpoint, in an agent that declares no shape, are evaluated the same
    restored = [step_from_dict(step_to_dict(s)) for s in steps]
    with torch.no_grad():
        again = make_agent(FreeTextAgent).policy.evaluate_actions(restored, with_values=False, with_entropy=False)
    for a, b in zip(ev.distributions, again.distributions):
        assert torch.allclose(a, b, atol=1e-6)
    agent.algorithm.config.batch_episodes = 6
    stats = agent.train(ChoiceEnv(steps=3), 6, seed=1, progress=False)
    assert len(stats) == 1 and stats[0]["policy/approx_kl"] < 0.5 and stats[0]["rollout/parse_failures"] == 0


def test_bad_grammars_are_errors_when_the_agent_is_built(make_agent):
    pytest.importorskip("llguidance")

    class Unclosed(FreeTextAgent):
        reply_shape = Regex("go (left")

    class BadGbnf(FreeTextAgent):
        reply_shape = Grammar("root ::= (")

    class TooLong(FreeTextAgent):
        reply_shape = Regex("[a-z]{40}")

    with pytest.raises(HookError, match=r"(?s)Regex\('go \(left'\) does not compile.*unclosed group"):
        make_agent(Unclosed)
    with pytest.raises(HookError, match=r"Grammar\('root ::= \('\) does not compile"):
        make_agent(BadGbnf)
    with pytest.raises(HookError, match=r"no reply of at most max_new_tokens=32 tokens completes Regex"):
        make_agent(TooLong, max_new_tokens=32)
    assert make_agent(TooLong, max_new_tokens=41).reply_grammars is not None  # 40 bytes and the end of turn

    class PerObservation(FreeTextAgent):  # a shape that depends on the observation: checked when met
        def get_reply_shape(self, observation):
            return Regex("(left|right") if observation else Choices("left", "right")

    agent = make_agent(PerObservation)
    agent.act(0)
    with pytest.raises(HookError, match="does not compile"):
        agent.act(1)
    with pytest.raises(HookError, match="non-empty string"):
        Regex("")


def test_grammar_shapes_without_llguidance_say_how_to_install_it(make_agent, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if not installed: importing it fails
    with pytest.raises(MissingExtraError, match=r"pip install 'rllama\[grammar\]'"):
        make_agent(RegexAgent)
