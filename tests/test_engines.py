"""Every forward engine against the plain one, through the engine interface alone.

An engine is built over the same model parts as a policy's plain engine (so the weights are the same
objects) and must return what the plain engine returns: token log-probs, entropies and features of
continuations, prompt features, gradients, generated replies, after the adapter's weights change and
after ``invalidate()``. A new engine joins ``ENGINES`` and is tested the same way.
"""

from __future__ import annotations

import random

import pytest
import torch

from rllama.policy import PolicyModel, default_lora_config
from rllama.policy.engine import CachedEngine, Engine, PlainEngine
from rllama.policy.generation import generate
from tests.test_prefix_cache import candidates, episode_prompts, make_deep_lm

ATOL = 1e-5

ENGINES = {
    "cached": lambda parts, lm: CachedEngine(parts, 64 * 2**20, lm),
    "cached, tiny bound": lambda parts, lm: CachedEngine(parts, 2000, lm),  # keeps next to nothing
}


@pytest.fixture(params=list(ENGINES))
def engines(request, tokenizer) -> tuple[Engine, Engine, PolicyModel]:
    """``(engine under test, plain engine, policy)``: both engines over the policy's one model, its adapter
    holding nonzero weights."""
    policy = PolicyModel(make_deep_lm(0), tokenizer, lora_config=default_lora_config(layers=[2, 3]),
                         precision="fp32", engine=lambda parts, lm: PlainEngine(parts))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0, 0.1)
    engine = ENGINES[request.param](policy.engine.parts, policy.lm)
    return engine, policy.engine, policy


def batch(seed: int):
    prompts = episode_prompts(seed=seed)
    cands = [candidates(i) for i in range(len(prompts))]
    flat = [c for cs in cands for c in cs]
    owner = [b for b, cs in enumerate(cands) for _ in cs]
    return prompts, flat, owner


def assert_same(a, b, entropy: bool = False) -> None:
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.prompt_hidden, b.prompt_hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.action_hidden, b.action_hidden, atol=ATOL, rtol=0)
    assert torch.equal(a.mask, b.mask)
    if entropy:
        torch.testing.assert_close(a.entropy, b.entropy, atol=ATOL, rtol=0)


def test_encode_equals_the_plain_engine_across_calls(engines):
    engine, plain, _ = engines
    prompts, conts, owner = batch(0)
    rows = list(range(len(conts)))
    for part in (rows[:7], rows[4:], rows, rows[:2]):  # states kept, partly kept, new
        ps = sorted({owner[r] for r in part})
        local = {b: i for i, b in enumerate(ps)}
        args = [prompts[b] for b in ps], [conts[r] for r in part], [local[owner[r]] for r in part]
        for temperature, logprobs in ((1.0, True), (2.0, True), (1.0, False)):
            with torch.no_grad():
                a = engine.encode(*args, temperature=temperature, logprobs=logprobs)
                b = plain.encode(*args, temperature=temperature, logprobs=logprobs)
            assert_same(a, b)
        with torch.no_grad():
            a = engine.encode(*args, entropy_rows=[True] * len(part))
            b = plain.encode(*args, entropy_rows=[True] * len(part))
        assert_same(a, b, entropy=True)
        torch.testing.assert_close(engine.encode_prompts(args[0]), plain.encode_prompts(args[0]), atol=ATOL, rtol=0)


def test_gradients_equal_the_plain_engine(engines):
    engine, plain, policy = engines
    prompts, conts, owner = batch(1)
    with torch.no_grad():
        engine.encode(prompts[:3], conts[:4], [0, 0, 1, 2])  # states kept from acting
    grads = []
    for e in (engine, plain):
        policy.zero_grad()
        out = e.encode(prompts, conts, owner, entropy_rows=[True] * len(conts))
        loss = out.token_logprobs.sum() + out.entropy.sum() + out.action_hidden.square().mean()
        loss = loss + e.encode_prompts(prompts).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_equals_the_plain_engine(engines, greedy):
    engine, plain, policy = engines
    prompts = episode_prompts(seed=2)[:3]
    with torch.no_grad():
        engine.encode(prompts[:1], [[5, 6]], [0])  # part of a prompt kept
    replies = []
    for e in (engine, plain):
        gen = torch.Generator().manual_seed(0)
        replies.append(generate(e, policy.heads["value"], prompts, 1.0, 6, greedy, (), gen))
    for a, b in zip(*replies):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs), atol=ATOL, rtol=0)


def test_new_adapter_weights_and_invalidate_never_serve_stale_outputs(engines):
    engine, plain, policy = engines
    prompts, conts, owner = batch(3)
    with torch.no_grad():
        assert_same(engine.encode(prompts, conts, owner), plain.encode(prompts, conts, owner))
        policy.adapter_parameters()[-1].add_(0.5)  # an update
        assert_same(engine.encode(prompts, conts, owner), plain.encode(prompts, conts, owner))
        with policy.reference():  # the adapter disabled
            assert_same(engine.encode(prompts, conts, owner), plain.encode(prompts, conts, owner))
        engine.invalidate()
        assert_same(engine.encode(prompts, conts, owner), plain.encode(prompts, conts, owner))
    assert isinstance(engine.stats(), dict)


def test_a_policy_runs_on_the_engine_it_is_given(tokenizer):
    made = []

    def factory(parts, lm):
        made.append(parts)
        return PlainEngine(parts)

    policy = PolicyModel(make_deep_lm(0), tokenizer, lora_config=default_lora_config(layers=[2, 3]), engine=factory)
    assert isinstance(policy.engine, PlainEngine) and made[0].body is policy.engine.parts.body
    assert policy.engine.stats() == {}
    with pytest.raises(ValueError, match="engine= chooses the engine"):
        PolicyModel(make_deep_lm(0), tokenizer, engine=factory, prefix_cache=False)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 380) for _ in range(12)]
    logprobs, values = policy.score_candidates([prompt], [[[5], [6, 7]]])
    assert logprobs[0].shape == (2,) and values.shape == (1,)
    with pytest.warns(DeprecationWarning, match="invalidate"):  # the names before the engine layer still work
        policy.clear_prefix_cache()
    with pytest.warns(DeprecationWarning, match="engine.stats"):
        assert policy.prefix_cache_stats() == {} and not policy.prefix_cache_active
