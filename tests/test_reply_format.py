"""Learning the reply's format (issue 41): invalid replies counted, penalised and warned about; a reply
prefix written into the prompt."""

from __future__ import annotations

import logging

import pytest
import torch

from rllama.algorithms.buffers import step_from_dict, step_to_dict
from rllama.errors import HookError
from tests.conftest import ChoiceEnv, FreeTextAgent


class LenientAgent(FreeTextAgent):
    """The RLlama README's kind of hooks: ``extract_action`` reads any text (as "left" unless it says
    "right"), so only ``is_valid_reply`` can tell that a reply named no side."""

    def extract_action(self, response):
        return 1 if "right" in response else 0

    def is_valid_reply(self, response):
        return "left" in response or "right" in response


class PrefixAgent(FreeTextAgent):
    reply_prefix = "Side:"

    def extract_action(self, response):
        self.calls.append(("extract_action", response))
        return 1 if "right" in response else 0


def buffered(agent):
    return [s for e in agent.algorithm.buffer.episodes for s in e.steps]


def test_invalid_replies_are_marked_penalised_and_left_out_of_the_returns(make_agent):
    agent = make_agent(LenientAgent, max_new_tokens=4, format_penalty=-0.25,
                       algorithm_config={"batch_episodes": 99})
    returns = agent.train(ChoiceEnv(steps=1), 12, seed=0, progress=False)
    assert returns == []  # no update yet: the episodes are in the buffer
    steps = buffered(agent)
    assert len(steps) == 12
    for s in steps:
        assert s.invalid_reply == (not ("left" in s.text or "right" in s.text))
        assert s.shaping == (-0.25 if s.invalid_reply else 0.0)
        assert abs(s.reward) == 1.0  # the environment's reward, untouched
    assert any(s.invalid_reply for s in steps)  # a random tiny model's 4 tokens rarely name a side
    # the algorithm learns from reward + shaping (one-step episodes: the return is that reward)
    batch = agent.algorithm.buffer.to_batch(0.99, 0.95)
    assert torch.allclose(batch.returns, torch.tensor([s.reward + s.shaping for s in steps]))
    assert [e.total_reward for e in agent.algorithm.buffer.episodes] == [s.reward for s in steps]
    restored = step_from_dict(step_to_dict(steps[0]))
    assert (restored.invalid_reply, restored.shaping) == (steps[0].invalid_reply, steps[0].shaping)


def test_the_update_reports_the_share_of_invalid_replies(make_agent):
    agent = make_agent(LenientAgent, max_new_tokens=4, algorithm_config={"batch_episodes": 6, "minibatch_size": 3})
    seen = []
    update = agent.algorithm.update

    def spy():
        seen.extend(buffered(agent))
        return update()

    agent.algorithm.update = spy
    (stats,) = agent.train(ChoiceEnv(steps=2), 6, seed=0, progress=False)
    assert len(seen) == 12 and stats["rollout/parse_failures"] == 0  # extract_action never fails here
    assert stats["rollout/invalid_replies"] == pytest.approx(sum(s.invalid_reply for s in seen) / 12)
    assert all(s.shaping == 0 for s in seen)  # no format_penalty: nothing added
    assert "rollout/invalid_replies" not in make_agent(algorithm_config={"batch_episodes": 2, "policy_head": 0}).train(
        ChoiceEnv(), 2, seed=0, progress=False)[0]  # a scoring agent writes no replies


