"""Train the top, remember the bottom: the frozen blocks' states of every token prefix seen, cached.

With LoRA only on the top transformer blocks, every block below the lowest adapted one is frozen:
its output for a token is a pure function of the token prefix. :class:`FrozenBottom` splits the
model's forward pass there. The *bottom* (embeddings and the frozen blocks) runs only for tokens
whose prefix it has not seen; a :class:`RadixCache` keeps, per token, the bottom blocks' key/value
states (to extend a prefix) and the hidden state that enters the lowest trainable block (the
*boundary* state). The *top* (the adapted blocks and the final norm) runs on boundary states, in
acting, in every update epoch and in the reference pass alike::

    tokens ──► [ embeddings + frozen blocks 0 … k-1 ] ──► boundary states ──► [ adapted blocks k … n-1 ] ──► heads
                        ▲ run once per new prefix               │ cached (radix tree over token ids)
                        └──────────── key/value states ◄────────┘

The tree is bounded in bytes and evicts the least recently used leaves first; an entry that was
evicted is simply recomputed, so a cache too small to hold anything is still correct, only slower.
It never goes stale while the base model and the set of adapted blocks stay the same;
:meth:`FrozenBottom.refresh` (called whenever adapters are added, loaded or deleted) clears it when
the frozen part changes.

Supported: decoder-only models whose body holds ``embed_tokens``, ``layers``, ``norm`` and
``rotary_emb`` (Llama, SmolLM, Qwen2, Mistral and their kin); the split is checked against the
model's own forward pass once, on a few tokens, before it is used.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rllama.errors import RLlamaError

TOP_TREES = 2
"""Adapter states whose adapted blocks' states are kept at once (the policy's and the reference's)."""

DEFAULT_CACHE_MB = 512
"""Default bound of the prefix cache, in MiB (SmolLM2-135M with 8 adapted blocks: ≈ 36 KiB a token in fp32)."""


class _Node:
    """A run of tokens in the tree and, per token, the bottom's key/value states and the boundary state."""

    __slots__ = ("tokens", "keys", "values", "hidden", "children", "parent", "last_used", "nbytes")

    def __init__(self, tokens, keys, values, hidden, parent):
        self.tokens: tuple[int, ...] = tokens
        self.keys = keys  # [layers, kv_heads, n, head_dim]
        self.values = values  # [layers, kv_heads, n, head_dim]
        self.hidden = hidden  # [n, H]
        self.children: dict[int, _Node] = {}
        self.parent: _Node | None = parent
        self.last_used = 0
        self.nbytes = self.size()

    def size(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.hidden) if t is not None)

    @property
    def has_kv(self) -> bool:
        return self.keys is not None


@dataclass
class Piece:
    """The first ``n`` tokens of a node, as a matched prefix is made of."""

    node: _Node
    n: int


