"""The cached engine: the plain engine's passes with the frozen blocks' states, and a frozen adapter's, kept.

Train the top, remember the bottom. With LoRA only on the top blocks, the blocks below run once per
new token prefix (:class:`~rllama.policy.engine.split.SplitModel`, their states in a radix tree over
token ids, :class:`~rllama.policy.engine.radix.RadixCache`); a pass with gradients (an update) runs
only the adapted blocks over those states. A pass without gradients (acting, the reference, replayed
steps) also reads the adapted blocks' states from a second tree, kept per adapter signature, and the
outputs of pairs seen before from the memo (:class:`~rllama.policy.engine.memo.ContinuationMemo`)::

    tokens ─► frozen tree ─► boundary states ─► adapted blocks (with gradients) ─► hidden states ─► log-probs
                                             └► top tree per signature (without) ┘   memo per signature ┘

Its results equal the plain engine's to 1e-5 (what is cached decides how a pass is split, and so its
last bits); a tree too small to hold anything is still correct, only slower.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from rllama.errors import RLlamaError
from rllama.policy.engine.base import Engine, ModelParts, PromptStates
from rllama.policy.engine.batching import causal_mask
from rllama.policy.engine.memo import AdapterSignature, ContinuationMemo, serves
from rllama.policy.engine.plain import PlainEngine
from rllama.policy.engine.radix import RadixCache
from rllama.policy.engine.split import SplitModel, supports_split
from rllama.policy.outputs import Continuations, _merge_continuations

DEFAULT_CACHE_MB = 512
"""Default bound of the trees, in MiB (SmolLM2-135M with 8 adapted blocks: ≈ 36 KiB a token in fp32)."""

TOP_TREES = 2
"""Adapter states whose adapted blocks' states are kept at once (the policy's and the reference's)."""