def test_most_replies_invalid_is_warned_once(make_agent, caplog):
    agent = make_agent(LenientAgent, max_new_tokens=4, algorithm_config={"batch_episodes": 99})
    with caplog.at_level(logging.WARNING, logger="rllama.acting"):
        agent.train(ChoiceEnv(steps=1), 31, seed=0, progress=False)
        assert not [r for r in caplog.records if "generated replies are not in the form" in r.getMessage()]
        agent.train(ChoiceEnv(steps=1), 40, seed=1, progress=False)
    warned = [r.getMessage() for r in caplog.records if "generated replies are not in the form" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "of the first 32 generated replies" in warned[0] and "LenientAgent" in warned[0]
    assert "reply_shape" in warned[0] and "format_penalty" in warned[0]


def test_a_reply_prefix_is_written_into_the_prompt_and_read_with_the_reply(make_agent):
    agent = make_agent(PrefixAgent, max_new_tokens=4, algorithm_config={"batch_episodes": 99})
    prefix = agent.chat.reply_prefix_ids("Side:")
    assert prefix and agent.reply_prefix_ids == prefix
    agent.train(ChoiceEnv(steps=2), 3, seed=0, progress=False)
    steps = buffered(agent)
    parsed = [c[1] for c in agent.calls if c[0] == "extract_action"]
    assert len(steps) == 6 and parsed == [s.text for s in steps]
    for s in steps:
        assert s.prompt_ids[-len(prefix):] == prefix and s.text.startswith("Side:")
        assert s.text == agent.chat.decode_reply(prefix + s.response_ids)
    # the second turn's prompt holds the first reply, prefix included, as the assistant's message
    second = agent.tokenizer.decode(steps[1].prompt_ids)
    assert steps[0].text in second
    # the learner reads the same split of prompt and reply: its log-probs are the ones recorded
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps, with_values=False, with_entropy=False)
    for s, dist in zip(steps, ev.distributions):
        assert torch.allclose(dist.float(), torch.tensor(s.token_logprobs), atol=1e-5)


def test_bad_format_settings_are_clear_errors(make_agent):
    for bad in (0.5, float("nan"), "-0.1", True):
        with pytest.raises(ValueError, match="format_penalty"):
            make_agent(LenientAgent, format_penalty=bad)

    class BadPrefix(FreeTextAgent):
        reply_prefix = 3

    with pytest.raises(HookError, match="reply_prefix"):
        make_agent(BadPrefix)

    class BadValidity(LenientAgent):
        def is_valid_reply(self, response):
            return "yes"

    agent = make_agent(BadValidity, max_new_tokens=2)
    with pytest.raises(HookError, match=r"is_valid_reply\(.*\) returned 'yes'; expected True or False"):
        agent.act(3)


class TextEnv(ChoiceEnv):
    """ChoiceEnv with text observations."""

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return f"number {obs}", info

    def step(self, action):
        obs, *rest = super().step(action)
        return (f"number {obs}", *rest)


class TextAgent(FreeTextAgent):
    keep_history = "auto"  # the default (the tests' ChoiceAgent sets True)

    def format_observation(self, observation):
        return str(observation) if isinstance(observation, str) else f"n={int(observation)}"


def test_auto_history_follows_the_observations_kind_and_says_so(make_agent, caplog):
    def second_prompt(agent, env):
        agent.algorithm.config.batch_episodes = 99
        agent.train(env, 1, seed=0, progress=False)
        first, second = buffered(agent)[:2]
        return first, agent.tokenizer.decode(second.prompt_ids)


    with caplog.at_level(logging.WARNING, logger="rllama.agent"):
        structured = make_agent(TextAgent, max_new_tokens=3)
        assert structured.keep_history == "auto"
        _, prompt = second_prompt(structured, ChoiceEnv(steps=2))
        assert prompt.count("n=") == 1  # numbers are the state: no earlier turns
        said = [r.getMessage() for r in caplog.records if "keep_history='auto'" in r.getMessage()]
        assert len(said) == 1 and "int observations are not text" in said[0] and "TextAgent" in said[0]
        text = make_agent(TextAgent, max_new_tokens=3)
        _, prompt = second_prompt(text, TextEnv(steps=2))
        assert prompt.count("number ") == 2  # text observations: the earlier turn is shown
    assert len([r for r in caplog.records if "keep_history='auto'" in r.getMessage()]) == 1

    class Kept(TextAgent):
        keep_history = True

    _, prompt = second_prompt(make_agent(Kept, max_new_tokens=3), ChoiceEnv(steps=2))
    assert prompt.count("n=") == 2

    class Bad(TextAgent):
        keep_history = "yes"

    with pytest.raises(HookError, match=r"keep_history = 'yes'; expected True, False or 'auto'"):
        make_agent(Bad)
