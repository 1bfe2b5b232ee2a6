"""Generation backends: the OpenAI-compatible HTTP client against the package's own small server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rllama import PolicyModel
from rllama.backends import OpenAIBackend
from rllama.errors import RLlamaError
from rllama.serving import CompletionServer
from tests.conftest import ChoiceAgent, ChoiceEnv, FreeTextAgent, make_tiny_lm


@pytest.fixture
def server(tokenizer, tmp_path):
    """A server of its own copy of the tiny base model (the learner's weights reach it only by adapter sync,
    from folders under ``tmp_path``)."""
    policy = PolicyModel(make_tiny_lm(seed=0), tokenizer, precision="fp32")
    with CompletionServer(policy, adapter_root=tmp_path) as srv:
        yield srv


def first_prompts(agent, observations):
    prompts, cands = [], []
    for obs in observations:
        messages = [{"role": "system", "content": agent.get_system_prompt()},
                    {"role": "user", "content": agent.format_observation(obs)}]
        prompts.append(agent.chat.prompt_ids(messages))
        cands.append([agent.chat.reply_ids(c) for c in ("left", "right", "up")])
    return prompts, cands


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_http_scores_equal_in_process_scores(server, make_agent, normalization):
    agent = make_agent(score_normalization=normalization)
    backend = OpenAIBackend(server.url, model="rllama-base", batch_size=4)  # several requests
    backend.bind(agent.policy)
    prompts, cands = first_prompts(agent, [1, 4, 7])
    remote = backend.candidate_outputs(prompts, cands)
    with torch.no_grad():
        local = agent.policy.candidate_outputs(prompts, cands)
    for r, ll in zip(remote.logprobs, local.logprobs):
        assert torch.allclose(r, ll.float(), atol=1e-4), (r, ll)
    assert torch.isnan(remote.values).all()


def test_http_greedy_generation_equals_in_process(server, make_agent):
    agent = make_agent(cls=FreeTextAgent)
    backend = OpenAIBackend(server.url, model="rllama-base")
    backend.bind(agent.policy)
    prompts, _ = first_prompts(agent, [2, 5])
    stop = agent.chat.end_of_turn_ids
    remote = backend.generate(prompts, max_new_tokens=6, greedy=True, stop_token_ids=stop, generator=None)
    local = agent.policy.generate(prompts, max_new_tokens=6, greedy=True, stop_token_ids=stop)
    for r, ll in zip(remote, local):
        assert r.token_ids == ll.token_ids
        np.testing.assert_allclose(r.token_logprobs, ll.token_logprobs, atol=1e-4)
        assert math.isnan(r.value)
    # sampling with a seed is reproducible
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = backend.generate(prompts, 6, False, stop, g())
    b = backend.generate(prompts, 6, False, stop, g())
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


@pytest.mark.parametrize("cls", [ChoiceAgent, FreeTextAgent])
def test_agent_trains_through_a_server_and_the_adapter_reaches_it(server, make_agent, tmp_path, cls):
    backend = OpenAIBackend(server.url, model="rllama-base", adapter_sync="vllm", sync_dir=tmp_path / "sync")
    agent = make_agent(cls=cls, backend=backend, algorithm_config={"batch_episodes": 4, "minibatch_size": 4,
                                                                    "learning_rate": 1e-2})
    if cls is FreeTextAgent:
        agent.fallback_action = lambda obs, text: 0
    history = agent.train(ChoiceEnv(steps=2), 8, progress=False)
    assert len(history) == 2 and all(h["rollout/recomputed_steps"] == 8 for h in history)
    assert all(math.isfinite(h["loss/total"]) for h in history)
    # the server now acts with the learner's adapter: its scores are the learner's
    assert backend.served_model == "default-v2" and server.adapters == {"default-v2"}
    prompts, cands = first_prompts(agent, [0, 3])
    remote = backend.candidate_outputs(prompts, cands)
    with torch.no_grad():
        local = agent.policy.candidate_outputs(prompts, cands)
    with torch.no_grad(), agent.policy.reference():
        base = agent.policy.candidate_outputs(prompts, cands)
    assert not torch.allclose(local.logprobs[0], base.logprobs[0], atol=1e-3)  # training moved the policy
    for r, ll in zip(remote.logprobs, local.logprobs):
        assert torch.allclose(r, ll.float(), atol=1e-4)


def test_recomputed_behaviour_equals_in_process_acting(server, make_agent):
    """Steps acted through the server, once recomputed by the learner, are the steps in-process acting records:
    the learner's log-probs (the proximal policy) and values equal in-process acting's, and the server's
    log-probs stay as the behaviour policy (here the same model: the importance weights are 1)."""
    agents = []
    for backend in (OpenAIBackend(server.url, model="rllama-base"), None):
        agents.append(make_agent(backend=backend, algorithm_config={"batch_episodes": 99},  # seeds everything
                                 score_normalization="mean"))  # the policy a server can serve
        agents[-1].train(ChoiceEnv(steps=3), 2, seed=0, progress=False)
    remote, local = agents
    r_steps = [s for e in remote.algorithm.buffer.episodes for s in e.steps]
    l_steps = [s for e in local.algorithm.buffer.episodes for s in e.steps]
    assert all(s.learner_recompute and math.isnan(s.value) for s in r_steps)
    served = [s.logprob for s in r_steps]
    proximal, staleness, stats = remote.algorithm.proximal_logprobs(r_steps)
    assert stats["rollout/recomputed_steps"] == len(r_steps) == len(l_steps) == 6 and staleness == []
    assert stats["rollout/engine_logprob_diff_max"] < 1e-4
    for a, b, lp in zip(r_steps, l_steps, served):
        assert a.prompt_ids == b.prompt_ids and a.action_index == b.action_index and not a.learner_recompute
        assert a.value == pytest.approx(b.value, abs=1e-5) and a.logprob == lp  # the behaviour policy kept
        assert float(proximal[id(a)][0]) == pytest.approx(b.logprob, abs=1e-5)


def test_backend_errors_are_clear(make_agent, server):
    with pytest.raises(RLlamaError, match="cannot reach the generation server at http://127.0.0.1:9/v1/completions"):
        agent = make_agent(backend=OpenAIBackend("http://127.0.0.1:9/v1", model="m", timeout=5))
        agent.act(1)
    with pytest.raises(ValueError, match="algorithm 'dqn' acts on Q heads"):
        make_agent(algorithm="dqn", backend=OpenAIBackend(server.url, model="rllama-base"))
    with pytest.raises(RLlamaError, match="needs temperature=1.0"):
        make_agent(temperature=0.5, backend=OpenAIBackend(server.url, model="rllama-base"))
    with pytest.raises(ValueError, match="needs sync_dir"):
        OpenAIBackend(server.url, model="m", adapter_sync="vllm")
    agent = make_agent(backend=OpenAIBackend(server.url, model="not-served"))
    with pytest.raises(RLlamaError, match="HTTP 404.*'not-served' is not served"):
        agent.act(1)