class CachedEngine(PlainEngine):
    """The plain engine's passes over cached states (see the module's docstring).

    Args:
        parts: the model to run; its body must have the Llama family's structure (see :func:`supports_split`).
        max_bytes: the bound of the frozen blocks' tree; the adapted blocks' trees share a quarter of it more.
        adapters: the module whose LoRA weights the adapted blocks' states depend on (the whole PEFT model).

    With every block adapted there is nothing frozen to keep, and it runs as the plain engine (:attr:`active`
    is false) until an adapter layout with frozen blocks is loaded.
    """

    def __init__(self, parts: ModelParts, max_bytes: int, adapters: torch.nn.Module) -> None:
        super().__init__(parts)
        if not supports_split(parts.body):
            raise RLlamaError(f"the cached engine cannot locate the transformer blocks of {type(parts.body).__name__} "
                              "(expected embed_tokens, layers, norm and rotary_emb)")
        self.model = SplitModel(parts.body, parts.eager_attention, parts.mask_dtype)
        self.frozen = RadixCache(max_bytes)
        # The adapted blocks' states, one tree per adapter signature for the TOP_TREES most recent ones,
        # valid while those weights stay the same; together they hold at most a quarter of the bound.
        self.top_bytes = max_bytes // 4
        self._tops: OrderedDict[tuple, RadixCache] = OrderedDict()
        self.top = RadixCache(self.top_bytes)
        self.signature = AdapterSignature(adapters)
        self.memo = ContinuationMemo()

    @property
    def active(self) -> bool:
        """Whether some block is frozen (below every adapter), so that there is something to keep."""
        return self.model.split > 0

    def invalidate(self, adapters_only: bool = False) -> None:
        """Forget every kept state and output, and find the adapted blocks again; with ``adapters_only`` keep the
        frozen blocks' states unless the lowest adapted block moved (they depend on the base model alone)."""
        self.signature.reset()
        moved = self.model.refresh()
        if moved or not adapters_only:
            self.frozen.clear()
        self._tops.clear()
        self.top = RadixCache(self.top_bytes)
        self.memo.clear()

    def stats(self) -> dict:
        """The frozen tree's bytes, nodes, hit and miss tokens; the current adapter's tree's (``top``); the
        continuations remembered. ``{}`` while nothing is frozen."""
        if not self.active:
            return {}
        return {"frozen_blocks": self.model.split, **self.frozen.stats(), "top": self.top.stats(),
                "memo_continuations": len(self.memo)}

    @torch.no_grad()
    def matches_model(self) -> bool:
        """Whether the split forward reproduces the model's own, on a few tokens (float32, nothing kept)."""
        p = self.parts
        ids = [int(t) % p.lm_head.weight.shape[0] for t in (5, 17, 3, 11, 29, 7)]
        want = p.body(input_ids=torch.as_tensor([ids], device=p.device)).last_hidden_state[0]
        hidden = self.boundary([ids])[0][None]
        allowed = causal_mask(torch.ones((1, len(ids)), dtype=torch.long, device=p.device), len(ids))
        got = self.model.top(hidden, allowed, torch.arange(len(ids), device=p.device)[None])[0]
        self.frozen.clear()
        return bool(torch.allclose(got, want, atol=1e-4, rtol=1e-4))

    # ------------------------------------------------------------------ the trees
    def boundary(self, seqs, want_kv: bool = False):
        """Boundary states ``[len, H]`` of each token sequence (with ``want_kv``, ``(hidden, keys, values)``)."""
        return self.model.states(self.frozen, 0, self.model.split, seqs, want_kv)

    def top_states(self, seqs) -> list[torch.Tensor]:
        """The adapted blocks' outputs ``[len, H]`` (before the final norm) of each token sequence, from the top
        tree of the current signature (see :meth:`_use_signature`)."""
        return self.model.states(self.top, self.model.split, self.model.n_blocks, seqs, inputs=self.boundary)

    def _use_signature(self, signature: tuple) -> None:
        """Read and fill the top tree and memo of ``signature``: new, empty ones if that adapter state is not
        among the most recent (the oldest are dropped)."""
        tree = self._tops.get(signature)
        if tree is None:
            tree = self._tops[signature] = RadixCache(self.top_bytes)
            while len(self._tops) > TOP_TREES:
                self._tops.popitem(last=False)
            for other in self._tops.values():  # the quarter of the bound shared among them
                other.max_bytes = self.top_bytes // len(self._tops)
                other.evict()
        self._tops.move_to_end(signature)
        self.top = tree
        self.memo.use(signature)

    # ------------------------------------------------------------------ encode
    def _encode(self, prompts, continuations, owner, temperature, entropy_rows, logprobs) -> Continuations:
        if not self.active or torch.is_grad_enabled():  # the adapted blocks run (over boundary states)
            return super()._encode(prompts, continuations, owner, temperature, entropy_rows, logprobs)
        self._use_signature(self.signature())
        if entropy_rows is not None and any(entropy_rows):  # the memo holds no entropies
            return self._encode_top(prompts, continuations, owner, temperature, entropy_rows, logprobs)
        keys = self.memo.keys(prompts, continuations, owner, temperature)
        found = self.memo.lookup(keys)
        known = self.memo.assemble(found, continuations, owner, len(prompts), logprobs, self.parts.device)
        if known is None:
            known = self._remembered_apart(prompts, continuations, owner, temperature, logprobs, keys, found)
        if known is not None:
            return known
        return self._encode_top(prompts, continuations, owner, temperature, None, logprobs, keys, found)

    def _encode_top(self, prompts, continuations, owner, temperature, entropy_rows, logprobs, keys=None,
                    found=None) -> Continuations:
        """:meth:`encode` from the top tree; with ``keys``, the rows not ``found`` in the memo are remembered."""
        Lc = max(len(c) for c in continuations)
        prompt_hidden, hidden = self._hidden_from_top_tree(prompts, continuations, owner, Lc)
        known = [f[0] if f is not None else None for f in found] if found is not None and logprobs else None
        out = self.project(prompt_hidden, hidden, continuations, temperature, entropy_rows, logprobs, known)
        if keys is not None:
            missing = known if logprobs else found
            rows = [r for r, m in enumerate(missing) if m is None]
            self.memo.store(keys, rows, out.token_logprobs if logprobs else None, continuations, owner,
                            prompt_hidden, out.action_hidden)
        return out

    def _remembered_apart(self, prompts, continuations, owner, temperature, logprobs, keys, found):
        """A batch in which some prompts have every row remembered and others not: the first from the memo,
        only the others through the adapted blocks, merged in the batch's order (one new state among a
        replayed minibatch costs its own forward, not the minibatch's); ``None`` unless both kinds occur."""
        whole = [True] * len(prompts)
        for r, b in enumerate(owner):
            whole[b] = whole[b] and serves(found[r], logprobs)
        if all(whole) or not any(whole):
            return None
        parts, order_b, order_r = [], [], []
        for remembered in (True, False):
            group = [b for b in range(len(prompts)) if whole[b] == remembered]
            local = {b: i for i, b in enumerate(group)}
            rows = [r for r, b in enumerate(owner) if b in local]
            conts, own = [continuations[r] for r in rows], [local[owner[r]] for r in rows]
            if remembered:
                parts.append(self.memo.assemble([found[r] for r in rows], conts, own, len(group), logprobs,
                                                self.parts.device))
            else:
                parts.append(self._encode_top([prompts[b] for b in group], conts, own, temperature, None, logprobs,
                                              [keys[r] for r in rows], [found[r] for r in rows]))
            order_b += group
            order_r += rows
        return _merge_continuations(parts, order_b, order_r, self.parts.device)

    def _hidden_from_top_tree(self, prompts, continuations, owner, Lc: int):
        """``(prompt_hidden [B, H], hidden [R, Lc, H])`` from the top tree: each prompt's last state, then each
        continuation's states but its last token's."""
        p, norm = self.parts, self.parts.body.norm
        with p.autocast():
            states = self.top_states(prompts)  # [len_b, H] each, before the final norm
            prompt_hidden = norm(torch.stack([s[-1] for s in states]))  # [B, H]
        owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=p.device)
        hidden = prompt_hidden[owner_t].unsqueeze(1)  # [R, 1, H]
        if Lc == 1:
            return prompt_hidden, hidden
        R = len(continuations)
        rows = [r for r, c in enumerate(continuations) if len(c) > 1]
        rest = prompt_hidden.new_zeros((R, Lc - 1, prompt_hidden.shape[-1]))  # [R, Lc-1, H]
        if rows:
            seqs = [list(prompts[owner[r]]) + list(continuations[r][:-1]) for r in rows]
            with p.autocast():
                tails = self.top_states(seqs)
                parts = [t[len(t) - (len(continuations[r]) - 1) :] for r, t in zip(rows, tails)]
                normed = norm(torch.cat(parts))
            index_r = [r for r in rows for _ in range(len(continuations[r]) - 1)]
            index_c = [c for r in rows for c in range(len(continuations[r]) - 1)]
            rest = rest.index_put((torch.as_tensor(index_r, device=p.device),
                                   torch.as_tensor(index_c, device=p.device)), normed.to(rest.dtype))
        return prompt_hidden, torch.cat([hidden, rest], dim=1)

    # ------------------------------------------------------------------ the plain engine's passes, split
    def _prompt_pass(self, prompts, shared: int, use_cache: bool, every_block: bool) -> PromptStates:
        """The prompts' forward over boundary states from the frozen tree: only the adapted blocks run. With
        ``every_block`` the cache holds the frozen blocks' keys and values too (what generation extends)."""
        if not self.active:
            return super()._prompt_pass(prompts, shared, use_cache, every_block)
        from transformers import DynamicCache

        p, model, B = self.parts, self.model, len(prompts)
        with p.autocast():
            states = self.boundary(prompts, want_kv=every_block)
        hiddens = [s[0] for s in states] if every_block else states  # [len_b, H] each
        cache = DynamicCache()
        if shared:
            ones = torch.ones((1, shared), dtype=torch.long, device=p.device)
            with p.autocast():
                model.top(hiddens[0][None, :shared], causal_mask(ones, shared),
                          torch.arange(shared, device=p.device)[None], cache, True)
            cache.batch_repeat_interleave(B)
        L = max(len(x) for x in prompts) - shared
        x = hiddens[0].new_zeros((B, L, hiddens[0].shape[-1]))  # [B, L, H], left-padded
        mask = torch.zeros((B, L), dtype=torch.long, device=p.device)
        for i, h in enumerate(hiddens):
            n = len(h) - shared
            x[i, L - n :] = h[shared:]
            mask[i, L - n :] = 1
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([torch.ones((B, shared), dtype=torch.long, device=p.device), mask], dim=1)
        with p.autocast():
            last = model.top(x, causal_mask(mask, L), positions, cache, True)  # [B, L, H]
        if every_block:
            _frozen_kv_into(cache, states, model.split, shared, L)
        return PromptStates(last[:, -1], cache, mask, mask.sum(-1))

    def _packed_pass(self, prompts, continuations, segments, ids, allowed, positions, cache) -> torch.Tensor:
        """The adapted blocks over packed continuation tokens, their boundary states from the frozen tree."""
        if not self.active:
            return super()._packed_pass(prompts, continuations, segments, ids, allowed, positions, cache)
        p = self.parts
        rows = [(b, r, start) for b, segs in enumerate(segments) for r, start in segs if len(continuations[r]) > 1]
        seqs = [list(prompts[b]) + list(continuations[r][:-1]) for b, r, _ in rows]
        with p.autocast():
            states = self.boundary(seqs) if seqs else []
        x = torch.zeros((len(segments), ids.shape[1], p.body.config.hidden_size), device=p.device,
                        dtype=states[0].dtype if states else torch.float32)  # [B, Q, H]
        for (b, r, start), h in zip(rows, states):
            n = len(continuations[r]) - 1
            x[b, start : start + n] = h[-n:]
        with p.autocast():
            return self.model.top(x, allowed, positions, cache, False)


