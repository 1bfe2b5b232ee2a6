"""The llama.cpp backend against the learner: the same log-probs, the same adapter, no stale cache.

Tiny Llama models are written as float32 GGUF files in code (``tests/gguf_models.py``) and loaded both
in torch (the learner) and in llama.cpp (the engine). llama.cpp keeps its KV cache in f16, so the two
agree to about 1e-3 in log-probability, not bit for bit: ``TOLERANCE`` states it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from rllama.algorithms.buffers import Step
from rllama.backends import InProcessBackend, LlamaCppBackend
from rllama.backends import llamacpp as llamacpp_module
from rllama.errors import RLlamaError
from rllama.policy import PolicyModel, default_lora_config
from tests.conftest import ChoiceEnv, FreeTextAgent, make_tiny_lm
from tests.gguf_models import write_llama_gguf
from tests.test_prefix_cache import make_deep_lm

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")

TOLERANCE = 2e-3  # |log p(engine) - log p(learner)| per token, float32 weights, f16 KV cache


@pytest.fixture(scope="module")
def deep_gguf(tmp_path_factory):
    return write_llama_gguf(make_deep_lm(0), tmp_path_factory.mktemp("gguf") / "deep.gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_llama_gguf(make_tiny_lm("llama", seed=0), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def make_policy(tokenizer, adapted: bool = False):
    policy = PolicyModel(make_deep_lm(0), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32")
    if adapted:
        set_adapter_weights(policy, seed=1)
    return policy


def set_adapter_weights(policy, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0, 0.1)


def learner_logprobs(policy, prompts, replies) -> list[torch.Tensor]:
    steps = [Step(prompt_ids=p, response_ids=r.token_ids, token_logprobs=r.token_logprobs)
             for p, r in zip(prompts, replies)]
    with torch.no_grad():
        return [d.float() for d in policy.evaluate_actions(steps, with_values=False, with_entropy=False).distributions]


def assert_agree(policy, prompts, replies):
    for lp, reply in zip(learner_logprobs(policy, prompts, replies), replies):
        assert len(reply.token_ids) == len(reply.token_logprobs) == len(lp)
        assert (lp - torch.tensor(reply.token_logprobs)).abs().max().item() < TOLERANCE


PROMPTS = [list(range(3, 40)), list(range(3, 30)) + [50, 60], list(range(100, 110))]


def test_the_installed_build_decodes_batches_and_is_portable(deep_gguf):
    """The build make install makes: a batched multi-token decode runs (the native build segfaults there on
    this project's virtual machines) and it has none of the CPU features the portable flags turn off."""
    script = textwrap.dedent(f"""
        import torch
        from rllama.backends.llamacpp import EngineStats, _Engine, llama_cpp_module
        info = llama_cpp_module().llama_print_system_info().decode()
        engine = _Engine(__import__("pathlib").Path({str(deep_gguf)!r}), 4096, 8, 512, 1, EngineStats())
        generator = torch.Generator().manual_seed(0)
        replies = engine.generate([list(range(3, 60))] * 4, 8, False, set(), generator, 1.0)
        print("OK", sum(len(r.token_ids) for r in replies), info)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (f"llama.cpp crashed (exit {done.returncode}) on a batched decode: rebuild it with "
                                  f"make install's portable flags\n{done.stderr[-2000:]}")
    assert "OK 32" in done.stdout
    info = done.stdout
    assert "AVX2 = 1" in info, info
    for feature in ("AMX_INT8 = 1", "AVX512 = 1", "AVX512_BF16 = 1"):
        assert feature not in info, f"llama.cpp was built with {feature}: not make install's portable build ({info})"


def test_engine_logprobs_equal_the_learners(tokenizer, deep_gguf):
    for adapted in (False, True):
        policy = make_policy(tokenizer, adapted)
        backend = LlamaCppBackend(gguf=deep_gguf, n_threads=1)
        backend.bind(policy)
        for temperature in (1.0, 0.7):
            policy.temperature = temperature
            replies = backend.generate(PROMPTS, 12, False, [], torch.Generator().manual_seed(0))
            assert [len(r.token_ids) for r in replies] == [12, 12, 12]
            assert all(math.isnan(r.value) for r in replies)  # the value head lives in the learner
            assert_agree(policy, PROMPTS, replies)
        assert backend.stats.swaps == int(adapted)


def test_multi_turn_prompts_reuse_the_cached_prefix(tokenizer, deep_gguf):
    """Each turn's prompt continues the last: its prefix comes from the KV cache, the log-probs stay exact."""
    policy = make_policy(tokenizer, adapted=True)
    backend = LlamaCppBackend(gguf=deep_gguf, n_threads=1)
    backend.bind(policy)
    generator = torch.Generator().manual_seed(0)
    prompts = [list(range(3, 40)) for _ in range(3)]  # three episodes starting alike
    for turn in range(3):
        evaluated = backend.stats.prompt_tokens_evaluated
        replies = backend.generate(prompts, 6, False, [1], generator)
        assert_agree(policy, prompts, replies)
        new = backend.stats.prompt_tokens_evaluated - evaluated
        if turn == 0:  # the shared start once, then one token each
            assert new == len(prompts[0]) - 1 + 3
        else:  # only the user's new message and the reply's last token
            assert new <= 3 * (5 + 1)
        prompts = [p + r.token_ids + [60 + turn, 61, 62, 63, 64 + i] for i, (p, r) in enumerate(zip(prompts, replies))]


def test_the_kv_cache_grows_to_fit_a_batch_and_keeps_the_adapter(tokenizer, deep_gguf):
    """A batch whose prompts and replies do not fit grows the cache (the adapted model still acting), rather
    than evicting; a prompt beyond max_ctx is an error naming it."""
    policy = make_policy(tokenizer, adapted=True)
    backend = LlamaCppBackend(gguf=deep_gguf, n_threads=1, n_ctx=64, max_ctx=256)
    backend.bind(policy)
    replies = backend.generate(PROMPTS, 8, False, [], torch.Generator().manual_seed(0))
    assert backend.stats.swaps == 1 and backend.engine.adapter is not None
    assert backend.stats.context_growths == 1 and backend.engine.n_ctx == 128 and backend.stats.evictions == 0
    assert_agree(policy, PROMPTS, replies)
    assert backend.update_stats()["engine/kv_cells"] == 128
    with pytest.raises(RLlamaError, match="max_ctx=256"):
        backend.generate([list(range(3, 300))], 8, False, [], None)
    with pytest.raises(ValueError, match="max_ctx=32"):
        LlamaCppBackend(gguf=deep_gguf, n_ctx=64, max_ctx=32)


def test_a_swap_changes_the_engine_as_the_learners_change(tokenizer, deep_gguf):
    """After the adapter changes, the engine's log-probs are the new learner's, also for a prompt whose
    KV the engine held from before the swap (no stale cache)."""
    policy = make_policy(tokenizer, adapted=True)
    backend = LlamaCppBackend(gguf=deep_gguf, n_threads=1)
    backend.bind(policy)
    generator = torch.Generator().manual_seed(0)
    before = backend.generate(PROMPTS, 8, False, [], generator)
    old = learner_logprobs(policy, PROMPTS, before)
    set_adapter_weights(policy, seed=2)
    backend.after_update(policy)
    assert backend.stats.swaps == 2
    new = learner_logprobs(policy, PROMPTS, before)
    assert max((a - b).abs().max().item() for a, b in zip(old, new)) > 0.05  # the change is visible
    # greedy from the same prompts: the engine follows the new adapter
    after = backend.generate(PROMPTS, 8, True, [], generator)
    assert_agree(policy, PROMPTS, after)
    for reply, lp in zip(after, learner_logprobs(policy, PROMPTS, after)):
        assert torch.allclose(torch.tensor(reply.token_logprobs), lp, atol=TOLERANCE)
    # the adapter switched off (all-zero B, as a fresh adapter): the base model again
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.zero_()
    replies = backend.generate(PROMPTS, 8, False, [], generator)
    assert backend.engine.adapter is None
    assert_agree(policy, PROMPTS, replies)


def test_a_refused_adapter_names_the_file_and_keeps_the_previous_one(tokenizer, deep_gguf, tmp_path):
    policy = make_policy(tokenizer, adapted=True)
    backend = LlamaCppBackend(gguf=deep_gguf, n_threads=1)
    backend.bind(policy)
    generator = torch.Generator().manual_seed(0)
    backend.generate(PROMPTS, 4, False, [], generator)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(RLlamaError, match="refused the LoRA adapter .*garbage.gguf"):
        backend.load_adapter_file(garbage)
    # an adapter of another model (other shapes) is refused the same way
    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    other = PolicyModel(narrow, tokenizer, precision="fp32")
    set_adapter_weights(other, seed=3)
    from rllama.backends.gguf import write_lora_gguf

    mismatched = write_lora_gguf(other.lm, other.active_adapter, tmp_path / "other.gguf")
    with pytest.raises(RLlamaError, match="other.gguf"):
        backend.load_adapter_file(mismatched)
    replies = backend.generate(PROMPTS, 6, False, [], generator)  # still the learner's adapter
    assert_agree(policy, PROMPTS, replies)


def test_bad_models_are_clear_errors_when_the_agent_is_built(tokenizer, tmp_path, deep_gguf):
    with pytest.raises(RLlamaError, match="no such file"):
        FreeTextAgent(make_tiny_lm(), tokenizer, backend=LlamaCppBackend(gguf=tmp_path / "missing.gguf"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf at all")
    with pytest.raises(RLlamaError, match="cannot load .*broken.gguf"):
        FreeTextAgent(make_tiny_lm(), tokenizer, backend=LlamaCppBackend(gguf=broken))
    with pytest.raises(RLlamaError, match=r"LlamaCppBackend\(gguf="):  # a model rllama knows no GGUF of
        FreeTextAgent(make_tiny_lm(), tokenizer, backend="llamacpp")
    big_vocab = make_tiny_lm("llama", vocab_size=512)
    with pytest.raises(RLlamaError, match="vocabulary of 384 tokens, the learner's model 512"):
        FreeTextAgent(big_vocab, tokenizer, backend=LlamaCppBackend(gguf=deep_gguf))
    with pytest.raises(ValueError, match="backend='vllm'"):
        FreeTextAgent(make_tiny_lm(), tokenizer, backend="vllm")
    with pytest.raises(ValueError, match="n_ctx=8"):
        LlamaCppBackend(n_ctx=8)


def test_auto_generates_on_llamacpp_where_a_gguf_is_known(tokenizer, tiny_gguf, monkeypatch):
    monkeypatch.setattr(llamacpp_module, "gguf_of", lambda policy: tiny_gguf)
    assert isinstance(FreeTextAgent(make_tiny_lm(), tokenizer, precision="fp32").backend, LlamaCppBackend)
    assert type(FreeTextAgent(make_tiny_lm(), tokenizer, backend="torch").backend) is InProcessBackend
    from tests.conftest import ChoiceAgent

    assert type(ChoiceAgent(make_tiny_lm(), tokenizer).backend) is InProcessBackend  # scoring stays in process
    monkeypatch.setattr(llamacpp_module, "gguf_of", lambda policy: None)
    assert type(FreeTextAgent(make_tiny_lm(), tokenizer).backend) is InProcessBackend


def test_a_lazy_engine_loads_at_its_first_reply_and_then_acts_as_an_eager_one(tokenizer, tiny_gguf, tmp_path):
    with pytest.raises(RLlamaError, match="no such file"):  # the file is still checked when the agent is built
        FreeTextAgent(make_tiny_lm(), tokenizer, backend=LlamaCppBackend(gguf=tmp_path / "missing.gguf", lazy=True))
    agents = [FreeTextAgent(make_tiny_lm(), tokenizer, precision="fp32", seed=0, max_new_tokens=6,
                            algorithm_config={"batch_episodes": 4, "minibatch_size": 4, "epochs": 2},
                            backend=LlamaCppBackend(gguf=tiny_gguf, n_threads=1, lazy=lazy)) for lazy in (False, True)]
    eager, lazy = agents
    assert eager.backend.engine is not None and lazy.backend.engine is None
    set_adapter_weights(eager.policy, seed=3)  # an adapter the update hook would swap in
    set_adapter_weights(lazy.policy, seed=3)
    for agent in agents:
        agent.backend.after_update(agent.policy)
    assert lazy.backend.engine is None and lazy.backend.stats.swaps == 0  # nothing loaded to swap into
    prompts = [[1, 5, 7, 9, 11], [1, 3, 8]]
    replies = [[r.token_ids for r in agent.backend.generate(prompts, 6, True, [], None)] for agent in agents]
    assert lazy.backend.engine is not None and lazy.backend.stats.swaps == 1  # loaded, then the adapter swapped in
    assert replies[0] == replies[1]
    eager.backend.engine.set_adapter(None)  # the base model replies otherwise: the swap is what made them equal
    assert [r.token_ids for r in eager.backend.engine.generate(prompts, 6, True, set(), None, 1.0, None)] != replies[0]
    lazy.backend.close()
    assert lazy.backend.engine is None


def test_training_on_the_engine_corrects_for_it_and_swaps_after_each_update(tokenizer, tiny_gguf):
    agent = FreeTextAgent(make_tiny_lm(), tokenizer, precision="fp32", seed=0, max_new_tokens=6,
                          algorithm_config={"batch_episodes": 4, "minibatch_size": 4, "epochs": 2},
                          backend=LlamaCppBackend(gguf=tiny_gguf, n_threads=1))
    stats = agent.train(ChoiceEnv(steps=2), 8, seed=0, progress=False)
    assert len(stats) == 2 and agent.algorithm.num_updates == 2
    for s in stats:
        assert s["rollout/recomputed_steps"] == s["rollout/steps"] == 8  # every step acted on the engine
        assert 0 < s["rollout/engine_logprob_diff_mean"] <= s["rollout/engine_logprob_diff_max"] < TOLERANCE
        assert s["policy/importance_weight"] == pytest.approx(1.0, abs=1e-2)  # the engine is the learner here
        assert s["engine/ms_per_token"] > 0 and s["engine/swap_ms"] > 0
    # the fresh adapter adds nothing (no swap); each update's adapter is swapped in after it
    assert agent.backend.stats.swaps == 2
    assert_agree(agent.policy, PROMPTS, agent.backend.generate(PROMPTS, 5, False, [], torch.Generator()))


def test_the_engines_sampler_draws_from_the_distribution():
    from rllama.backends.llamacpp import _sample

    probs = torch.tensor([[0.1, 0.0, 0.2, 0.7], [0.0, 0.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([_sample(probs.log(), generator) for _ in range(20000)])  # [N, 2]
    freq = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    assert torch.allclose(freq, probs[0], atol=0.01) and freq[1] == 0
    assert (draws[:, 1] == 2).all()


def test_constrained_replies_on_the_engine_equal_the_learners(tokenizer, tiny_gguf):
    from tests.test_replies import ChoosingAgent, recorded_steps

    agent = ChoosingAgent(make_tiny_lm(), tokenizer, precision="fp32", seed=0,
                          algorithm_config={"batch_episodes": 99}, backend=LlamaCppBackend(gguf=tiny_gguf, n_threads=1))
    agent.train(ChoiceEnv(steps=3), 4, seed=0, progress=False)
    steps = recorded_steps(agent)
    assert {s.text for s in steps} <= {"left", "right"} and agent.actor.parse_failures == 0
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps, with_values=False, with_entropy=False)
    for step, dist, index in zip(steps, ev.distributions, ev.action_indices):
        assert step.learner_recompute and step.response_ids in step.choice_ids
        # the learner's whole-choice log-prob against the engine's, summed over the reply's tokens
        assert index == step.choice_ids.index(step.response_ids)
        assert abs(dist[index].item() - sum(step.token_logprobs)) < TOLERANCE * len(step.token_logprobs)


@pytest.mark.parametrize("shape", ["RegexAgent", "GrammarAgent"])
def test_grammar_replies_on_the_engine_equal_the_learners(tokenizer, tiny_gguf, shape):
    pytest.importorskip("llguidance")
    import re

    from tests import test_replies

    agent = getattr(test_replies, shape)(make_tiny_lm(), tokenizer, precision="fp32", seed=0, max_new_tokens=12,
                                         algorithm_config={"batch_episodes": 99},
                                         backend=LlamaCppBackend(gguf=tiny_gguf, n_threads=1))
    agent.train(ChoiceEnv(steps=3), 4, seed=0, progress=False)
    steps = test_replies.recorded_steps(agent)
    assert all(re.fullmatch(r"go (left|right)!?", s.text) for s in steps) and agent.actor.parse_failures == 0
    with torch.no_grad():
        ev = agent.policy.evaluate_actions(steps, with_values=False, with_entropy=False)
    for step, dist in zip(steps, ev.distributions):
        assert step.learner_recompute and step.reply_grammar is not None
        assert (dist.float() - torch.tensor(step.token_logprobs)).abs().max() < TOLERANCE
