"""PolicyModel: batched continuation log-probs, scoring, generation, reference, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from rllama import ModelNotFoundError, PolicyModel, RLlamaError
from rllama.algorithms import Step
from rllama.errors import CorruptFileError
from rllama.policy.model import candidate_score
from tests.conftest import make_tiny_lm


def _randomise_adapter(policy: PolicyModel, seed: int = 1) -> None:
    """LoRA B starts at zero; give it values so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "heads" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _naive_logprobs(policy: PolicyModel, prompt, continuation):
    """Token log-probs of a continuation from one unpadded full forward pass."""
    ids = torch.tensor([list(prompt) + list(continuation)])
    logp = torch.log_softmax(policy.lm(input_ids=ids).logits[0].float() / policy.temperature, -1)
    P = len(prompt)
    return torch.stack([logp[P - 1 + j, continuation[j]] for j in range(len(continuation))])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_continuation_logprobs_match_unbatched_forward(tokenizer, kind, shared_prefix):
    policy = PolicyModel(make_tiny_lm(kind), tokenizer, precision='fp32')
    _randomise_adapter(policy)
    head = list(range(40, 60)) if shared_prefix else []
    prompts = [head + [5, 6, 7, 8], head + [9], head + [10, 11, 12, 13, 14, 15, 16]]
    conts = [[30, 31, 32], [40], [50, 51], [60, 61, 62, 63], [70]]
    owner = [0, 0, 1, 2, 2]
    with torch.no_grad():
        enc = policy.continuation_logprobs(prompts, conts, owner, entropy_rows=[True] * 5)
        for r, (c, o) in enumerate(zip(conts, owner)):
            expected = _naive_logprobs(policy, prompts[o], c)
            torch.testing.assert_close(enc.token_logprobs[r, : len(c)], expected, atol=1e-4, rtol=1e-4)
            assert torch.all(enc.token_logprobs[r, len(c) :] == 0)
            assert enc.mask[r].sum() == len(c)
            assert torch.all(enc.entropy[r, : len(c)] > 0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_candidates_do_not_see_each_other(tokenizer, attention):
    """Several multi-token continuations of one prompt share a packed row; each must see only its prompt and itself."""
    lm = make_tiny_lm()
    lm.config._attn_implementation = attention
    policy = PolicyModel(lm, tokenizer, precision="fp32")
    _randomise_adapter(policy)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    conts = [[30, 31, 32], [33, 34, 35, 36], [37], [38, 39], [50, 51, 52], [53, 54]]
    owner = [0, 0, 0, 0, 1, 1]
    with torch.no_grad():
        enc = policy.continuation_logprobs(prompts, conts, owner)
        for r, (c, o) in enumerate(zip(conts, owner)):
            torch.testing.assert_close(enc.token_logprobs[r, : len(c)], _naive_logprobs(policy, prompts[o], c),
                                       atol=1e-4, rtol=1e-4)
    # the gradient path gives the same numbers (training re-evaluates steps this way)
    grad = policy.continuation_logprobs(prompts, conts, owner)
    torch.testing.assert_close(grad.token_logprobs.detach(), enc.token_logprobs)


def test_shared_prefix_gives_same_results_as_plain_padding(tokenizer):
    policy = PolicyModel(make_tiny_lm(), tokenizer, precision='fp32')
    _randomise_adapter(policy)
    head = list(range(40, 70))
    prompts = [head + [5, 6], head + [7], head + [8, 9, 10, 11]]
    conts, owner = [[20, 21], [22], [23, 24, 25]], [0, 1, 2]
    with torch.no_grad():
        shared = policy.continuation_logprobs(prompts, conts, owner)
        policy.engine.parts.min_shared_prefix = 10**9
        plain = policy.continuation_logprobs(prompts, conts, owner)
    torch.testing.assert_close(shared.token_logprobs, plain.token_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.prompt_hidden, plain.prompt_hidden, atol=1e-5, rtol=1e-5)


def test_score_candidates_is_a_distribution_per_prompt(tokenizer, tiny_lm):
    policy = PolicyModel(tiny_lm, tokenizer, precision='fp32')
    logprobs, values = policy.score_candidates([[5, 6, 7], [8, 9]], [[[10], [11, 12], [13]], [[14], [15]]])
    assert [lp.shape[0] for lp in logprobs] == [3, 2]
    for lp in logprobs:
        torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0))
    assert values.shape == (2,)
    assert torch.all(values == 0)  # the value head starts at zero