class RadixCache:
    """A radix tree over token ids holding per-token tensors, bounded in bytes, least recently used dropped first.

    A node holds, per token, the frozen blocks' keys and values (what extending the prefix needs)
    and the boundary state (what the adapted blocks need). Keys and values are most of the bytes
    (about 15 to 1 for SmolLM2-135M), so over the bound the cache first drops the keys and values
    of the least recently used prefixes and keeps their boundary states — a replayed step whose
    prefix is not extended any more needs nothing else — and removes boundary states only when they
    hold more than ``hidden_share`` of the bound. Nodes with keys and values always hang under
    nodes with keys and values, so a prefix is extended from the longest one that has them.

    Args:
        max_bytes: the bound; ``0`` keeps nothing (every lookup misses).
        hidden_share: the part of the bound that nodes holding only boundary states may fill
            before they are removed.
    """

    def __init__(self, max_bytes: int, hidden_share: float = 0.25) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}; expected 0 or more")
        self.max_bytes = int(max_bytes)
        self.hidden_share = hidden_share
        self.clear()

    def clear(self) -> None:
        """Forget every entry (the counters too)."""
        self.root = _Node((), None, None, None, None)
        self.nbytes = 0
        self.hidden_only_bytes = 0  # bytes of nodes that hold boundary states only
        self.nodes = 0
        self._tick = 0
        self.hit_tokens = 0
        self.miss_tokens = 0

    def match(self, tokens: Sequence[int]) -> list[Piece]:
        """The longest cached prefix of ``tokens``, as pieces of nodes (marks them recently used)."""
        self._tick += 1
        tokens = tuple(int(t) for t in tokens)
        pieces, node, i = [], self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = len(child.tokens)
            if tokens[i : i + n] != child.tokens:  # a partial match: find where they part
                n = 0
                while n < len(child.tokens) and i + n < len(tokens) and child.tokens[n] == tokens[i + n]:
                    n += 1
            child.last_used = self._tick
            pieces.append(Piece(child, n))
            i += n
            if n < len(child.tokens):
                break
            node = child
        return pieces

    def insert(self, tokens: Sequence[int], start: int, keys, values, hidden) -> None:
        """Store the states of ``tokens[start:]`` (``keys``/``values`` ``[layers, kv, n, d]``, ``hidden`` ``[n, H]``).

        The prefix ``tokens[:start]`` should be cached already; what of it is not (removed
        meanwhile) is not stored. Tokens already cached get their keys and values back if they had
        lost them; otherwise they are skipped.
        """
        if self.max_bytes == 0:
            return
        tokens = tuple(int(t) for t in tokens)
        pieces = self.match(tokens)
        matched = sum(p.n for p in pieces)
        if matched < start:
            return  # part of the prefix was removed: these states cannot hang under it
        kv_chain, pos = True, 0  # whether every node above holds keys and values
        for i, piece in enumerate(pieces):
            node = piece.node
            if not node.has_kv and kv_chain and pos >= start:
                if piece.n < len(node.tokens):
                    node = self._split(node, piece.n)
                    pieces[i] = Piece(node, piece.n)
                self._give_kv(node, keys[:, :, pos - start : pos - start + piece.n],
                              values[:, :, pos - start : pos - start + piece.n])
            kv_chain = kv_chain and node.has_kv
            pos += piece.n
        if matched < len(tokens):
            parent = self.root
            if pieces:
                last = pieces[-1]
                parent = self._split(last.node, last.n) if last.n < len(last.node.tokens) else last.node
            off = matched - start
            kv = (keys[:, :, off:].clone(), values[:, :, off:].clone()) if kv_chain else (None, None)
            node = _Node(tokens[matched:], *kv, hidden[off:].clone(), parent)
            node.last_used = self._tick
            parent.children[node.tokens[0]] = node
            self._account(node, +1)
            self.nodes += 1
        self.evict()

    def _account(self, node: _Node, sign: int) -> None:
        self.nbytes += sign * node.nbytes
        if not node.has_kv:
            self.hidden_only_bytes += sign * node.nbytes

    def _give_kv(self, node: _Node, keys, values) -> None:
        self._account(node, -1)
        node.keys, node.values = keys.clone(), values.clone()
        node.nbytes = node.size()
        self._account(node, +1)

    def _drop_kv(self, node: _Node) -> None:
        self._account(node, -1)
        node.keys = node.values = None
        node.nbytes = node.size()
        self._account(node, +1)

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut ``node`` after its first ``n`` tokens; returns the new upper part."""
        def head(t):
            return None if t is None else t[:, :, :n].clone()

        def tail(t):
            return None if t is None else t[:, :, n:].clone()

        upper = _Node(node.tokens[:n], head(node.keys), head(node.values), node.hidden[:n].clone(), node.parent)
        upper.last_used = node.last_used
        self._account(node, -1)
        node.tokens = node.tokens[n:]
        node.keys, node.values, node.hidden = tail(node.keys), tail(node.values), node.hidden[n:].clone()
        node.nbytes = node.size()
        node.parent.children[upper.tokens[0]] = upper
        upper.children[node.tokens[0]] = node
        node.parent = upper
        self._account(node, +1)
        self._account(upper, +1)
        self.nodes += 1
        return upper

    def evict(self) -> None:
        """Drop least recently used states until the tree holds at most 90 % of ``max_bytes`` (nothing if
        it is within the bound)."""
        if self.nbytes <= self.max_bytes:
            return
        # Down to 90 % of the bound, so that a full cache does not scan the tree on every insert.
        target = int(self.max_bytes * 0.9)
        nodes = list(self._walk())
        # KV leaves: nodes with keys and values none of whose children has them (dropped first).
        kv_leaves = [(n.last_used, id(n), n) for n in nodes
                     if n.has_kv and not any(c.has_kv for c in n.children.values())]
        leaves = [(n.last_used, id(n), n) for n in nodes if not n.children and not n.has_kv]
        heapq.heapify(kv_leaves)
        heapq.heapify(leaves)
        while self.nbytes > target and (kv_leaves or leaves):
            if kv_leaves and (self.hidden_only_bytes <= self.hidden_share * self.max_bytes or not leaves):
                _, _, node = heapq.heappop(kv_leaves)
                self._drop_kv(node)
                if not node.children:
                    heapq.heappush(leaves, (node.last_used, id(node), node))
                parent = node.parent
                if parent is not self.root and not any(c.has_kv for c in parent.children.values()):
                    heapq.heappush(kv_leaves, (parent.last_used, id(parent), parent))
            else:
                _, _, leaf = heapq.heappop(leaves)
                parent = leaf.parent
                del parent.children[leaf.tokens[0]]
                leaf.parent = None
                self._account(leaf, -1)
                self.nodes -= 1
                if parent is not self.root and not parent.children and not parent.has_kv:
                    heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def _walk(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def stats(self) -> dict:
        """Bytes held (and by boundary-state-only nodes), nodes, and the tokens served from the cache and
        computed since the last clear."""
        seen = self.hit_tokens + self.miss_tokens
        return {"bytes": self.nbytes, "hidden_only_bytes": self.hidden_only_bytes, "nodes": self.nodes,
                "hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens,
                "hit_rate": self.hit_tokens / seen if seen else 0.0}


def kv_prefix(pieces: Sequence[Piece]) -> list[Piece]:
    """The leading pieces whose nodes hold keys and values (a prefix can be extended from their end)."""
    out = []
    for p in pieces:
        if not p.node.has_kv:
            break
        out.append(p)
    return out


def holds_lora(module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer with at least one adapter (linear or embedding)."""
    return any(len(getattr(module, name, ())) for name in ("lora_A", "lora_embedding_A"))


