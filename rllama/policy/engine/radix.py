"""A radix tree over token ids holding per-token tensors, bounded in bytes: the store behind the cached engine.

It knows nothing of the model that fills it: a node holds a run of tokens and, per token, whatever
tensors the caller gives (the cached engine stores a block range's key/value states and its output
hidden states). Least recently used entries are dropped first; a dropped entry is simply
recomputed by the caller, so a tree too small to hold anything is still correct, only slower.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


class _Node:
    """A run of tokens in the tree and, per token, a block range's key/value states and output hidden state."""

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

    A node holds, per token, a block range's keys and values (what extending the prefix needs) and its
    output hidden state (the *boundary* state the blocks above need: for the cached engine's frozen tree,
    what enters the lowest adapted block). Keys and values are most of the bytes
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

