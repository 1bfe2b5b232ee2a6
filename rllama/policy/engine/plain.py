"""The plain engine: every pass runs the whole model, nothing is kept between calls.

It is the reference: any other engine must return what this one returns (tested to 1e-5 through the
same interface), and it runs any causal LM transformers can run. Within one call it still shares what
it can: a prefix common to every prompt of a batch runs once, the continuations of one prompt are
packed into one row after that prompt's key/value cache, and prompts of very different lengths run in
groups of similar length.
"""

from __future__ import annotations

import torch

from rllama.policy.engine.base import Engine, PromptStates, cache_of
from rllama.policy.engine.batching import attention_mask, common_prefix_length, length_groups, segment_mask
from rllama.policy.outputs import Continuations, _merge_continuations


class PlainEngine(Engine):
    """Forward passes through the whole model (see the module's docstring).

    An engine that runs the same passes differently overrides the two passes over the model:
    :meth:`_prompt_pass` (left-padded prompts after a shared prefix) and :meth:`_packed_pass` (continuations
    packed after their prompts' key/value cache); batching, packing and projection stay as they are.

    Example:
        >>> engine = PlainEngine(ModelParts(body, lm_head, pad_id=0, device=torch.device("cpu")))  # doctest: +SKIP
        >>> out = engine.encode([prompt_ids], [stick_ids, hit_ids], owner=[0, 0])  # doctest: +SKIP
        >>> out.token_logprobs.shape  # [2 continuations, longest]  # doctest: +SKIP
    """

    def _encode(self, prompts, continuations, owner, temperature, entropy_rows, logprobs) -> Continuations:
        groups = length_groups([len(p) for p in prompts], common_prefix_length(prompts) if len(prompts) > 1 else 0)
        if len(groups) == 1:
            return self._encode_batch(prompts, continuations, owner, temperature, entropy_rows, logprobs)
        # Prompts of very different lengths run in groups of similar length: left padding costs
        # every block the padded positions, and one group per length wastes little.
        rows_of: list[list[int]] = [[] for _ in prompts]
        for r, b in enumerate(owner):
            rows_of[b].append(r)
        parts, order_b, order_r = [], [], []
        for g in groups:
            local = {b: i for i, b in enumerate(g)}
            rows = [r for b in g for r in rows_of[b]]
            parts.append(self._encode_batch(
                [prompts[b] for b in g], [continuations[r] for r in rows], [local[owner[r]] for r in rows],
                temperature, None if entropy_rows is None else [entropy_rows[r] for r in rows], logprobs))
            order_b += g
            order_r += rows
        return _merge_continuations(parts, order_b, order_r, self.parts.device)

    def _encode_batch(self, prompts, continuations, owner, temperature, entropy_rows, logprobs) -> Continuations:
        """:meth:`encode` of one batch of prompts, left-padded to the longest: the prompts run once, and
        continuation ``r`` then extends prompt ``owner[r]`` through its key/value cache."""
        Lc = max(len(c) for c in continuations)
        states = self.forward_prompts(prompts, use_cache=Lc > 1)
        owner_t = torch.as_tensor(list(owner), dtype=torch.long, device=self.parts.device)
        hidden = states.hidden[owner_t].unsqueeze(1)  # [R, 1, H]: predicts each continuation's first token
        if Lc > 1:
            rest = self._packed_continuations(prompts, continuations, list(owner), states, Lc)
            hidden = torch.cat([hidden, rest], dim=1)  # [R, Lc, H]
        return self.project(states.hidden, hidden, continuations, temperature, entropy_rows, logprobs)

    # ------------------------------------------------------------------ prompts
    def forward_prompts(self, prompts, use_cache: bool, every_block: bool = False) -> PromptStates:
        """Prompts usually share a long prefix (the system prompt, often the first turns): it runs once and
        its key/value cache is shared by every row; the rest runs left-padded."""
        p, B = self.parts, len(prompts)
        # Leave at least one token per row after the shared prefix.
        shared = min(common_prefix_length(prompts), min(len(x) for x in prompts) - 1) if B > 1 else 0
        if shared < p.min_shared_prefix:
            shared = 0
        return self._prompt_pass(prompts, shared, use_cache, every_block)

    def _prompt_pass(self, prompts, shared: int, use_cache: bool, every_block: bool) -> PromptStates:
        p, B = self.parts, len(prompts)
        cache = None
        if shared:
            prefix = torch.as_tensor([list(prompts[0][:shared])], dtype=torch.long, device=p.device)
            with p.autocast():
                cache = cache_of(p.body(input_ids=prefix, use_cache=True))
            cache.batch_repeat_interleave(B)
        L = max(len(x) for x in prompts) - shared
        ids = torch.full((B, L), p.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, x in enumerate(prompts):
            n = len(x) - shared
            ids[i, L - n :] = torch.as_tensor(x[shared:], dtype=torch.long)
            mask[i, L - n :] = 1
        ids, mask = ids.to(p.device), mask.to(p.device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([torch.ones((B, shared), dtype=torch.long, device=p.device), mask], dim=1)
        with p.autocast():
            out = p.body(input_ids=ids, attention_mask=mask, position_ids=positions, **p.cache_arg(cache),
                         use_cache=use_cache or bool(shared))
        return PromptStates(out.last_hidden_state[:, -1], cache_of(out), mask, mask.sum(-1))

    # ------------------------------------------------------------------ continuations
    def _packed_continuations(self, prompts, continuations, owner: list[int], states: PromptStates,
                              Lc: int) -> torch.Tensor:
        """Hidden states of every continuation token but the last, ``[R, Lc-1, H]`` (zeros past a row's end).

        All continuations of one prompt are packed into one row after that prompt's key/value cache,
        with a block mask: each token sees its prompt and the earlier tokens of its own continuation.
        The prompt's cache is never copied per continuation, so K candidates cost K short segments
        of one row, not K copies of the prompt (which, for long prompts with many candidates, is
        what memory is spent on).
        """
        p, pmask = self.parts, states.mask
        B = pmask.shape[0]
        segments: list[list[tuple[int, int]]] = [[] for _ in range(B)]  # per prompt: (row, start in packed row)
        lengths = [0] * B
        for r, (c, b) in enumerate(zip(continuations, owner)):
            segments[b].append((r, lengths[b]))
            lengths[b] += len(c) - 1
        Q = max(max(lengths), 1)
        ids = torch.full((B, Q), p.pad_id, dtype=torch.long)
        pos = torch.zeros((B, Q), dtype=torch.long)
        seg = torch.full((B, Q), -1, dtype=torch.long)  # which continuation a packed token belongs to
        for b in range(B):
            for r, start in segments[b]:
                n = len(continuations[r]) - 1
                if n:
                    ids[b, start : start + n] = torch.as_tensor(continuations[r][:-1], dtype=torch.long)
                    pos[b, start : start + n] = torch.arange(n)
                    seg[b, start : start + n] = r
        ids, seg = ids.to(p.device), seg.to(p.device)
        positions = states.lengths.unsqueeze(1) + pos.to(p.device)
        # [B, 1, Q, Kp + Q]: the prompt (where it is not padding), and causally within the same segment
        sees_prompt = pmask.bool()[:, None, :].expand(B, Q, pmask.shape[1])
        allowed = torch.cat([sees_prompt, segment_mask(seg)], dim=2)[:, None]
        packed = self._packed_pass(prompts, continuations, segments, ids, allowed, positions, states.cache)
        return _unpack(packed, continuations, segments, Lc)

    def _packed_pass(self, prompts, continuations, segments, ids, allowed, positions, cache) -> torch.Tensor:
        """The whole body over packed continuation tokens ``ids`` ``[B, Q]``; returns ``[B, Q, H]``."""
        p = self.parts
        mask = attention_mask(allowed, p.eager_attention, p.mask_dtype)
        with p.autocast():
            return p.body(input_ids=ids, attention_mask=mask, position_ids=positions, **p.cache_arg(cache),
                          use_cache=False).last_hidden_state


def _unpack(packed: torch.Tensor, continuations, segments, Lc: int) -> torch.Tensor:
    """One row per continuation ``[R, Lc-1, H]`` from the packed rows ``[B, Q, H]``."""
    device = packed.device
    rows, cols, src_b, src_q = [], [], [], []
    for b, segs in enumerate(segments):
        for r, start in segs:
            n = len(continuations[r]) - 1
            rows += [r] * n
            cols += list(range(n))
            src_b += [b] * n
            src_q += list(range(start, start + n))
    out = packed.new_zeros((len(continuations), Lc - 1, packed.shape[-1]))
    if rows:
        index = (torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
        out = out.index_put(index, packed[torch.as_tensor(src_b, device=device), torch.as_tensor(src_q, device=device)])
    return out