def lora_block_indices(body) -> list[int]:
    """Indices of the blocks of ``body.layers`` holding a LoRA module of any adapter."""
    return [i for i, block in enumerate(body.layers) if any(holds_lora(m) for m in block.modules())]


def attention_mask(allowed: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``[B, 1, Q, K]`` mask in the form the attention implementation takes: as it is, or additive
    (``eager``)."""
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """``[B, Q, Q]``: which packed token each token of ``seg`` ``[B, Q]`` (its segment's index, ``-1`` for
    padding) may see: the earlier tokens of its own segment, and itself (so a padding row is not empty)."""
    q = torch.arange(seg.shape[1], device=seg.device)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & (q[None, None, :] <= q[None, :, None])
    return same | (q[:, None] == q[None, :])[None]


def supports_split(body) -> bool:
    """Whether the model body has the structure the split forward runs (embeddings, blocks, norm, rotary)."""
    return all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


class FrozenBottom:
    """The forward pass of a Llama-family body split at its lowest adapted block, with a prefix cache.

    Args:
        body: the transformers base model (``LlamaModel`` and kin) inside the PEFT wrapper.
        attn_implementation: ``"eager"`` takes additive float masks, the others boolean ones.
        max_bytes: bound of the :class:`RadixCache`.
    """

    def __init__(self, body, max_bytes: int, attn_implementation: str = "sdpa",
                 mask_dtype: torch.dtype = torch.float32) -> None:
        if not supports_split(body):
            raise RLlamaError(
                f"prefix_cache: cannot locate the transformer blocks of {type(body).__name__} (expected "
                "embed_tokens, layers, norm and rotary_emb); pass prefix_cache=False to run without the cache")
        self.body = body
        self.eager = attn_implementation == "eager"
        self.mask_dtype = mask_dtype
        self.cache = RadixCache(max_bytes)
        # The adapted blocks' states of prefixes, one tree per adapter state (signature) for the
        # TOP_TREES most recent ones, valid while those weights stay the same: the policy's and
        # the reference's (adapter disabled) survive each other's passes. Together they hold at most
        # a quarter of the bound.
        self.top_bytes = max_bytes // 4
        self._top_trees: OrderedDict[tuple, RadixCache] = OrderedDict()
        self.top_cache = RadixCache(self.top_bytes)
        self.split = 0
        self.refresh()

    def refresh(self) -> None:
        """Find the lowest adapted block again; clears the cache if the frozen part changed."""
        adapted = lora_block_indices(self.body)
        embeds_adapted = any(holds_lora(m) for m in self.body.embed_tokens.modules())
        split = 0 if embeds_adapted else (min(adapted) if adapted else len(self.body.layers))
        if split != self.split:
            self.cache.clear()
        self.clear_top()
        self.split = split

    def clear_top(self) -> None:
        """Forget the adapted blocks' states of every adapter state."""
        self._top_trees.clear()
        self.top_cache = RadixCache(self.top_bytes)

    @property
    def active(self) -> bool:
        """Whether there is a frozen bottom to cache (at least one block below every adapter)."""
        return self.split > 0

    # ------------------------------------------------------------------ masks
    def mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A ``[B, 1, Q, K]`` boolean mask in the form the attention implementation takes."""
        return attention_mask(allowed, self.eager, self.mask_dtype)

    @staticmethod
    def causal(mask2d: torch.Tensor, q_len: int) -> torch.Tensor:
        """``[B, 1, Q, K]`` causal mask of the last ``q_len`` positions over the keys ``mask2d`` marks real.

        A padding query sees itself, so that no row is empty (an empty row would give NaN states).
        """
        K = mask2d.shape[1]
        q = torch.arange(K - q_len, K, device=mask2d.device)[:, None]  # [Q, 1] absolute positions
        k = torch.arange(K, device=mask2d.device)[None, :]
        allowed = (k <= q)[None] & mask2d.bool()[:, None, :]
        allowed = allowed | (k == q)[None]
        return allowed[:, None]

    # ------------------------------------------------------------------ the two halves
    def run_blocks(self, hidden, blocks, allowed, positions, cache, use_cache: bool):
        """Run ``blocks`` over ``hidden`` ``[B, Q, H]`` with the boolean mask ``allowed`` ``[B, 1, Q, K]``."""
        mask = self.mask(allowed)
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
    def boundary(self, seqs: Sequence[Sequence[int]], want_kv: bool = False):
        """Boundary states ``[len, H]`` of each token sequence (and, with ``want_kv``, the bottom's key/value states).

        Cached prefixes are read from the tree; the rest runs through the bottom in one batch
        (each row after its own cached prefix) and is stored.

        Returns:
            a list of ``[len_i, H]`` tensors, or with ``want_kv`` a list of ``(hidden, keys, values)``
            with ``keys``/``values`` ``[layers, kv_heads, len_i, head_dim]``.
        """
        return self._states(self.cache, 0, self.split, seqs, want_kv)

    @torch.no_grad()
    def top_states(self, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The adapted blocks' outputs ``[len, H]`` (before the final norm) of each token sequence, from the
        top tree: valid only while the adapters' weights stay the same (the caller checks, see
        :meth:`check_top`)."""
        return self._states(self.top_cache, self.split, len(self.body.layers), seqs, False)

    def check_top(self, signature) -> None:
        """Make the top tree the one filled under ``signature`` (what the adapted blocks compute with): a
        new, empty one if that state is not among the ``TOP_TREES`` most recent (the oldest is dropped)."""
        tree = self._top_trees.get(signature)
        if tree is None:
            tree = self._top_trees[signature] = RadixCache(self.top_bytes)
            while len(self._top_trees) > TOP_TREES:
                self._top_trees.popitem(last=False)
            for other in self._top_trees.values():  # the quarter of the bound shared among them
                other.max_bytes = self.top_bytes // len(self._top_trees)
                other.evict()
        self._top_trees.move_to_end(signature)
        self.top_cache = tree

    def _states(self, tree: RadixCache, lo: int, hi: int, seqs, want_kv: bool):
        """What ``blocks[lo:hi]`` output for each token of ``seqs`` (and their keys and values), from ``tree``;
        the tokens after each sequence's longest cached prefix run through the blocks and are stored."""
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
                fresh.update(zip(rows, self._extend(tree, lo, hi, seqs, cached, batch)))
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

    def _extend(self, tree: RadixCache, lo: int, hi: int, seqs, cached, units: list[list[int]]):
        """``blocks[lo:hi]`` over the uncached tails of ``seqs``, batched; stores and returns ``(hidden, keys, values)``
        of each row of ``units``, in that order.

        A unit is a list of rows sharing one cached prefix: their tails are packed into one row after
        the prefix's keys and values, with a block mask (each token sees the prefix and the earlier
        tokens of its own tail). The inputs of a tail are the token embeddings (``lo == 0``) or the
        boundary states.
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
        if lo == 0:
            x = body.embed_tokens(ids)
        else:  # the boundary states of the new tokens
            bounds = self.boundary([seqs[i] for i in rows])
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


def length_groups(lengths: Sequence[int], shared: int, overhead: int = 16, max_groups: int = 4) -> list[list[int]]:
    """Prompt indices in groups of similar length, so that left padding wastes little compute.

    Cost model in token positions: a group of ``n`` prompts whose longest has ``u`` tokens after
    the batch's common prefix costs ``n * u``; each group after the first costs the common prefix
    again plus ``overhead``. The grouping of least cost among at most ``max_groups`` contiguous
    groups of the length-sorted prompts is returned (one group when splitting does not pay).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    unique = [lengths[i] - shared for i in range(len(lengths))]
    step = max(1, -(-(max(unique) - min(unique)) // 64))  # at most ~64 distinct lengths: the search is O(m^2)
    key = [-(-u // step) * step for u in unique]  # rounded up: the cost never underestimates a group
    values = sorted(set(key))
    m = len(values)
    if m == 1:
        return [order]
    tally = {v: 0 for v in values}
    for v in key:
        tally[v] += 1
    before = [0]  # before[j]: prompts among the j shortest distinct lengths
    for v in values:
        before.append(before[-1] + tally[v])
    inf = float("inf")
    # best[k][j]: least cost of the prompts with the j shortest distinct lengths, in k groups
    best = [[inf] * (m + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (m + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        extra = 0 if k == 1 else shared + overhead
        for j in range(1, m + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (before[j] - before[i]) * values[j - 1] + extra
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_groups + 1), key=lambda k: best[k][m])
    bounds, j = [], m
    while k:
        i = cut[k][j]
        bounds.append((values[i], values[j - 1]))
        j, k = i, k - 1
    return [[i for i in order if lo <= key[i] <= hi] for lo, hi in reversed(bounds)]


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