def test_sum_and_mean_normalisation_differ_for_long_candidates(tokenizer, tiny_lm):
    policy = PolicyModel(tiny_lm, tokenizer, score_normalization="sum", precision='fp32')
    cands = [[[10], [11, 12, 13, 14, 15]]]
    with torch.no_grad():
        lp_sum, _ = policy.score_candidates([[5, 6]], cands)
        policy.score_normalization = "mean"
        lp_mean, _ = policy.score_candidates([[5, 6]], cands)
    # A five-token candidate has a much lower summed log-likelihood than its per-token mean.
    assert lp_sum[0][1] < lp_mean[0][1]


def test_generate_logprobs_match_rescoring_and_stop_at_stop_token(tokenizer, tiny_lm):
    policy = PolicyModel(tiny_lm, tokenizer, precision='fp32')
    _randomise_adapter(policy)
    prompts = [[5, 6, 7, 8], [9, 10]]
    g = torch.Generator().manual_seed(0)
    replies = policy.generate(prompts, max_new_tokens=6, generator=g)
    assert all(1 <= len(r.token_ids) <= 6 for r in replies)
    with torch.no_grad():
        for p, r in zip(prompts, replies):
            torch.testing.assert_close(_naive_logprobs(policy, p, r.token_ids), torch.tensor(r.token_logprobs),
                                       atol=1e-4, rtol=1e-4)
    # Greedy decoding is deterministic: declare each row's first greedy token a stop token.
    greedy = policy.generate(prompts, max_new_tokens=6, greedy=True)
    firsts = [r.token_ids[0] for r in greedy]
    stopped = policy.generate(prompts, max_new_tokens=6, greedy=True, stop_token_ids=firsts)
    assert [r.token_ids for r in stopped] == [[t] for t in firsts]
    assert [r.token_logprobs for r in stopped] == [r.token_logprobs[:1] for r in greedy]


def test_evaluate_matches_acting_logprobs(tokenizer, tiny_lm):
    policy = PolicyModel(tiny_lm, tokenizer, precision='fp32')
    _randomise_adapter(policy)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    cands = [[[20, 1], [21, 22, 1]], [[23, 1], [24, 1], [25, 1]]]
    with torch.no_grad():
        logprobs, values = policy.score_candidates(prompts, cands)
        reply = policy.generate([[3, 4]], max_new_tokens=4, generator=torch.Generator().manual_seed(1))[0]
        steps = [
            Step(prompt_ids=prompts[0], candidate_ids=cands[0], action_index=1),
            Step(prompt_ids=prompts[1], candidate_ids=cands[1], action_index=2),
            Step(prompt_ids=[3, 4], response_ids=reply.token_ids),
        ]
        ev = policy.evaluate_actions(steps)
    torch.testing.assert_close(ev.distributions[0], logprobs[0])
    torch.testing.assert_close(ev.distributions[1], logprobs[1])
    torch.testing.assert_close(ev.distributions[2], torch.tensor(reply.token_logprobs), atol=1e-4, rtol=1e-4)
    units, owner = ev.unit_logprobs()
    assert owner.tolist() == [0, 1] + [2] * len(reply.token_ids)
    torch.testing.assert_close(units[:2], torch.stack([logprobs[0][1], logprobs[1][2]]))
    torch.testing.assert_close(ev.values[:2], values)


def test_reference_is_the_base_model_with_adapter_disabled(tokenizer):
    lm = make_tiny_lm()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = lm(input_ids=ids).logits.clone()
    policy = PolicyModel(lm, tokenizer, precision='fp32')
    _randomise_adapter(policy)
    with torch.no_grad():
        adapted = policy.lm(input_ids=ids).logits
        with policy.reference():
            reference = policy.lm(input_ids=ids).logits
    assert not torch.allclose(adapted, base_logits)
    torch.testing.assert_close(reference, base_logits)
    # No second copy of the base model: all parameters are the base's plus the trainable ones.
    n_params = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in policy.trainable_parameters())
    assert n_params == sum(p.numel() for p in make_tiny_lm().parameters()) + n_trainable


def test_only_adapter_and_heads_are_trainable(tokenizer, tiny_lm):
    policy = PolicyModel(tiny_lm, tokenizer, precision='fp32')
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("heads.") for n in names)


def test_lora_on_the_top_layers_only_trains_those_layers(tokenizer):
    from rllama.policy.model import default_lora_config

    policy = PolicyModel(make_tiny_lm(), tokenizer, lora_config=default_lora_config(layers=[1]), precision="fp32")
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in policy.named_parameters() if "lora_" in n}
    assert adapted == {"1"}
    _randomise_adapter(policy)
    out = policy.continuation_logprobs([[5, 6, 7, 8]], [[9, 10]], [0])
    out.token_logprobs.sum().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="layers="):
        default_lora_config(layers=[])


