"""The frozen-bottom prefix cache: the cached path gives what the uncached one gives, and never a stale entry."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rllama.algorithms.buffers import Step
from rllama.errors import RLlamaError
from rllama.policy import PolicyModel, default_lora_config
from rllama.policy.engine import RadixCache
from tests.conftest import make_tiny_lm

ATOL = 1e-5


def make_deep_lm(seed: int = 0, layers: int = 4, attention: str = "sdpa"):
    """A 4-block tiny Llama: LoRA on the top blocks leaves a frozen bottom to cache."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    config._attn_implementation = attention
    return LlamaForCausalLM(config)


def make_pair(tokenizer, layers=(2, 3), cache_mb=64.0, attention="sdpa", seed=0):
    """The same policy twice: with the prefix cache and without; the adapters hold the same nonzero weights."""
    pols = []
    for on in (True, False):
        lm = make_deep_lm(seed, attention=attention)
        pol = PolicyModel(lm, tokenizer, lora_config=default_lora_config(layers=list(layers)), precision="fp32",
                          prefix_cache=on, prefix_cache_mb=cache_mb)
        pols.append(pol)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pols[0].trainable_parameters():
            p.normal_(0, 0.1)
        for (_, a), (_, b) in zip(pols[0].named_parameters(), pols[1].named_parameters()):
            b.copy_(a)
    assert pols[0].engine.stats() and not pols[1].engine.stats()  # the cached engine, the plain one
    return pols


def episode_prompts(seed=0, episodes=3, turns=3):
    """Multi-turn prompts: a shared system prompt, each turn extending the episode's earlier ones."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 380) for _ in range(12)]
    prompts = []
    for _ in range(episodes):
        ids = list(system)
        for _ in range(turns):
            ids = ids + [rng.randrange(3, 380) for _ in range(rng.randrange(2, 7))]
            prompts.append(list(ids))
            ids = ids + [rng.randrange(3, 380) for _ in range(3)]  # the reply
    return prompts


def candidates(seed=0, n=3):
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randrange(1, 4))] for _ in range(n)]


def test_scoring_equals_the_uncached_path_across_calls(tokenizer):
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts()
    cands = [candidates(i) for i in range(len(prompts))]
    for batch in (prompts[:4], prompts[2:], prompts, [prompts[5]]):  # hits, partial hits and misses
        bc = [cands[prompts.index(p)] for p in batch]
        with torch.no_grad():
            a = cached.candidate_outputs(batch, bc, q_heads=("value",))
            b = plain.candidate_outputs(batch, bc, q_heads=("value",))
        for x, y in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)
    stats = cached.engine.stats()
    assert stats["hit_tokens"] > stats["miss_tokens"] > 0 and stats["frozen_blocks"] == 2


def test_remembered_scores_follow_the_adapter_and_the_temperature(tokenizer):
    """Scores read from the memo (a frozen adapter's) equal a fresh forward, and are forgotten when the
    adapter's weights or the temperature change."""
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts()[:4]
    cands = [candidates(i) for i in range(4)]

    def both():
        with torch.no_grad():
            return (cached.candidate_outputs(prompts, cands).logprobs,
                    plain.candidate_outputs(prompts, cands).logprobs)

    def check():
        a, b = both()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)

    check()
    n = sum(len(c) for c in cands)
    assert cached.engine.stats()["memo_continuations"] == n
    with torch.no_grad(), cached.reference():  # the reference's scores are remembered apart ...
        cached.candidate_outputs(prompts, cands)
    assert cached.engine.stats()["memo_continuations"] == 2 * n  # ... and the policy's survive them
    check()  # from the memo
    with torch.no_grad():
        for pol in (cached, plain):
            next(p for n, p in pol.named_parameters() if "lora_B" in n).add_(0.5)
    check()  # new adapter weights: computed afresh
    for pol in (cached, plain):
        pol.temperature = 2.0
    check()
    cached.invalidate()
    assert cached.engine.stats()["memo_continuations"] == 0


