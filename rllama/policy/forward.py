"""A policy's forward passes over prompts and continuations, through the frozen-prefix cache where it is on."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rllama.errors import RLlamaError
from rllama.policy.outputs import (
    Continuations,
    _merge_continuations,
)
from rllama.policy.prefix_cache import (
    holds_lora,
    length_groups,
)

SCORE_MEMO_ENTRIES = 100_000
"""Continuations whose outputs (token log-probabilities and features) are remembered per adapter state
(the policy's and the reference's, two at most; an untrained frozen adapter and the reference share one)."""
SCORE_MEMO_BYTES = 256 * 2**20
"""And at most about so many bytes of them per adapter state (the features are most of it, a prompt's shared by
its continuations: about 86,000 continuations of SmolLM2-135M, hidden size 576, four to a prompt)."""


def _serves(entry, logprobs: bool) -> bool:
    """Whether a memo entry (``None``: not remembered) holds what a pass wants: its features, and its
    token log-probs when ``logprobs``."""
    return entry is not None and not (logprobs and entry[0] is None)


def _cache_of(output):
    """The key/value cache of a model output (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token-id sequences."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class ForwardMixin:
    """The forward passes of a :class:`~rllama.policy.PolicyModel`: prompts (through the frozen-prefix cache
    where it is on) and the log-probabilities of continuations after them."""

    def _forward_prompts(self, prompts: Sequence[Sequence[int]], use_cache: bool, bottom_kv: bool = False):
        """Left-padded forward of the prompts. Returns (last hidden [B,H], cache, mask [B,L], lengths [B]).

        Prompts of one batch usually share a long prefix (the system prompt, often the first
        turns): it runs once and its key/value cache is shared by every row. With the prefix cache
        active, the returned cache holds the adapted blocks' keys and values, and, with
        ``bottom_kv``, the frozen blocks' too (what generation extends).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RLlamaError("every prompt must hold at least one token")
        B = len(prompts)
        # Leave at least one token per row after the shared prefix.
        shared = min(_common_prefix_length(prompts), min(len(p) for p in prompts) - 1) if B > 1 else 0
        if shared < self.min_shared_prefix:
            shared = 0
        if self.prefix_cache_active:
            return self._forward_prompts_split(prompts, shared, bottom_kv)
        cache = None
        if shared:
            prefix = torch.as_tensor([list(prompts[0][:shared])], dtype=torch.long, device=self.device)
            with self._autocast():
                cache = _cache_of(self._body()(input_ids=prefix, use_cache=True))
            cache.batch_repeat_interleave(B)
        L = max(len(p) for p in prompts) - shared
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            n = len(p) - shared
            ids[i, L - n :] = torch.as_tensor(p[shared:], dtype=torch.long)
            mask[i, L - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([torch.ones((B, shared), dtype=torch.long, device=self.device), mask], dim=1)
        with self._autocast():
            out = self._body()(
                input_ids=ids, attention_mask=mask, position_ids=positions, **self._cache_arg(cache),
                use_cache=use_cache or bool(shared),
            )
        lengths = mask.sum(-1)
        return out.last_hidden_state[:, -1], _cache_of(out), mask, lengths

    def _top_cache_usable(self) -> bool:
        """Whether this forward may read the adapted blocks' states from the top tree: no gradients wanted,
        and the adapters as they were when the tree was filled (else the tree is emptied first)."""
        if not self.prefix_cache_active or torch.is_grad_enabled():
            return False
        signature = self._adapter_signature()
        self._bottom.check_top(signature)
        memo = self._score_memos.get(signature)
        if memo is None:  # weights not seen (recently): the memos of older ones are dropped
            memo = self._score_memos[signature] = OrderedDict()
            while len(self._score_memos) > 2:
                self._score_memos.popitem(last=False)
        self._score_memos.move_to_end(signature)
        self._score_memo = memo
        return True

    def _adapter_signature(self) -> tuple:
        """What the adapted blocks compute with: the active and enabled adapters, and each LoRA weight's
        version counter and sum (the sum catches changes that bypass the counter, such as ``.data`` writes
        and fused optimizers). Adapters that add nothing (disabled, or every ``B`` weight of the active
        ones zero, as a fresh adapter is) compute the base model's function: they share one signature,
        so a frozen, untrained adapter and the reference reuse each other's states and scores."""
        probe, params, outputs = self._lora_probe
        if probe is None:
            return ()
        active = tuple(probe.active_adapters)
        adds_nothing = outputs is not None and not any(p.detach().any() for a in active for p in outputs.get(a, ()))
        if probe.disable_adapters or adds_nothing:
            return ("base model",)
        sums = torch.stack([p.detach().float().sum() for p in params]).tolist() if params else []
        return (active, tuple(p._version for p in params), tuple(sums))

    @property
    def _lora_probe(self):
        """One LoRA layer (it says which adapters are active and whether they are disabled), every LoRA
        weight, and each adapter's output (``B``) weights (``None`` for DoRA, where a zero ``B`` still
        rescales the weights); found again after the adapters change."""
        if self._probe is None:
            layer = next((m for m in self.lm.modules() if holds_lora(m)), None)
            named = [(n, p) for n, p in self.lm.named_parameters() if "lora_" in n]
            outputs: dict[str, list[nn.Parameter]] | None = {}
            for n, p in named:
                for marker in ("lora_B.", "lora_embedding_B."):
                    if marker in n:
                        outputs.setdefault(n.split(marker, 1)[1].split(".")[0], []).append(p)
            if any("lora_magnitude" in n for n, _ in named):
                outputs = None
            self._probe = (layer, [p for _, p in named], outputs)
        return self._probe

    def _hidden_from_top_tree(self, prompts, continuations, owner, Lc: int):
        """``(prompt_hidden [B, H], hidden [R, Lc, H])`` of :meth:`_continuation_logprobs` from the top tree."""
        bottom, norm = self._bottom, self._body().norm
        with self._autocast():
            states = bottom.top_states(prompts)  # [len_b, H] each, before the final norm
            prompt_hidden = norm(torch.stack([s[-1] for s in states]))  # [B, H]
        owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=self.device)
        hidden = prompt_hidden[owner_t].unsqueeze(1)  # [R, 1, H]
        if Lc == 1:
            return prompt_hidden, hidden
        R = len(continuations)
        rows = [r for r, c in enumerate(continuations) if len(c) > 1]
        rest = prompt_hidden.new_zeros((R, Lc - 1, prompt_hidden.shape[-1]))  # [R, Lc-1, H]
        if rows:
            seqs = [list(prompts[owner[r]]) + list(continuations[r][:-1]) for r in rows]
            with self._autocast():
                tails = bottom.top_states(seqs)
                parts = [t[len(t) - (len(continuations[r]) - 1) :] for r, t in zip(rows, tails)]
                normed = norm(torch.cat(parts))
            index_r = [r for r in rows for _ in range(len(continuations[r]) - 1)]
            index_c = [c for r in rows for c in range(len(continuations[r]) - 1)]
            rest = rest.index_put((torch.as_tensor(index_r, device=self.device),
                                   torch.as_tensor(index_c, device=self.device)), normed.to(rest.dtype))
        return prompt_hidden, torch.cat([hidden, rest], dim=1)

    def _forward_prompts_split(self, prompts, shared: int, bottom_kv: bool):
        """:meth:`_forward_prompts` over boundary states from the prefix cache: only the adapted blocks run."""
        from transformers import DynamicCache

        bottom, B = self._bottom, len(prompts)
        with self._autocast():
            states = bottom.boundary(prompts, want_kv=bottom_kv)
        hiddens = [s[0] for s in states] if bottom_kv else states  # [len_b, H] each
        cache = DynamicCache()
        if shared:
            ones = torch.ones((1, shared), dtype=torch.long, device=self.device)
            with self._autocast():
                bottom.top(hiddens[0][None, :shared], bottom.causal(ones, shared),
                           torch.arange(shared, device=self.device)[None], cache, True)
            cache.batch_repeat_interleave(B)
        L = max(len(p) for p in prompts) - shared
        x = hiddens[0].new_zeros((B, L, hiddens[0].shape[-1]))  # [B, L, H], left-padded
        mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        for i, h in enumerate(hiddens):
            n = len(h) - shared
            x[i, L - n :] = h[shared:]
            mask[i, L - n :] = 1
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([torch.ones((B, shared), dtype=torch.long, device=self.device), mask], dim=1)
        with self._autocast():
            last = bottom.top(x, bottom.causal(mask, L), positions, cache, True)  # [B, L, H]
        if bottom_kv:  # the frozen blocks' keys and values in the same layout: [shared | left-padded rest]
            keys, values = [s[1] for s in states], [s[2] for s in states]
            k0 = keys[0]
            shape = (bottom.split, B, k0.shape[1], shared + L, k0.shape[3])
            past_k, past_v = k0.new_zeros(shape), values[0].new_zeros(shape)
            for i, (k, v) in enumerate(zip(keys, values)):
                n = k.shape[2] - shared
                past_k[:, i, :, :shared], past_k[:, i, :, shared + L - n :] = k[:, :, :shared], k[:, :, shared:]
                past_v[:, i, :, :shared], past_v[:, i, :, shared + L - n :] = v[:, :, :shared], v[:, :, shared:]
            for layer in range(bottom.split):
                cache.update(past_k[layer], past_v[layer], layer)
        return last[:, -1], cache, mask, mask.sum(-1)

    def continuation_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        owner: Sequence[int],
        entropy_rows: Sequence[bool] | None = None,
        logprobs: bool = True,
    ) -> Continuations:
        """Log-probability of each token of each continuation given its prompt, in two passes.

        The prompts run once (left-padded); continuation ``r`` then extends prompt ``owner[r]``
        through the shared key/value cache, so K candidates of one prompt cost K short rows rather
        than K copies of the prompt.

        Args:
            prompts: ``B`` token-id lists.
            continuations: ``R`` non-empty token-id lists.
            owner: ``R`` prompt indices.
            entropy_rows: rows whose next-token entropies are wanted (``None``: none).
            logprobs: ``False`` skips the projection to the vocabulary (the log-probs are then zeros):
                for callers that want only the hidden states, such as Q heads.
        """
        if len(continuations) != len(owner):
            raise ValueError(f"{len(continuations)} continuations but {len(owner)} owners")
        if any(len(c) == 0 for c in continuations):
            raise RLlamaError("every continuation must hold at least one token")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RLlamaError("every prompt must hold at least one token")
        if self._top_cache_usable():
            return self._continuation_logprobs(prompts, continuations, owner, entropy_rows, top_cached=True,
                                               logprobs=logprobs)
        groups = length_groups([len(p) for p in prompts], _common_prefix_length(prompts) if len(prompts) > 1 else 0)
        if len(groups) == 1:
            return self._continuation_logprobs(prompts, continuations, owner, entropy_rows, logprobs=logprobs)
        # Prompts of very different lengths run in groups of similar length: left padding costs
        # every adapted block the padded positions, and one group per length wastes little.
        rows_of: list[list[int]] = [[] for _ in prompts]
        for r, b in enumerate(owner):
            rows_of[b].append(r)
        parts, order_b, order_r = [], [], []
        for g in groups:
            local = {b: i for i, b in enumerate(g)}
            rows = [r for b in g for r in rows_of[b]]
            parts.append(self._continuation_logprobs(
                [prompts[b] for b in g], [continuations[r] for r in rows], [local[owner[r]] for r in rows],
                None if entropy_rows is None else [entropy_rows[r] for r in rows], logprobs=logprobs))
            order_b += g
            order_r += rows
        return _merge_continuations(parts, order_b, order_r, self.device)

    def _memo_lookup(self, keys) -> list:
        """Each key's memo entry (``None`` when not remembered), marked as recently used."""
        found = []
        for key in keys:
            entry = self._score_memo.get(key)
            if entry is not None:
                self._score_memo.move_to_end(key)
            found.append(entry)
        return found

    def _memo_outputs(self, found, continuations, owner, n_prompts: int, Lc: int, logprobs: bool):
        """The :class:`Continuations` of a batch whose every row was ``found`` in the memo (a frozen adapter's
        outputs for a (prompt, continuation) seen before: its token log-probs, its features and its
        prompt's), with no forward at all; ``None`` when some row or prompt is missing."""
        if not all(_serves(f, logprobs) for f in found) or len(set(owner)) < n_prompts:
            return None
        R = len(found)
        first = {}
        for r, b in enumerate(owner):
            first.setdefault(b, r)
        prompt_hidden = torch.stack([found[first[b]][2] for b in range(n_prompts)])
        action_hidden = torch.stack([f[1] for f in found])
        cmask = torch.zeros((R, Lc), dtype=torch.long, device=self.device)
        token_logprobs = torch.zeros((R, Lc), dtype=torch.float32, device=self.device)
        for r, (c, f) in enumerate(zip(continuations, found)):
            cmask[r, : len(c)] = 1
            if logprobs:
                token_logprobs[r, : len(c)] = f[0]
        return Continuations(prompt_hidden, token_logprobs, cmask, None, action_hidden)

    def _remembered_apart(self, prompts, continuations, owner, found, logprobs: bool):
        """A batch in which some prompts have every row remembered and others not: the first from the memo,
        only the others through the adapted blocks, merged in the batch's order (one new state among a
        replayed minibatch costs its own forward, not the minibatch's); ``None`` unless both kinds occur."""
        whole = [True] * len(prompts)
        for r, b in enumerate(owner):
            whole[b] = whole[b] and _serves(found[r], logprobs)
        if all(whole) or not any(whole):
            return None
        parts, order_b, order_r = [], [], []
        for remembered in (True, False):
            group = [b for b in range(len(prompts)) if whole[b] == remembered]
            local = {b: i for i, b in enumerate(group)}
            rows = [r for r, b in enumerate(owner) if b in local]
            args = [continuations[r] for r in rows], [local[owner[r]] for r in rows]
            if remembered:  # already looked up: assembled from the memo as found
                Lc = max(len(c) for c in args[0])
                parts.append(self._memo_outputs([found[r] for r in rows], *args, len(group), Lc, logprobs))
            else:
                parts.append(self._continuation_logprobs([prompts[b] for b in group], *args, None, top_cached=True,
                                                         logprobs=logprobs))
            order_b += group
            order_r += rows
        return _merge_continuations(parts, order_b, order_r, self.device)

    def _memo_store(self, keys, rows, token_logprobs, continuations, owner, prompt_hidden, action_hidden) -> None:
        """Remember ``rows`` of a batch computed through the top tree: each one's token log-probs (``None``
        when they were not computed), its features and its prompt's; the least recently used are forgotten
        beyond the memo's bound."""
        if not rows:
            return
        prompt_rows = {b: prompt_hidden[b].clone() for b in {owner[r] for r in rows}}  # shared by its rows
        for r in rows:
            logp = None if token_logprobs is None else token_logprobs[r, : len(continuations[r])].clone()
            self._score_memo[keys[r]] = (logp, action_hidden[r].clone(), prompt_rows[owner[r]])
        # An entry holds its features, its token log-probs and its share of its prompt's features.
        features = action_hidden.shape[-1] * action_hidden.element_size()
        Lc = max(len(c) for c in continuations)
        entry_bytes = features * (1 + len(prompt_rows) / len(rows)) + 4 * Lc + 200
        while len(self._score_memo) > min(SCORE_MEMO_ENTRIES, int(SCORE_MEMO_BYTES // entry_bytes)):
            self._score_memo.popitem(last=False)

    def _continuation_logprobs(self, prompts, continuations, owner, entropy_rows, top_cached=False,
                               logprobs=True) -> Continuations:
        """:meth:`continuation_logprobs` of one batch of prompts (left-padded to the longest), or, with
        ``top_cached``, of hidden states from the prefix cache's top tree."""
        R, Lc = len(continuations), max(len(c) for c in continuations)
        owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=self.device)
        want_entropy = entropy_rows is not None and any(entropy_rows)
        # From the top tree (a frozen adapter), rows seen before take their outputs from the memo.
        keys = self._score_keys(prompts, continuations, owner) if top_cached and not want_entropy else None
        found = self._memo_lookup(keys) if keys is not None else None
        if found is not None:
            known = self._memo_outputs(found, continuations, owner, len(prompts), Lc, logprobs)
            if known is None:
                known = self._remembered_apart(prompts, continuations, owner, found, logprobs)
            if known is not None:
                return known
        if top_cached:
            prompt_hidden, hidden = self._hidden_from_top_tree(prompts, continuations, owner, Lc)
        else:
            prompt_hidden, cache, pmask, plen = self._forward_prompts(prompts, use_cache=Lc > 1)
            hidden = prompt_hidden[owner_t].unsqueeze(1)  # [R, 1, H]: predicts each continuation's first token
            if Lc > 1:
                rest = self._packed_continuations(prompts, continuations, list(owner), cache, pmask, plen, Lc)
                hidden = torch.cat([hidden, rest], dim=1)  # [R, Lc, H]
        cont = torch.full((R, Lc), self.pad_id, dtype=torch.long)
        cmask = torch.zeros((R, Lc), dtype=torch.long)
        for r, c in enumerate(continuations):
            cont[r, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            cmask[r, : len(c)] = 1
        cont, cmask = cont.to(self.device), cmask.to(self.device)

        # The state after reading a continuation's text: the position that predicts its last token
        # (the end-of-turn token for candidates), so the text itself is seen in full.
        last = cmask.sum(-1) - 1
        action_hidden = hidden[torch.arange(R, device=self.device), last]
        token_logprobs = torch.zeros((R, Lc), dtype=torch.float32, device=self.device)
        if not logprobs:
            if keys is not None:  # features only (score_normalization="none"): remembered without log-probs
                self._memo_store(keys, [r for r in range(R) if found[r] is None], None, continuations, owner,
                                 prompt_hidden, action_hidden)
            return Continuations(prompt_hidden, token_logprobs, cmask, None, action_hidden)
        todo = torch.ones(R, dtype=torch.bool)
        if found is not None:
            for r, known in enumerate(found):
                if known is not None and known[0] is not None:
                    token_logprobs[r, : len(known[0])] = known[0]
                    todo[r] = False
        # Project only the real positions to the vocabulary: the lm head is a fifth of the model.
        rows, cols = (cmask * todo.to(cmask.device)[:, None]).nonzero(as_tuple=True)
        with self._autocast():
            logits = self._lm_head()(hidden[rows, cols])  # [N, V]
        logp = F.log_softmax(logits.float() / self.temperature, dim=-1)
        token_logprobs = token_logprobs.index_put((rows, cols), logp.gather(-1, cont[rows, cols, None]).squeeze(-1))
        if keys is not None:
            self._memo_store(keys, todo.nonzero().flatten().tolist(), token_logprobs, continuations, owner,
                             prompt_hidden, action_hidden)
        entropy = None
        if want_entropy:
            want = torch.as_tensor(list(entropy_rows), dtype=torch.bool, device=self.device)[rows]
            ent = torch.zeros((R, Lc), dtype=torch.float32, device=self.device)
            lp = logp[want]
            entropy = ent.index_put((rows[want], cols[want]), -(lp.exp() * lp).sum(-1))
        return Continuations(prompt_hidden, token_logprobs, cmask, entropy, action_hidden)