def test_save_load_round_trip_gives_identical_outputs(tokenizer, tmp_path):
    policy = PolicyModel(make_tiny_lm(), tokenizer, precision='fp32')
    _randomise_adapter(policy, seed=3)
    policy.save(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    assert "heads.safetensors" in files and "adapter_model.safetensors" in files and "policy.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    json.loads((tmp_path / "ckpt" / "policy.json").read_text())

    other = PolicyModel(make_tiny_lm(), tokenizer, precision='fp32')
    prompts, cands = [[5, 6, 7]], [[[10, 1], [11, 12, 1]]]
    with torch.no_grad():
        before, vb = policy.score_candidates(prompts, cands)
        fresh, _ = other.score_candidates(prompts, cands)
        other.load(tmp_path / "ckpt")
        after, va = other.score_candidates(prompts, cands)
    assert not torch.allclose(before[0], fresh[0])
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    torch.testing.assert_close(va, vb, atol=0, rtol=0)


def test_save_overwrites_atomically(tokenizer, tmp_path):
    policy = PolicyModel(make_tiny_lm(), tokenizer, precision='fp32')
    policy.save(tmp_path / "ckpt")
    _randomise_adapter(policy, seed=5)
    policy.save(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no leftover temporary folders


def test_load_errors_name_the_problem(tokenizer, tmp_path):
    policy = PolicyModel(make_tiny_lm(), tokenizer, precision='fp32')
    with pytest.raises(ModelNotFoundError, match="not an rllama checkpoint"):
        policy.load(tmp_path)
    policy.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "heads.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="heads.safetensors is missing"):  # the manifest lists it
        policy.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").unlink()  # as a folder saved before manifests existed (format 1)
    meta = json.loads((tmp_path / "ckpt" / "policy.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "ckpt" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ModelNotFoundError, match="heads.safetensors is missing"), pytest.warns(UserWarning):
        policy.load(tmp_path / "ckpt")
    meta["hidden_size"] = 999
    (tmp_path / "ckpt" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(RLlamaError, match="hidden size 999"), pytest.warns(UserWarning):
        policy.load(tmp_path / "ckpt")


def test_bad_settings_are_rejected(tokenizer, tiny_lm):
    with pytest.raises(ValueError, match="precision"):
        PolicyModel(tiny_lm, tokenizer, precision="fp8")
    with pytest.raises(ValueError, match="score_normalization"):
        PolicyModel(tiny_lm, tokenizer, score_normalization="max")
    with pytest.raises(ValueError, match="temperature"):
        PolicyModel(tiny_lm, tokenizer, temperature=0)


def test_bf16_precision_runs_and_stays_close(tokenizer, tiny_lm):
    policy = PolicyModel(tiny_lm, tokenizer, precision='fp32')
    with torch.no_grad():
        fp32, _ = policy.score_candidates([[5, 6, 7]], [[[10, 1], [11, 1]]])
        policy.precision = "bf16"
        bf16, _ = policy.score_candidates([[5, 6, 7]], [[[10, 1], [11, 1]]])
    torch.testing.assert_close(bf16[0], fp32[0], atol=0.05, rtol=0.05)


def test_auto_precision_follows_the_hardware(monkeypatch):
    from rllama.policy import model as model_module
    from rllama.policy.model import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(model_module, "cpu_bf16_pays", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(model_module, "cpu_bf16_pays", lambda: False)  # native but slower (seen on a Xeon)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_mean_normalisation_keeps_a_one_word_action_at_full_strength(tokenizer, tiny_lm):
    """'mean' averages the text tokens only; the end-of-turn token is added, not averaged in."""
    policy = PolicyModel(tiny_lm, tokenizer, score_normalization="mean", precision="fp32")
    prompt, cands = [5, 6], [[10, 1], [11, 12, 13, 1]]
    with torch.no_grad():
        scores, _ = policy.score_candidates([prompt], [cands])
        full = [policy.continuation_logprobs([prompt], [c], [0]).token_logprobs[0, : len(c)] for c in cands]
    expected = torch.tensor([full[0].sum(), full[1][:3].mean() + full[1][3]])
    torch.testing.assert_close(scores[0], torch.log_softmax(expected, -1), atol=1e-5, rtol=0)
    assert candidate_score(full[1].tolist(), "mean") == pytest.approx(float(expected[1]), abs=1e-5)
    assert candidate_score(full[1].tolist(), "sum") == pytest.approx(float(full[1].sum()), abs=1e-5)
