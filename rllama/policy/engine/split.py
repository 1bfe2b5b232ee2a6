"""A Llama-family body split at its lowest adapted block, each half run over states kept in radix trees.

With LoRA only on the top transformer blocks, every block below the lowest adapted one is frozen:
its output for a token is a pure function of the token prefix. :class:`SplitModel` runs the body in
two halves. The *bottom* (embeddings and the frozen blocks) runs only for tokens whose prefix is not in
its tree; the tree keeps, per token, the frozen blocks' key/value states (to extend a prefix) and the
hidden state that enters the lowest adapted block (the *boundary* state). The *top* (the adapted blocks
and the final norm) runs on boundary states::

    tokens ──► [ embeddings + frozen blocks 0 … k-1 ] ──► boundary states ──► [ adapted blocks k … n-1 ] ──► heads
                        ▲ run once per new prefix               │ kept in a radix tree over token ids
                        └──────────── key/value states ◄────────┘

The same machinery runs the adapted blocks over boundary states into a second tree while their
weights stay the same (see :class:`~rllama.policy.engine.CachedEngine`). The model knows nothing of
which trees it fills: the engine passes them in.

Supported: decoder-only models whose body holds ``embed_tokens``, ``layers``, ``norm`` and
``rotary_emb`` (Llama, SmolLM, Qwen2, Mistral and their kin); the engine checks the split against the
model's own forward pass once, on a few tokens, before it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rllama.policy.engine.batching import attention_mask, length_groups, segment_mask
from rllama.policy.engine.radix import RadixCache, kv_prefix


def supports_split(body) -> bool:
    """Whether the model body has the structure the split forward runs (embeddings, blocks, norm, rotary)."""
    return all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


def holds_lora(module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer with at least one adapter (linear or embedding)."""
    return any(len(getattr(module, name, ())) for name in ("lora_A", "lora_embedding_A"))


def lora_block_indices(body) -> list[int]:
    """Indices of the blocks of ``body.layers`` holding a LoRA module of any adapter."""
    return [i for i, block in enumerate(body.layers) if any(holds_lora(m) for m in block.modules())]


def frozen_blocks(body) -> int:
    """How many blocks from the bottom hold no adapter (0 when the embeddings hold one)."""
    if any(holds_lora(m) for m in body.embed_tokens.modules()):
        return 0
    adapted = lora_block_indices(body)
    return min(adapted) if adapted else len(body.layers)