def test_a_batch_seen_before_is_served_from_the_memo_without_a_forward(tokenizer):
    """A frozen adapter's outputs for (prompt, candidate) pairs seen before, features included (what heads
    read), come from the memo: equal to a fresh forward, and the prefix cache is not even consulted."""
    cached, plain = make_pair(tokenizer)
    with torch.no_grad():  # heads that read the features (they start at zero)
        for (_, a), (_, b) in zip(cached.heads.named_parameters(), plain.heads.named_parameters()):
            a.normal_(0, 0.1)
            b.copy_(a)
    prompts = episode_prompts()[:4]
    cands = [candidates(i) for i in range(4)]
    with torch.no_grad():
        cached.candidate_outputs(prompts, cands, q_heads=("value",))
        looked_up = cached.engine.stats()["top"]  # the frozen adapter's states, per token
        order = [3, 1, 0, 2]  # another batch of the same pairs
        a = cached.candidate_outputs([prompts[i] for i in order], [cands[i] for i in order], q_heads=("value",))
        b = plain.candidate_outputs([prompts[i] for i in order], [cands[i] for i in order], q_heads=("value",))
    assert cached.engine.stats()["top"] == looked_up  # not even looked up: no forward ran
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)  # from the prompts' features
    assert a.values.abs().sum() > 0
    for x, y in zip(a.q["value"], b.q["value"]):  # from the candidates' features
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    with torch.no_grad():  # one pair never seen: the batch is computed, and still equal
        c = cached.candidate_outputs([prompts[0]], [cands[0] + [[5, 6]]], q_heads=("value",))
        d = plain.candidate_outputs([prompts[0]], [cands[0] + [[5, 6]]], q_heads=("value",))
    torch.testing.assert_close(c.q["value"][0], d.q["value"][0], atol=ATOL, rtol=0)
    assert cached.engine.stats()["top"]["hit_tokens"] > looked_up["hit_tokens"]


def steps_of(prompts, cands, scored=True):
    rng = random.Random(0)
    out = []
    for p, c in zip(prompts, cands):
        if scored:
            out.append(Step(prompt_ids=p, candidate_ids=c, action_index=rng.randrange(len(c)), logprob=0.0))
        else:
            out.append(Step(prompt_ids=p, response_ids=[rng.randrange(3, 380) for _ in range(4)] + [1], logprob=0.0))
    return out


def test_a_batch_partly_seen_before_runs_only_its_new_prompts(tokenizer):
    """Prompts whose every candidate is remembered come from the memo and only the others run through the
    adapted blocks (a replayed minibatch with one new state costs that state's forward); the outputs equal a
    fresh forward's, in the batch's order."""
    cached, plain = make_pair(tokenizer)
    with torch.no_grad():
        for (_, a), (_, b) in zip(cached.heads.named_parameters(), plain.heads.named_parameters()):
            a.normal_(0, 0.1)
            b.copy_(a)
    prompts = episode_prompts()
    cands = [candidates(i) for i in range(len(prompts))]
    seen = [0, 2, 3, 6]
    run = []
    top = cached.engine._hidden_from_top_tree
    cached.engine._hidden_from_top_tree = lambda p, c, *rest: run.append(len(c)) or top(p, c, *rest)
    with torch.no_grad():
        cached.candidate_outputs([prompts[i] for i in seen], [cands[i] for i in seen], q_heads=("value",))
        run.clear()
        a = cached.candidate_outputs(prompts, cands, q_heads=("value",))
        b = plain.candidate_outputs(prompts, cands, q_heads=("value",))
    assert run == [sum(len(cands[i]) for i in range(len(prompts)) if i not in seen)]  # the new prompts only
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)
    for x, y in zip(a.q["value"], b.q["value"]):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_the_memo_bound_counts_a_prompts_features_once(tokenizer, monkeypatch):
    """The memo's byte bound counts a prompt's features once for all its continuations: under the same bound
    it keeps more continuations that share one prompt than continuations each with a prompt of its own,
    and forgets the least recently used beyond it."""
    cached, _ = make_pair(tokenizer)
    cached.engine.memo.max_bytes = 10 * (2 * 64 * 4 + 4 * 2 + 200)  # ~10 unshared entries
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 380) for _ in range(10)] for _ in range(16)]
    pairs = [[rng.randrange(3, 380), rng.randrange(3, 380)] for _ in range(16)]
    kept = {}
    for name, batch, cands in (("own", prompts, [[p] for p in pairs]), ("shared", prompts[:1], [pairs])):
        cached.invalidate()
        with torch.no_grad():
            cached.candidate_outputs(batch, cands)
        kept[name] = cached.engine.stats()["memo_continuations"]
    assert 0 < kept["own"] < kept["shared"] < 16
    looked_up = cached.engine.stats()["top"]
    with torch.no_grad():  # the most recent continuations are still served without a forward
        cached.candidate_outputs(prompts[:1], [pairs[-kept["shared"]:]])
    assert cached.engine.stats()["top"] == looked_up


