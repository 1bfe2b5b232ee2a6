"""What an engine may keep about adapted weights: their signature, and a memo of outputs keyed by it.

The frozen blocks compute a pure function of the token prefix; the adapted blocks compute one only
while their weights stay the same. :class:`AdapterSignature` says what the adapted blocks compute with
(cheaply, before every pass without gradients), and :class:`ContinuationMemo` remembers the outputs of
(prompt, continuation) pairs under a signature, so that a frozen adapter's outputs for a pair seen
before cost no forward at all: acting on a state met before, every replayed step of a head-only
update, and the reference policy (the adapter disabled, whose signature never changes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch
from torch import nn

from rllama.policy.engine.split import holds_lora
from rllama.policy.outputs import Continuations

BASE_MODEL = ("base model",)
"""The signature of adapters that add nothing: disabled, or every output weight of the active ones zero."""

MEMO_ENTRIES = 100_000
"""Continuations whose outputs (token log-probabilities and features) are remembered per adapter state."""
MEMO_BYTES = 256 * 2**20
"""And at most about so many bytes of them per adapter state (the features are most of it, a prompt's shared by
its continuations: about 86,000 continuations of SmolLM2-135M, hidden size 576, four to a prompt)."""


class AdapterSignature:
    """What the adapted blocks of ``model`` compute with, as a hashable value (call the object).

    The active and enabled adapters, and each LoRA weight's version counter and sum (the sum catches
    changes that bypass the counter, such as ``.data`` writes and fused optimizers). Adapters that add
    nothing (disabled, or every ``B`` weight of the active ones zero, as a fresh adapter is) compute the
    base model's function: they share :data:`BASE_MODEL`, so a frozen, untrained adapter and the reference
    reuse each other's states and outputs. ``()`` for a model without LoRA layers.

    Args:
        model: the module holding the LoRA layers (searched once, and again after :meth:`reset`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._probe = None

    def reset(self) -> None:
        """Find the LoRA layers again (adapters were added, loaded or deleted)."""
        self._probe = None

    def __call__(self) -> tuple:
        layer, params, outputs = self._find()
        if layer is None:
            return ()
        active = tuple(layer.active_adapters)
        adds_nothing = outputs is not None and not any(p.detach().any() for a in active for p in outputs.get(a, ()))
        if layer.disable_adapters or adds_nothing:
            return BASE_MODEL
        sums = torch.stack([p.detach().float().sum() for p in params]).tolist() if params else []
        return (active, tuple(p._version for p in params), tuple(sums))

    def _find(self):
        """One LoRA layer (it says which adapters are active and whether they are disabled), every LoRA
        weight, and each adapter's output (``B``) weights (``None`` for DoRA, where a zero ``B`` still
        rescales the weights)."""
        if self._probe is None:
            layer = next((m for m in self.model.modules() if holds_lora(m)), None)
            named = [(n, p) for n, p in self.model.named_parameters() if "lora_" in n]
            outputs: dict[str, list[nn.Parameter]] | None = {}
            for n, p in named:
                for marker in ("lora_B.", "lora_embedding_B."):
                    if marker in n:
                        outputs.setdefault(n.split(marker, 1)[1].split(".")[0], []).append(p)
            if any("lora_magnitude" in n for n, _ in named):
                outputs = None
            self._probe = (layer, [p for _, p in named], outputs)
        return self._probe


def serves(entry, logprobs: bool) -> bool:
    """Whether a memo entry (``None``: not remembered) holds what a pass wants: its features, and its token
    log-probs when ``logprobs``."""
    return entry is not None and not (logprobs and entry[0] is None)


class ContinuationMemo:
    """Outputs of (prompt, continuation) pairs under the most recent adapter signatures, bounded, least
    recently used forgotten first.

    An entry holds a continuation's token log-probs (``None`` when only its features were computed),
    its features and its prompt's: ``(token_logprobs [n], action_hidden [H], prompt_hidden [H])``. It is
    keyed by a digest of what those depend on besides the weights (:meth:`keys`) in a store per
    signature; at most ``signatures`` stores are kept (the policy's, the reference's, a value-based
    algorithm's target snapshot), the least recently used dropped first but the base model's
    (:data:`BASE_MODEL`, the reference's) last, since the policy's weights change at every update and the
    reference's never.

    Args:
        signatures: adapter states remembered at once.
        max_entries: the most entries of each store.
        max_bytes: the most bytes (about) of each store.
    """

    def __init__(self, signatures: int = 3, max_entries: int = MEMO_ENTRIES, max_bytes: int = MEMO_BYTES) -> None:
        self.signatures, self.max_entries, self.max_bytes = signatures, max_entries, max_bytes
        self._stores: OrderedDict[tuple, OrderedDict[bytes, tuple]] = OrderedDict()
        self._store: OrderedDict[bytes, tuple] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(s) for s in self._stores.values())

    def clear(self) -> None:
        self._stores.clear()
        self._store = OrderedDict()

    def use(self, signature: tuple) -> None:
        """Make the store of ``signature`` the one read and filled (a new, empty one if it is not kept)."""
        store = self._stores.get(signature)
        if store is None:
            store = self._stores[signature] = OrderedDict()
            while len(self._stores) > self.signatures:
                oldest = next((s for s in self._stores if s != BASE_MODEL), next(iter(self._stores)))
                del self._stores[oldest]
        self._stores.move_to_end(signature)
        self._store = store

    @staticmethod
    def keys(prompts, continuations, owner, temperature: float) -> list[bytes]:
        """Per continuation, a digest of what its outputs depend on besides the weights: the temperature,
        its prompt and its tokens."""
        heads = []
        for ids in prompts:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{temperature!r}|".encode())
            h.update(array("l", ids).tobytes())
            heads.append(h)
        keys = []
        for c, b in zip(continuations, owner):
            h = heads[b].copy()
            h.update(b"|")
            h.update(array("l", c).tobytes())
            keys.append(h.digest())
        return keys

    def lookup(self, keys) -> list:
        """Each key's entry (``None`` when not remembered), marked as recently used."""
        found = []
        for key in keys:
            entry = self._store.get(key)
            if entry is not None:
                self._store.move_to_end(key)
            found.append(entry)
        return found

    def store(self, keys, rows, token_logprobs, continuations, owner, prompt_hidden, action_hidden) -> None:
        """Remember ``rows`` of a batch: each one's token log-probs (``token_logprobs`` ``[R, Lc]``, or ``None``
        when they were not computed), its features (``action_hidden`` ``[R, H]``) and its prompt's
        (``prompt_hidden`` ``[B, H]``); the least recently used are forgotten beyond the bound."""
        if not rows:
            return
        prompt_rows = {b: prompt_hidden[b].clone() for b in {owner[r] for r in rows}}  # shared by its rows
        for r in rows:
            logp = None if token_logprobs is None else token_logprobs[r, : len(continuations[r])].clone()
            self._store[keys[r]] = (logp, action_hidden[r].clone(), prompt_rows[owner[r]])
        # An entry holds its features, its token log-probs and its share of its prompt's features.
        features = action_hidden.shape[-1] * action_hidden.element_size()
        Lc = max(len(c) for c in continuations)
        entry_bytes = features * (1 + len(prompt_rows) / len(rows)) + 4 * Lc + 200
        while len(self._store) > min(self.max_entries, int(self.max_bytes // entry_bytes)):
            self._store.popitem(last=False)

    @staticmethod
    def assemble(found, continuations, owner, n_prompts: int, logprobs: bool, device) -> Continuations | None:
        """The :class:`Continuations` of a batch whose every row was ``found``, with no forward at all; ``None``
        when some row (or some prompt's every row) is missing."""
        if not all(serves(f, logprobs) for f in found) or len(set(owner)) < n_prompts:
            return None
        R, Lc = len(found), max(len(c) for c in continuations)
        first = {}
        for r, b in enumerate(owner):
            first.setdefault(b, r)
        prompt_hidden = torch.stack([found[first[b]][2] for b in range(n_prompts)])
        action_hidden = torch.stack([f[1] for f in found])
        cmask = torch.zeros((R, Lc), dtype=torch.long, device=device)
        token_logprobs = torch.zeros((R, Lc), dtype=torch.float32, device=device)
        for r, (c, f) in enumerate(zip(continuations, found)):
            cmask[r, : len(c)] = 1
            if logprobs:
                token_logprobs[r, : len(c)] = f[0]
        return Continuations(prompt_hidden, token_logprobs, cmask, None, action_hidden)
