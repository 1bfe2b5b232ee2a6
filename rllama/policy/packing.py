"""Packing continuations that share a cached prompt into one row of a forward pass."""

from __future__ import annotations

import torch

from rllama.policy.prefix_cache import (
    attention_mask,
    segment_mask,
)


class PackingMixin:
    """Continuations that share a cached prompt, packed into one row of a :class:`~rllama.policy.PolicyModel`'s
    forward pass (each attends to the prompt and to itself only)."""

    def _packed_continuations(self, prompts, continuations, owner: list[int], cache, pmask, plen,
                              Lc: int) -> torch.Tensor:
        """Hidden states of every continuation token but the last, ``[R, Lc-1, H]`` (zeros past a row's end).

        All continuations of one prompt are packed into one row after that prompt's key/value cache,
        with a block mask: each token sees its prompt and the earlier tokens of its own continuation.
        The prompt's cache is never copied per continuation, so K candidates cost K short segments
        of one row, not K copies of the prompt (which, for long prompts with many candidates, is
        what memory is spent on).
        """
        B = pmask.shape[0]
        segments: list[list[tuple[int, int]]] = [[] for _ in range(B)]  # per prompt: (row, start in packed row)
        lengths = [0] * B
        for r, (c, b) in enumerate(zip(continuations, owner)):
            segments[b].append((r, lengths[b]))
            lengths[b] += len(c) - 1
        Q = max(max(lengths), 1)
        ids = torch.full((B, Q), self.pad_id, dtype=torch.long)
        pos = torch.zeros((B, Q), dtype=torch.long)
        seg = torch.full((B, Q), -1, dtype=torch.long)  # which continuation a packed token belongs to
        for b in range(B):
            for r, start in segments[b]:
                n = len(continuations[r]) - 1
                if n:
                    ids[b, start : start + n] = torch.as_tensor(continuations[r][:-1], dtype=torch.long)
                    pos[b, start : start + n] = torch.arange(n)
                    seg[b, start : start + n] = r
        ids, seg = ids.to(self.device), seg.to(self.device)
        positions = plen.unsqueeze(1) + pos.to(self.device)
        # [B, 1, Q, Kp + Q]: the prompt (where it is not padding), and causally within the same segment
        sees_prompt = pmask.bool()[:, None, :].expand(B, Q, pmask.shape[1])
        allowed = torch.cat([sees_prompt, segment_mask(seg)], dim=2)[:, None]
        if self.prefix_cache_active:
            packed = self._packed_top(prompts, continuations, segments, allowed, positions, cache, Q)
        else:
            packed = self._packed_body(ids, allowed, positions, cache)
        return self._unpack(packed, continuations, segments, Lc)

    def _packed_body(self, ids, allowed, positions, cache) -> torch.Tensor:
        """The whole body over packed continuation tokens ``ids`` ``[B, Q]``; returns ``[B, Q, H]``."""
        mask = attention_mask(allowed, self._eager_attention(), self._mask_dtype())
        with self._autocast():
            packed = self._body()(
                input_ids=ids, attention_mask=mask, position_ids=positions, **self._cache_arg(cache), use_cache=False,
            ).last_hidden_state  # [B, Q, H]
        return packed

    def _packed_top(self, prompts, continuations, segments, allowed, positions, cache, Q: int) -> torch.Tensor:
        """The adapted blocks over packed continuation tokens, their boundary states from the prefix cache."""
        rows = [(b, r, start) for b, segs in enumerate(segments) for r, start in segs if len(continuations[r]) > 1]
        seqs = [list(prompts[b]) + list(continuations[r][:-1]) for b, r, _ in rows]
        with self._autocast():
            states = self._bottom.boundary(seqs) if seqs else []
        x = torch.zeros((len(segments), Q, self.hidden_size), device=self.device,
                        dtype=states[0].dtype if states else torch.float32)  # [B, Q, H]
        for (b, r, start), h in zip(rows, states):
            n = len(continuations[r]) - 1
            x[b, start : start + n] = h[-n:]
        with self._autocast():
            return self._bottom.top(x, allowed, positions, cache, False)

    def _unpack(self, packed, continuations, segments, Lc: int) -> torch.Tensor:
        """One row per continuation ``[R, Lc-1, H]`` from the packed rows ``[B, Q, H]``."""
        B = packed.shape[0]
        R = len(continuations)
        rows, cols, src_b, src_q = [], [], [], []
        for b in range(B):
            for r, start in segments[b]:
                n = len(continuations[r]) - 1
                rows += [r] * n
                cols += list(range(n))
                src_b += [b] * n
                src_q += list(range(start, start + n))
        out = packed.new_zeros((R, Lc - 1, packed.shape[-1]))
        if rows:
            index = (torch.as_tensor(rows, device=self.device), torch.as_tensor(cols, device=self.device))
            out = out.index_put(index, packed[torch.as_tensor(src_b, device=self.device),
                                              torch.as_tensor(src_q, device=self.device)])
        return out