class SplitModel:
    """The forward pass of a Llama-family body as block ranges over cached states.

    Args:
        body: the transformers base model (``LlamaModel`` and kin) inside the PEFT wrapper.
        eager: whether attention takes additive float masks (``"eager"``) rather than boolean ones.
        mask_dtype: the dtype of additive masks.
    """

    def __init__(self, body, eager: bool = False, mask_dtype: torch.dtype = torch.float32) -> None:
        self.body = body
        self.eager = eager
        self.mask_dtype = mask_dtype
        self.split = frozen_blocks(body)

    def refresh(self) -> bool:
        """Find the lowest adapted block again; whether it moved."""
        split, self.split = self.split, frozen_blocks(self.body)
        return split != self.split

    @property
    def n_blocks(self) -> int:
        return len(self.body.layers)

    def run_blocks(self, hidden, blocks, allowed, positions, cache, use_cache: bool):
        """Run ``blocks`` over ``hidden`` ``[B, Q, H]`` with the boolean mask ``allowed`` ``[B, 1, Q, K]``."""
        mask = attention_mask(allowed, self.eager, self.mask_dtype)
        rotary = self.body.rotary_emb(hidden, position_ids=positions)
        for block in blocks:
            hidden = block(hidden, attention_mask=mask, position_ids=positions, cache=cache, use_cache=use_cache,
                           position_embeddings=rotary)
        return hidden

    def top(self, hidden, allowed, positions, cache=None, use_cache: bool = False):
        """The adapted blocks and the final norm over boundary states ``[B, Q, H]``; returns the last hidden states."""
        blocks = self.body.layers[self.split :]
        return self.body.norm(self.run_blocks(hidden, blocks, allowed, positions, cache, use_cache))

    @torch.no_grad()
    def states(self, tree: RadixCache, lo: int, hi: int, seqs, want_kv: bool = False,
               inputs: Callable | None = None):
        """What ``blocks[lo:hi]`` output for each token of ``seqs`` (and their keys and values), from ``tree``;
        the tokens after each sequence's longest cached prefix run through the blocks and are stored.

        Args:
            inputs: the input states of the blocks ``lo:hi`` for token sequences (a list of ``[len, H]``); the
                token embeddings when ``None`` (``lo == 0``).

        Returns:
            a list of ``[len_i, H]`` tensors, or with ``want_kv`` a list of ``(hidden, keys, values)`` with
            ``keys``/``values`` ``[layers, kv_heads, len_i, head_dim]``.
        """
        # Read the cached parts first: inserting this batch's new states may split or evict the
        # nodes they come from (the views taken here stay valid: nodes are re-made, never written).
        cached = []
        for s in seqs:
            pieces = tree.match(s)
            usable = pieces
            if sum(p.n for p in pieces) < len(s) or want_kv:
                # Extending (or returning keys and values): only the part that holds them counts.
                usable = kv_prefix(pieces)
            m = sum(p.n for p in usable)
            tree.hit_tokens += m
            tree.miss_tokens += len(s) - m
            with_kv = m < len(s) or want_kv
            cached.append(_Cached(m, [p.node.hidden[: p.n] for p in usable],
                                  [p.node.keys[:, :, : p.n] for p in usable] if with_kv else [],
                                  [p.node.values[:, :, : p.n] for p in usable] if with_kv else []))
        # A sequence met twice in one batch runs once: runs[i] is the row whose extension row i takes.
        runs: dict[int, int] = {}
        first: dict[tuple, int] = {}
        for i, (s, c) in enumerate(zip(seqs, cached)):
            if c.n < len(s):
                runs[i] = first.setdefault(tuple(s), i)
        units_list = _packing_units(seqs, cached, list(first.values()))
        fresh = {}
        if units_list:  # packed rows with similar numbers of new tokens run together (little left padding)
            sizes = [sum(len(seqs[i]) - cached[i].n for i in unit) for unit in units_list]
            for group in length_groups(sizes, 0):
                batch = [units_list[g] for g in group]
                rows = [i for unit in batch for i in unit]
                fresh.update(zip(rows, self._extend(tree, lo, hi, seqs, cached, batch, inputs)))
        out = []
        for i, c in enumerate(cached):
            hs, ks, vs = list(c.hidden), list(c.keys), list(c.values)
            if i in runs:
                h, k, v = fresh[runs[i]]
                hs.append(h)
                ks.append(k)
                vs.append(v)
            hidden = _cat(hs, 0)
            out.append((hidden, _cat(ks, 2), _cat(vs, 2)) if want_kv else hidden)
        return out

    def _extend(self, tree: RadixCache, lo: int, hi: int, seqs, cached, units: list[list[int]], inputs=None):
        """``blocks[lo:hi]`` over the uncached tails of ``seqs``, batched; stores and returns ``(hidden, keys, values)``
        of each row of ``units``, in that order.

        A unit is a list of rows sharing one cached prefix: their tails are packed into one row after
        the prefix's keys and values, with a block mask (each token sees the prefix and the earlier
        tokens of its own tail). The inputs of a tail are the token embeddings (``inputs`` ``None``) or
        the states ``inputs`` gives (the boundary states).
        """
        from transformers import DynamicCache

        body = self.body
        device = body.embed_tokens.weight.device
        U = len(units)
        starts = [cached[unit[0]].n for unit in units]  # the shared prefix's length
        news = [[len(seqs[i]) - m for i in unit] for unit, m in zip(units, starts)]
        M, N = max(starts), max(sum(n) for n in news)
        # Each packed row: its cached prefix right-aligned in M key columns, then its tails right-aligned in N.
        ids = torch.zeros((U, N), dtype=torch.long)
        pos = torch.zeros((U, N), dtype=torch.long)
        seg = torch.full((U, N), -1, dtype=torch.long)  # which row a packed token belongs to (-1: padding)
        prefix = torch.zeros((U, M), dtype=torch.bool)
        where = []  # (unit, first column) of each row's tail
        for u, (unit, m, ns) in enumerate(zip(units, starts, news)):
            col = N - sum(ns)
            prefix[u, M - m :] = True
            for i, n in zip(unit, ns):
                ids[u, col : col + n] = torch.as_tensor(list(seqs[i][m:]), dtype=torch.long)
                pos[u, col : col + n] = torch.arange(m, m + n)
                seg[u, col : col + n] = i
                where.append((u, col, n))
                col += n
        ids, pos, seg, prefix = ids.to(device), pos.to(device), seg.to(device), prefix.to(device)
        rows = [i for unit in units for i in unit]
        if inputs is None:
            x = body.embed_tokens(ids)
        else:  # the boundary states of the new tokens
            bounds = inputs([seqs[i] for i in rows])
            x = bounds[0].new_zeros((U, N, bounds[0].shape[-1]))
            for (u, col, n), b in zip(where, bounds):
                x[u, col : col + n] = b[len(b) - n :]
        cache = DynamicCache()
        if M:
            ref = next(k for unit in units for k in cached[unit[0]].keys)
            past_k = ref.new_zeros((hi - lo, U, ref.shape[1], M, ref.shape[3]))  # [layers, U, kv, M, d]
            past_v = torch.zeros_like(past_k)
            for u, (unit, m) in enumerate(zip(units, starts)):
                if m:
                    past_k[:, u, :, M - m :] = _cat(cached[unit[0]].keys, 2)
                    past_v[:, u, :, M - m :] = _cat(cached[unit[0]].values, 2)
            for j in range(hi - lo):
                cache.update(past_k[j], past_v[j], lo + j)
        allowed = torch.cat([prefix[:, None, :].expand(U, N, M), segment_mask(seg)], dim=2)[:, None]  # [U, 1, N, M+N]
        hidden = self.run_blocks(x, body.layers[lo:hi], allowed, pos, cache, True)
        # [U, layers, kv, N, d]: the tails' keys and values (the prefix's are in the tree already)
        keys = torch.stack([cache.layers[lo + j].keys[:, :, M:] for j in range(hi - lo)], dim=1)
        values = torch.stack([cache.layers[lo + j].values[:, :, M:] for j in range(hi - lo)], dim=1)
        out = []
        for i, (u, col, n) in zip(rows, where):
            h, k, v = hidden[u, col : col + n], keys[u, :, :, col : col + n], values[u, :, :, col : col + n]
            tree.insert(seqs[i], cached[i].n, k, v, h)
            out.append((h, k, v))
        return out


def _packing_units(seqs, cached, rows: list[int], min_tokens: int = 64) -> list[list[int]]:
    """``rows`` in packing units: rows sharing one cached prefix, at most ``max(prefix, min_tokens)`` new tokens a
    unit (a packed row's attention then costs at most about twice what separate rows would; separate rows
    would each assemble the prefix's keys and values)."""
    by_prefix: dict[tuple, list[int]] = {}
    for i in rows:
        by_prefix.setdefault(tuple(seqs[i][: cached[i].n]), []).append(i)
    units = []
    for members in by_prefix.values():
        cap = max(cached[members[0]].n, min_tokens)
        unit, size = [], 0
        for i in members:
            n = len(seqs[i]) - cached[i].n
            if unit and size + n > cap:
                units.append(unit)
                unit, size = [], 0
            unit.append(i)
            size += n
        units.append(unit)
    return units


@dataclass
class _Cached:
    """The cached part of one sequence: its length and the pieces' per-token states."""

    n: int
    hidden: list
    keys: list
    values: list


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