def _frozen_kv_into(cache, states, split: int, shared: int, L: int) -> None:
    """Put the frozen blocks' keys and values of ``states`` (``(hidden, keys, values)`` per prompt) into
    ``cache``'s first ``split`` layers, in the prompts' layout: ``[shared | left-padded rest of L]``."""
    keys, values = [s[1] for s in states], [s[2] for s in states]
    k0 = keys[0]
    shape = (split, len(states), k0.shape[1], shared + L, k0.shape[3])
    past_k, past_v = k0.new_zeros(shape), values[0].new_zeros(shape)
    for i, (k, v) in enumerate(zip(keys, values)):
        n = k.shape[2] - shared
        past_k[:, i, :, :shared], past_k[:, i, :, shared + L - n :] = k[:, :, :shared], k[:, :, shared:]
        past_v[:, i, :, :shared], past_v[:, i, :, shared + L - n :] = v[:, :, :shared], v[:, :, shared:]
    for layer in range(split):
        cache.update(past_k[layer], past_v[layer], layer)


def make_engine(parts: ModelParts, adapters: torch.nn.Module, prefix_cache: bool | str = "auto",
                prefix_cache_mb: float = DEFAULT_CACHE_MB) -> Engine:
    """The engine a policy runs on: the cached one where asked for (``"auto"``: where it can work) and where its
    split forward reproduces the model's own, else the plain one.

    ``prefix_cache=True`` makes a model the cached engine cannot serve an error saying why.
    """
    if prefix_cache is False or prefix_cache_mb == 0:
        return PlainEngine(parts)
    model = adapters.get_base_model() if hasattr(adapters, "get_base_model") else parts.body
    name = type(model).__name__
    if not supports_split(parts.body):
        if prefix_cache is True:
            raise RLlamaError(
                f"prefix_cache=True: cannot locate the transformer blocks of {name} (expected a body with "
                "embed_tokens, layers, norm and rotary_emb, as Llama, Qwen2 and Mistral have); pass "
                "prefix_cache=False to run without the cache")
        return PlainEngine(parts)
    engine = CachedEngine(parts, int(prefix_cache_mb * 2**20), adapters)
    if not engine.active:
        if prefix_cache is True:
            raise RLlamaError(
                "prefix_cache=True: every transformer block holds a LoRA adapter, so no block is frozen; "
                "adapt the top blocks only (default_lora_config(layers=range(22, 30))) or pass prefix_cache=False")
        return engine
    if not engine.matches_model():
        if prefix_cache is True:
            raise RLlamaError(f"prefix_cache=True: the split forward pass does not reproduce {name}'s own; pass "
                              "prefix_cache=False to run without the cache")
        warnings.warn(f"rllama: the frozen-prefix cache does not support {name}; running without it", stacklevel=3)
        return PlainEngine(parts)
    return engine
