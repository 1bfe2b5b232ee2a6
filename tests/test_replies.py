"""Declared reply shapes: generation constrained to choices, and the learner computing the same log-probs."""

from __future__ import annotations

import pytest
import torch

from rllama.algorithms.buffers import step_from_dict, step_to_dict
from rllama.errors import HookError
from rllama.replies import Choices, ChoiceTrie, constrained_logprobs, mask_logits
from tests.conftest import ChoiceEnv, FreeTextAgent


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
    for step, dist in zip(steps, ev.distributions):
        assert step.choice_ids is not None and step.response_ids in step.choice_ids
        assert torch.allclose(dist.float(), torch.tensor(step.token_logprobs), atol=1e-5)
        assert step.token_logprobs[-1] == pytest.approx(0.0, abs=1e-6)  # the end of turn is certain
    assert step_from_dict(step_to_dict(steps[0])).choice_ids == steps[0].choice_ids
    # greedy takes the likelier choice; an update trains on constrained steps
    agent.algorithm.config.batch_episodes = 4
    stats = agent.train(ChoiceEnv(steps=3), 4, seed=1, progress=False)
    assert len(stats) == 1 and stats[0]["policy/approx_kl"] < 0.5


def test_reply_shape_errors_are_clear(make_agent):
    class Wrong(FreeTextAgent):
        def get_reply_shape(self, observation):
            return ["left", "right"]

    with pytest.raises(HookError, match="get_reply_shape.*expected None or rllama.replies.Choices"):
        make_agent(Wrong).act(1)

    class Long(FreeTextAgent):
        reply_shape = Choices("left", "a much longer reply than allowed")

    with pytest.raises(ValueError, match="max_new_tokens=8"):
        make_agent(Long, max_new_tokens=8).act(1)