@pytest.mark.parametrize("scored", [True, False])
def test_evaluate_and_gradients_equal_the_uncached_path(tokenizer, scored):
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts(seed=3)
    steps = steps_of(prompts, [candidates(i) for i in range(len(prompts))], scored)
    results = []
    for pol in (cached, plain):
        pol.zero_grad()
        with torch.no_grad():
            pol.evaluate_actions(steps[:3])  # warm the cache on part of the batch
        ev = pol.evaluate_actions(steps)
        logp, _ = ev.unit_logprobs()
        loss = logp.sum() + ev.values.sum() + ev.entropy.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in pol.named_parameters() if p.requires_grad}
        results.append((logp.detach(), ev.values.detach(), ev.entropy.detach(), grads))
    (la, va, ea, ga), (lb, vb, eb, gb) = results
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
    torch.testing.assert_close(va, vb, atol=ATOL, rtol=0)
    torch.testing.assert_close(ea, eb, atol=ATOL, rtol=0)
    assert ga.keys() == gb.keys() and any(g.abs().sum() > 0 for g in ga.values())
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=ATOL, rtol=1e-4, msg=name)


def test_reference_pass_equals_the_uncached_path(tokenizer):
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts(seed=4)
    steps = steps_of(prompts, [candidates(i) for i in range(len(prompts))])
    out = []
    for pol in (cached, plain):
        with torch.no_grad(), pol.reference():
            out.append(torch.cat(pol.evaluate_actions(steps).distributions))
    torch.testing.assert_close(out[0], out[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_generation_equals_the_uncached_path(tokenizer, batch):
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts(seed=5)[:batch]
    replies = []
    for pol in (cached, plain):
        with torch.no_grad():
            pol.continuation_logprobs(prompts[:1], [[5, 6]], [0])  # part of a prompt already cached
        gen = torch.Generator().manual_seed(0)
        replies.append(pol.generate(prompts, max_new_tokens=6, generator=gen))
    for a, b in zip(*replies):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs), atol=ATOL, rtol=0)
        assert a.value == pytest.approx(b.value, abs=ATOL)


def test_eager_attention_equals_the_uncached_path(tokenizer):
    cached, plain = make_pair(tokenizer, attention="eager")
    prompts = episode_prompts(seed=6)
    cands = [candidates(i) for i in range(len(prompts))]
    with torch.no_grad():
        a = cached.candidate_outputs(prompts, cands)
        b = plain.candidate_outputs(prompts, cands)
    torch.testing.assert_close(torch.cat(a.logprobs), torch.cat(b.logprobs), atol=ATOL, rtol=0)


def test_a_cache_too_small_to_hold_anything_is_still_correct(tokenizer):
    cached, plain = make_pair(tokenizer, cache_mb=1e-4)  # 104 bytes: not one token's states
    prompts = episode_prompts(seed=7)
    cands = [candidates(i) for i in range(len(prompts))]
    for _ in range(2):
        with torch.no_grad():
            a = cached.candidate_outputs(prompts, cands)
            b = plain.candidate_outputs(prompts, cands)
        torch.testing.assert_close(torch.cat(a.logprobs), torch.cat(b.logprobs), atol=ATOL, rtol=0)
    assert cached.engine.stats()["bytes"] <= 105


def test_radix_tree_matches_splits_and_evicts_least_recently_used():
    def states(n, fill):
        return torch.full((1, 1, n, 2), fill), torch.full((1, 1, n, 2), fill), torch.full((n, 3), fill)

    cache = RadixCache(max_bytes=10**6)
    cache.insert([1, 2, 3, 4], 0, *states(4, 1.0))
    cache.insert([1, 2, 9], 2, *states(1, 2.0))  # splits the first node after [1, 2]
    pieces = cache.match([1, 2, 3, 7])
    assert [p.n for p in pieces] == [2, 1]
    assert torch.cat([p.node.hidden[: p.n] for p in pieces])[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert [p.n for p in cache.match([1, 2, 9, 9])] == [2, 1]
    per_token = sum(t.numel() * 4 for t in states(1, 0.0))
    with pytest.raises(ValueError, match="max_bytes"):
        RadixCache(-1)

    def fill(cache):
        cache.insert([1, 2, 3], 0, *states(3, 1.0))
        cache.insert([5, 6], 0, *states(2, 2.0))
        cache.match([1, 2, 3])  # [1, 2, 3] is now the more recently used
        cache.insert([7, 8], 0, *states(2, 3.0))  # over the bound (6 tokens): down to 90 %
        return {k: cache.match(k) for k in ((1, 2, 3), (5, 6), (7, 8))}

    # First the least recently used prefixes lose their keys and values; their boundary states stay.
    small = RadixCache(max_bytes=6 * per_token)
    found = fill(small)
    assert [sum(p.n for p in found[k]) for k in found] == [3, 2, 2]
    assert [found[k][0].node.has_kv for k in found] == [False, False, True]
    assert small.nbytes <= 0.9 * small.max_bytes and small.hidden_only_bytes == 5 * 3 * 4
    # Boundary-state-only nodes beyond their share of the bound go, least recently used first.
    strict = RadixCache(max_bytes=6 * per_token, hidden_share=0.0)
    found = fill(strict)
    assert [sum(p.n for p in found[k]) for k in found] == [3, 0, 2]
    assert found[(1, 2, 3)][0].node.has_kv
    # A prefix that lost its keys and values gets them back when its states are computed again.
    strict.insert([5, 6], 0, *states(2, 2.0))
    small.insert([5, 6, 4], 0, *states(3, 2.0))
    assert small.match([5, 6])[0].node.has_kv and small.match([5, 6, 4])[-1].node.has_kv


def test_states_without_keys_and_values_still_give_the_uncached_results(tokenizer):
    cached, plain = make_pair(tokenizer, cache_mb=0.05)  # about 70 tokens of this model's states
    prompts = episode_prompts(seed=11, episodes=4)
    cands = [candidates(i) for i in range(len(prompts))]
    steps = steps_of(prompts, cands)
    seen_hidden_only = False
    for rnd in range(3):
        for pol in (cached, plain):
            with torch.no_grad():
                out = pol.candidate_outputs(prompts[rnd:], cands[rnd:])
                ev = pol.evaluate_actions(steps)
                gen = pol.generate(prompts[:2], max_new_tokens=3, greedy=True)
            if pol is cached:
                a = (torch.cat(out.logprobs), torch.cat(ev.distributions), ev.values, [g.token_ids for g in gen])
                seen_hidden_only |= cached.engine.stats()["hidden_only_bytes"] > 0
            else:
                b = (torch.cat(out.logprobs), torch.cat(ev.distributions), ev.values, [g.token_ids for g in gen])
        for x, y in zip(a[:3], b[:3]):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
        assert a[3] == b[3]
    assert seen_hidden_only
    stats = cached.engine.stats()
    assert stats["bytes"] <= 0.05 * 2**20 and stats["hit_tokens"] > 0


def test_changing_the_adapted_blocks_never_serves_a_stale_entry(tokenizer):
    cached, _ = make_pair(tokenizer, layers=(2, 3))
    prompts = episode_prompts(seed=8)
    with torch.no_grad():
        cached.candidate_outputs(prompts, [candidates(i) for i in range(len(prompts))])
    assert cached.engine.stats()["bytes"] > 0
    # A skill adapter on block 1 moves the frozen/trainable split down: every cached state is now stale.
    cached.add_adapter("skill", default_lora_config(layers=[1, 2, 3]))
    assert cached.engine.stats()["frozen_blocks"] == 1 and cached.engine.stats()["bytes"] == 0
    with torch.no_grad():
        for p in cached.adapter_parameters("skill"):
            p.normal_(0, 0.1)
    plain = PolicyModel(make_deep_lm(0), tokenizer, lora_config=default_lora_config(layers=[2, 3]),
                        precision="fp32", prefix_cache=False)
    plain.add_adapter("skill", default_lora_config(layers=[1, 2, 3]))
    plain.load_state_dict(cached.state_dict())
    for pol in (cached, plain):
        pol.set_adapter("skill")
    cands = [candidates(i) for i in range(len(prompts))]
    with torch.no_grad():
        a = cached.candidate_outputs(prompts, cands)
        b = plain.candidate_outputs(prompts, cands)
    torch.testing.assert_close(torch.cat(a.logprobs), torch.cat(b.logprobs), atol=ATOL, rtol=0)
    cached.set_adapter("default")
    cached.delete_adapter("skill")
    assert cached.engine.stats()["frozen_blocks"] == 2


def test_an_adapter_on_the_same_blocks_keeps_the_frozen_states(tokenizer):
    """Adding, loading or deleting an adapter that leaves the lowest adapted block where it was keeps what the
    frozen blocks computed (it depends on the base model alone) and forgets the adapted blocks' states."""
    cached, plain = make_pair(tokenizer, layers=(2, 3))
    prompts = episode_prompts(seed=8)
    cands = [candidates(i) for i in range(len(prompts))]
    _same_scores(cached, plain, prompts, cands)
    kept = cached.engine.stats()
    cached.add_adapter("skill", default_lora_config(layers=[2, 3]))
    after = cached.engine.stats()
    assert after["bytes"] == kept["bytes"] > 0 and after["top"]["bytes"] == 0 and after["memo_continuations"] == 0
    plain.add_adapter("skill", default_lora_config(layers=[2, 3]))
    with torch.no_grad():
        for pol in (cached, plain):
            for p in pol.adapter_parameters("skill"):
                p.fill_(0.02)
    with cached.using_adapter("skill"), plain.using_adapter("skill"):
        _same_scores(cached, plain, prompts, cands)
    assert cached.engine.stats()["miss_tokens"] == kept["miss_tokens"]  # no frozen block ran again
    cached.invalidate()  # the base weights changed by hand: everything goes
    assert cached.engine.stats()["bytes"] == 0


def test_every_block_adapted_means_no_cache_and_true_is_an_error(tokenizer):
    pol = PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers="all"), precision="fp32")
    assert pol.engine.stats() == {}
    with pytest.raises(RLlamaError, match="no block is frozen"):
        PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers="all"), prefix_cache=True)


def test_a_model_without_locatable_blocks_gets_a_clear_error(tokenizer):
    with pytest.raises(RLlamaError, match="GPT2LMHeadModel.*prefix_cache=False"):
        PolicyModel(make_tiny_lm("gpt2"), tokenizer, prefix_cache=True)
    assert not PolicyModel(make_tiny_lm("gpt2"), tokenizer).engine.stats()  # "auto": off, silently


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_a_negative_cache_budget_is_refused(tokenizer, bad):
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        PolicyModel(make_deep_lm(), tokenizer, prefix_cache_mb=bad)


def test_zero_budget_means_off(tokenizer):
    pol = PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers=[3]), prefix_cache_mb=0)
    assert not pol.engine.stats()


def test_the_default_lora_config_adapts_the_top_blocks_and_caches_the_rest(tokenizer):
    pol = PolicyModel(make_deep_lm(layers=12), tokenizer)
    assert pol.engine.stats()["frozen_blocks"] == 4
    small = PolicyModel(make_tiny_lm(), tokenizer)  # 2 blocks: all adapted, nothing frozen
    assert not small.engine.stats()


def test_loading_a_checkpoint_of_another_block_layout_says_how_to_match_it(tokenizer, tmp_path):
    every = PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers="all"), precision="fp32")
    every.save(tmp_path / "every")
    top = PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32")
    with pytest.raises(RLlamaError, match=r"adapts every block, this policy adapts blocks \[2, 3\].*layers='all'"):
        top.load(tmp_path / "every")
    top.save(tmp_path / "top")
    with pytest.raises(RLlamaError, match=r"adapts blocks \[2, 3\].*layers=\[2, 3\]"):
        every.load(tmp_path / "top")
    again = PolicyModel(make_deep_lm(), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32")
    again.load(tmp_path / "top")  # the same layout loads


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompts_of_very_different_lengths_run_in_groups_with_the_same_results(tokenizer, use_cache):
    from rllama.policy.engine.batching import length_groups

    pol = make_pair(tokenizer)[0 if use_cache else 1]
    rng = random.Random(9)
    system = [rng.randrange(3, 380) for _ in range(10)]
    prompts = [system + [rng.randrange(3, 380) for _ in range(n)] for n in (2, 40, 3, 41, 2, 80)]
    assert len(length_groups([len(p) for p in prompts], 10)) > 1
    cands = [candidates(i) for i in range(len(prompts))]
    with torch.no_grad():
        together = pol.candidate_outputs(prompts, cands, q_heads=("value",))
        alone = [pol.candidate_outputs([p], [c], q_heads=("value",)) for p, c in zip(prompts, cands)]
    for b, one in enumerate(alone):
        torch.testing.assert_close(together.logprobs[b], one.logprobs[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(together.q["value"][b], one.q["value"][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(together.values[b], one.values[0], atol=ATOL, rtol=0)


def test_length_groups_split_only_when_padding_costs_more_than_a_group():
    from rllama.policy.engine.batching import length_groups

    assert length_groups([100, 101, 102, 103], 90) == [[0, 1, 2, 3]]
    groups = length_groups([100, 200, 101, 201, 102, 202], 90)
    assert groups == [[0, 2, 4], [1, 3, 5]]
    assert sorted(sum(length_groups(list(range(50, 700, 3)), 40), [])) == list(range(len(range(50, 700, 3))))


def test_reference_distributions_are_remembered_and_equal_a_fresh_computation(tokenizer):
    """The reference's outputs are kept in the engine's memo: steps met before cost no forward, and a
    remembered distribution is bit for bit the one first computed."""
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts(seed=10)
    steps = steps_of(prompts, [candidates(i) for i in range(len(prompts))])
    first = cached.reference_distributions(steps[:4], batch_size=3)
    computed = []  # the continuations run through the adapted blocks
    top = cached.engine._hidden_from_top_tree
    cached.engine._hidden_from_top_tree = lambda p, c, *rest: computed.append(len(c)) or top(p, c, *rest)
    again = cached.reference_distributions(steps, batch_size=3)
    assert sum(computed) == sum(len(s.candidate_ids) for s in steps[4:])  # the first four were remembered
    fresh = plain.reference_distributions(steps, batch_size=3)
    for a, b in zip(again, fresh):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    cached.temperature = 2.0  # another policy setting: another reference distribution
    computed.clear()
    cached.reference_distributions(steps[:2])
    assert sum(computed) == sum(len(s.candidate_ids) for s in steps[:2])


def _same_scores(cached, plain, prompts, cands):
    with torch.no_grad():
        a = cached.candidate_outputs(prompts, cands, q_heads=("value",))
        b = plain.candidate_outputs(prompts, cands, q_heads=("value",))
    torch.testing.assert_close(torch.cat(a.logprobs), torch.cat(b.logprobs), atol=ATOL, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("change", ["adamw", "fused-adamw", "data-write", "load_state_dict"])
def test_acting_never_reads_adapted_block_states_of_older_weights(tokenizer, change):
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts(seed=12)
    cands = [candidates(i) for i in range(len(prompts))]
    _same_scores(cached, plain, prompts, cands)  # fills the top tree
    assert cached.engine.stats()["top"]["bytes"] > 0
    for pol in (cached, plain):
        params = pol.adapter_parameters()
        if change.endswith("adamw"):
            opt = torch.optim.AdamW(params, lr=0.05, fused=change == "fused-adamw")
            loss = pol.evaluate_actions(steps_of(prompts[:3], cands[:3])).values.sum() + sum(p.sum() for p in params)
            loss.backward()
            opt.step()
        elif change == "data-write":
            for p in params:
                p.data.mul_(1.5)
        else:
            state = {n: p.detach() * 0.5 for n, p in pol.named_parameters() if "lora_" in n}
            pol.load_state_dict(state, strict=False)
    _same_scores(cached, plain, prompts, cands)


def test_acting_top_tree_and_the_reference_snapshots_and_other_adapters(tokenizer):
    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts(seed=13)
    cands = [candidates(i) for i in range(len(prompts))]
    _same_scores(cached, plain, prompts, cands)
    with cached.reference(), plain.reference():
        _same_scores(cached, plain, prompts, cands)
    snapshots = [pol.snapshot() for pol in (cached, plain)]
    for pol in (cached, plain):
        with torch.no_grad():
            for p in pol.adapter_parameters():
                p.add_(0.05)
    _same_scores(cached, plain, prompts, cands)
    with cached.weights(snapshots[0]), plain.weights(snapshots[1]):
        _same_scores(cached, plain, prompts, cands)
    _same_scores(cached, plain, prompts, cands)
    for pol in (cached, plain):
        pol.add_adapter("other", default_lora_config(layers=[2, 3]))
        with torch.no_grad():
            for p in pol.adapter_parameters("other"):
                p.fill_(0.01)
    with cached.using_adapter("other"), plain.using_adapter("other"):
        _same_scores(cached, plain, prompts, cands)
    _same_scores(cached, plain, prompts, cands)


def test_many_candidates_of_one_prompt_run_packed_once_each_with_the_uncached_results(tokenizer, monkeypatch):
    from rllama.policy.engine.split import SplitModel

    cached, plain = make_pair(tokenizer)
    prompts = episode_prompts()[:2]
    rng = random.Random(3)
    many = [[rng.randrange(3, 380) for _ in range(rng.randrange(1, 5))] for _ in range(40)]
    cands = [many + many[:5], candidates(1, 4)]  # five candidates twice
    calls = []
    extend = SplitModel._extend

    def spy(self, tree, lo, hi, seqs, cached_parts, units, inputs=None):
        calls.append([[(tuple(seqs[i]), len(seqs[i]) - cached_parts[i].n, cached_parts[i].n) for i in unit]
                      for unit in units])
        return extend(self, tree, lo, hi, seqs, cached_parts, units, inputs)

    monkeypatch.setattr(SplitModel, "_extend", spy)
    for grad in (False, True):  # acting (both trees) and an update (boundary states only)
        with torch.set_grad_enabled(grad):
            a = cached.candidate_outputs(prompts, cands, q_heads=("value",))
            b = plain.candidate_outputs(prompts, cands, q_heads=("value",))
        for x, y in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.q["value"][0], b.q["value"][0], atol=ATOL, rtol=0)
    assert calls
    for units in calls:
        rows = [row for unit in units for row in unit]
        assert len({seq for seq, _, _ in rows}) == len(rows)  # a sequence met twice runs once
        for unit in units:
            prefix = unit[0][2]
            assert len({seq[:prefix] for seq, _, _ in unit}) == 1  # one shared cached prefix a packed row
            assert len(unit) == 1 or sum(new for _, new, _ in unit) <= max(prefix, 64)
    assert any(len(unit) > 1 for units in calls for unit in units)


def test_an_untrained_adapter_and_the_reference_share_their_cached_states(tokenizer):
    lm = make_deep_lm(0)
    pol = PolicyModel(lm, tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32")
    prompts = episode_prompts(seed=5)
    cands = [candidates(i) for i in range(len(prompts))]
    with torch.no_grad():
        acted = pol.candidate_outputs(prompts, cands)  # a fresh adapter: every B weight is zero
    top = pol.engine.stats()["top"]
    with torch.no_grad(), pol.reference():
        reference = pol.candidate_outputs(prompts, cands)
    after = pol.engine.stats()["top"]
    assert after["miss_tokens"] == top["miss_tokens"]  # the reference computed nothing again
    for a, b in zip(acted.logprobs, reference.logprobs):
        assert torch.equal(a, b)
    with torch.no_grad():  # once the adapter adds something, the two are apart again
        pol.adapter_parameters()[-1].add_(0.5)
        moved = pol.candidate_outputs(prompts, cands)
        with pol.reference():
            again = pol.candidate_outputs(prompts, cands)
    plain = PolicyModel(make_deep_lm(0), tokenizer, lora_config=default_lora_config(layers=[2, 3]),
                        precision="fp32", prefix_cache=False)
    with torch.no_grad():
        for (_, a), (_, b) in zip(pol.named_parameters(), plain.named_parameters()):
            b.copy_(a)
        expected = plain.candidate_outputs(prompts, cands)
        with plain.reference():
            expected_reference = plain.candidate_outputs(prompts, cands)
    torch.testing.assert_close(torch.cat(moved.logprobs), torch.cat(expected.logprobs), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(again.logprobs), torch.cat(expected_reference.logprobs), atol=ATOL, rtol=0)
    assert not torch.allclose(torch.cat(moved.logprobs), torch.cat(again.logprobs))


def test_a_dora_adapter_is_never_taken_for_the_base_model(tokenizer):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[2, 3],
                        use_dora=True)
    pol = PolicyModel(make_deep_lm(0), tokenizer, lora_config=config, precision="fp32")
    assert pol.engine.signature() != ("base model",)  # a zero B still rescales DoRA's weights
    with pol.reference():
        assert pol.engine.signature() == ("base model",)
    fresh = PolicyModel(make_deep_lm(0), tokenizer, lora_config=default_lora_config(layers=[2, 3]), precision="fp32")
    assert fresh.engine.signature() == ("base model",)
