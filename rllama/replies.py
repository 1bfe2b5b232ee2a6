"""Declared reply shapes: generation constrained so that every reply parses.

An agent that generates free text may say what a valid reply looks like: :class:`Choices` (one of a
few texts), :class:`Regex` (a regular expression the whole reply matches) or :class:`Grammar` (a
llama.cpp GBNF grammar, or a Lark grammar).

With :class:`Choices` the reply is exactly one of a few texts, generated token by token with every
other token masked out: at each position only the tokens that continue some choice are allowed, and
the reply ends with the end-of-turn token once a choice is complete. Both backends sample from the
same masked distribution, ``softmax`` over the allowed tokens of ``logits / temperature``, and record each token's
log-probability under it; the learner computes the same ones from the choices (a step keeps them in
``Step.choice_ids``): at each position, the token's log-probability renormalised over the allowed
tokens (:func:`constrained_logprobs`). In the losses such a reply is one decision among the choices, as a
scored step is among its candidates: one unit whose log-probability is the whole choice's (the sum of its
tokens'), its entropy and KL to the reference exact over the choices.

.. code-block:: python

    from rllama import RLlamaAgent
    from rllama.replies import Choices

    class StayOrHit(RLlamaAgent):
        reply_shape = Choices("stay", "hit")   # or override get_reply_shape(observation)
        ...
        def extract_action(self, response):
            return 0 if "stay" in response else 1

With :class:`Regex` and :class:`Grammar` the tokens allowed after each prefix of the reply come from
`llguidance <https://github.com/guidance-ai/llguidance>`_ (``pip install "rllama[grammar]"``) over the
model's own vocabulary; the end-of-turn token is allowed wherever the reply so far is complete, and the
reply ends by itself where nothing may follow. Both backends take the same masks from it, and the
learner recomputes them from the reply's tokens (:meth:`ReplyGrammars.allowed_tokens`), so engine and
learner renormalise over the same sets. A shape is checked when the agent is built (or, where
:meth:`~rllama.hooks.AgentHooks.get_reply_shape` depends on the observation, when first met): a
regular expression or grammar that does not compile, or that no reply of ``max_new_tokens`` tokens can
complete, is an error naming it.

Unlike scoring (``get_valid_actions``), where a candidate's score is its mean token log-probability
and the policy a softmax over those, a constrained reply's probability is the product of its
renormalised token probabilities: the model's own free-text policy restricted to the choices. Under
``score_normalization="relative"`` a :class:`Choices` reply's token log-probs are the adapted model's minus
the base model's before renormalising (uniform where the choices branch, untrained), and the learner
chooses it in its own process (:meth:`~rllama.policy.PolicyModel.choice_outputs`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from rllama.errors import HookError, RLlamaError, require


class Choices:
    """A reply is exactly one of ``options`` (distinct, non-empty texts), followed by the end of turn.

    Example:
        >>> Choices("stay", "hit").options
        ('stay', 'hit')
    """

    def __init__(self, *options) -> None:
        if len(options) == 1 and not isinstance(options[0], str):
            options = tuple(options[0])
        bad = [o for o in options if not isinstance(o, str) or not o.strip()]
        if not options or bad:
            raise HookError(f"Choices needs non-empty strings; got {list(options)!r}")
        if len(set(options)) != len(options):
            raise HookError(f"Choices got duplicate options {list(options)!r}")
        self.options = tuple(options)

    def __repr__(self) -> str:
        return f"Choices{self.options!r}"

    def __eq__(self, other) -> bool:
        return isinstance(other, Choices) and other.options == self.options

    def __hash__(self) -> int:
        return hash(self.options)


class ChoiceTrie:
    """The token sequences of the choices as a prefix tree: which tokens may follow a reply's prefix."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.sequences = [list(map(int, s)) for s in sequences]
        if len({tuple(s) for s in self.sequences}) != len(self.sequences):
            raise HookError("two choices tokenize to the same tokens")
        for a in self.sequences:
            for b in self.sequences:
                if a is not b and len(a) < len(b) and b[: len(a)] == a:
                    raise HookError(f"choice tokens {a} are a prefix of {b}: a reply could not tell them apart")
        self.root: dict = {}
        for seq in self.sequences:
            node = self.root
            for token in seq:
                node = node.setdefault(token, {})

    @property
    def longest(self) -> int:
        return max(map(len, self.sequences))

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """The tokens that continue ``prefix`` toward some choice (``[]`` once a choice is complete)."""
        node = self.root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                raise ValueError(f"reply prefix {list(prefix)} follows no choice")
        return list(node)


class RowConstraints:
    """The constraints of one ``generate`` call, a row each (``None``: free), with each row's allowed next
    tokens computed once per token: :meth:`mask` masks the next logits, :meth:`advance` follows a sampled
    token and says whether the reply is complete."""

    def __init__(self, constraints: Sequence | None, rows: int) -> None:
        self.constraints = list(constraints) if constraints is not None else [None] * rows
        self.next = [None if c is None else c.allowed([]) for c in self.constraints]

    def mask(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """``logits`` ``[len(rows), V]`` of ``rows`` with the tokens each may not take masked out."""
        return mask_logits(logits, [self.next[r] for r in rows])

    def advance(self, row: int, token_ids: Sequence[int]) -> bool:
        """``row``'s reply is now ``token_ids``; whether its shape is complete (nothing may follow)."""
        if self.constraints[row] is None:
            return False
        self.next[row] = self.constraints[row].allowed(token_ids)
        return not self.next[row]


def mask_logits(logits: torch.Tensor, allowed: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """``logits`` ``[A, V]`` with every token outside row ``a``'s ``allowed`` set to ``-inf`` (rows whose
    set is ``None`` unchanged)."""
    if all(a is None for a in allowed):
        return logits
    out = logits.clone()
    for row, ids in enumerate(allowed):
        if ids is not None:
            keep = out[row, ids].clone()
            out[row] = float("-inf")
            out[row, ids] = keep
    return out


def constrained_logprobs(choice_logprobs: Sequence[torch.Tensor], choice_ids: Sequence[Sequence[int]],
                         response: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's log-probability of ``response`` under the model restricted to ``choice_ids``, and the
    entropy of that restricted distribution at each position, ``([n], [n])``.

    ``choice_logprobs[k][t]`` is the unconstrained log-probability of token ``t`` of choice ``k`` after the
    prompt and the choice's first ``t`` tokens. At position ``t`` the allowed tokens are the ``t``-th tokens
    of the choices that share the response's first ``t`` tokens; the response's token is renormalised over
    them. Differentiable in ``choice_logprobs``.
    """
    response = list(map(int, response))
    owner = next((k for k, c in enumerate(choice_ids) if list(c) == response), None)
    if owner is None:
        raise ValueError(f"response {response} is none of the choices {[list(c) for c in choice_ids]}")
    out, entropies = [], []
    for t, token in enumerate(response):
        children: dict[int, torch.Tensor] = {}
        for k, c in enumerate(choice_ids):
            if len(c) > t and list(c[:t]) == response[:t] and int(c[t]) not in children:
                children[int(c[t])] = choice_logprobs[k][t]
        lps = torch.stack(list(children.values()))
        norm = torch.logsumexp(lps, dim=0)
        out.append(children[token] - norm)
        p = (lps - norm).exp()
        entropies.append(-(p * (lps - norm)).sum())
    return torch.stack(out), torch.stack(entropies)


# ---------------------------------------------------------------------------------------------- grammars
class GrammarShape:
    """A reply shape that llguidance compiles: :class:`Regex` or :class:`Grammar`."""

    kind = "grammar"

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise HookError(f"{type(self).__name__} needs a non-empty string; got {text!r}")
        self.text = text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.text == self.text

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.text))

    def llguidance_grammar(self) -> str:
        """The shape as an llguidance grammar (a JSON string); an error naming the shape where it does not
        parse."""
        try:
            return load_llguidance().grammar_from(self.kind, self.text)
        except ValueError as e:
            raise HookError(f"{self!r} does not compile: {e}") from None


class Regex(GrammarShape):
    """The whole reply matches the regular expression ``pattern`` (Rust ``regex`` syntax: no look-around or
    back-references), then ends with the end of turn.

    Example:
        >>> Regex(r"(stay|hit)( now)?").text
        '(stay|hit)( now)?'
    """

    kind = "regex"


class Grammar(GrammarShape):
    """The reply is a sentence of a context-free grammar: llama.cpp's GBNF (the start rule ``root``) or
    llguidance's Lark syntax (the start rule ``start``).

    Example:
        >>> Grammar('root ::= "Action: " ("stay" | "hit")').text
        'root ::= "Action: " ("stay" | "hit")'
    """

    kind = "grammar"


def load_llguidance():
    """The ``llguidance`` module, or a :class:`~rllama.errors.MissingExtraError` naming the extra."""
    return require("llguidance", "grammar", "a Regex or Grammar reply shape (Choices need nothing)")


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes for a tokenizer llguidance cannot read itself (a slow one); special tokens are
    marked the way llguidance expects (``0xff`` then their text), so no reply contains them."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    offset = getattr(tokenizer, "offset", None)
    utf = getattr(tokenizer, "_utf_vocab_size", None)
    out = []
    for i in range(len(tokenizer)):
        token = tokenizer.convert_ids_to_tokens(i)
        if i in special:
            out.append(b"\xff" + str(token).encode())
        elif utf is not None and offset is not None and offset <= i < offset + utf:  # one byte per token (ByT5)
            out.append(bytes([i - offset]))
        else:
            out.append(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return out


class _SlowTokenizer:
    """What llguidance's ``TokenizerWrapper`` reads from a tokenizer: the tokens' bytes and ``__call__``."""

    def __init__(self, tokenizer, eos: int) -> None:
        self.tokenizer = tokenizer
        self.tokens = token_bytes(tokenizer)
        self.eos_token_id = eos
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class ReplyGrammars:
    """Compiles :class:`Regex` and :class:`Grammar` shapes for one tokenizer and end of turn, and gives the
    tokens allowed after each prefix of a reply: to the backends while they sample, to the learner
    when it recomputes a step.

    Args:
        tokenizer: the policy's tokenizer (a fast one is read by llguidance directly).
        stop_token_ids: the end-of-turn token ids, allowed where a reply is complete.
        vocab_size: the model's vocabulary (its logits' width; at least the tokenizer's).
    """

    def __init__(self, tokenizer, stop_token_ids: Sequence[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = sorted({int(t) for t in stop_token_ids})
        self.vocab_size = int(vocab_size)
        self._compiled: dict[tuple[GrammarShape, int], str] = {}

    @functools.cached_property
    def lltokenizer(self):
        llg = load_llguidance()
        tok = self.tokenizer
        if getattr(tok, "backend_tokenizer", None) is not None:
            from llguidance.hf import from_tokenizer

            return from_tokenizer(tok, n_vocab=self.vocab_size, eos_token=self.stop_token_ids)
        return llg.LLTokenizer(llg.TokenizerWrapper(_SlowTokenizer(tok, self.stop_token_ids[0])),
                               n_vocab=self.vocab_size, eos_token=self.stop_token_ids)

    def compile(self, shape: GrammarShape, max_new_tokens: int) -> str:
        """``shape`` as an llguidance grammar, checked once: it compiles for this vocabulary, and some reply of
        at most ``max_new_tokens`` tokens completes it (else a :class:`~rllama.errors.HookError` naming it)."""
        if (shape, max_new_tokens) in self._compiled:
            return self._compiled[shape, max_new_tokens]
        if not self.stop_token_ids:
            raise HookError(f"{shape!r} needs an end-of-turn token to end a reply; the tokenizer has none")
        grammar = shape.llguidance_grammar()
        failed, messages = load_llguidance().LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if failed:
            raise HookError(f"{shape!r} does not compile: {'; '.join(messages).strip()}")
        if shortest_completion(self._matcher(grammar), self.lltokenizer, self.stop_token_ids, max_new_tokens) is None:
            raise HookError(f"no reply of at most max_new_tokens={max_new_tokens} tokens completes {shape!r}: "
                            "raise max_new_tokens or loosen the shape")
        self._compiled[shape, max_new_tokens] = grammar
        return grammar

    def _matcher(self, grammar: str):
        return load_llguidance().LLMatcher(self.lltokenizer, grammar, log_level=0)

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh constraint for one reply (what a backend's ``generate`` takes)."""
        return GrammarConstraint(self._matcher(grammar), self.stop_token_ids)

    def allowed_tokens(self, grammar: str, response: Sequence[int]) -> AllowedTokens:
        """The tokens allowed at each position of ``response`` (``[n, vocab]``), as the backends saw them."""
        matcher = self._matcher(grammar)
        rows = []
        for token in response:
            rows.append(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8))
            if not matcher.consume_token(int(token)):
                raise ValueError(f"reply {list(response)} breaks its grammar at token {int(token)}")
        bits = np.unpackbits(np.stack(rows), axis=1, bitorder="little")[:, : self.vocab_size].astype(bool) \
            if rows else np.zeros((0, self.vocab_size), dtype=bool)
        return AllowedTokens(torch.from_numpy(bits))


class GrammarConstraint:
    """One reply's grammar: the tokens allowed after its prefix, from an llguidance matcher that follows
    the reply as it grows (``[]`` once nothing may follow: the reply is complete)."""

    def __init__(self, matcher, stop_token_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.stop = set(stop_token_ids)
        self.consumed: list[int] = []

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        prefix = list(map(int, prefix))
        if prefix[: len(self.consumed)] != self.consumed:
            self.matcher.reset()
            self.consumed = []
        for token in prefix[len(self.consumed):]:
            if not self.matcher.consume_token(token):
                raise ValueError(f"reply prefix {prefix} breaks its grammar: {self.matcher.get_error()}")
            self.consumed.append(token)
        if self.matcher.is_stopped():
            return []
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits).tolist()
        if not allowed:  # a dead end: no token of this vocabulary continues the reply
            raise RLlamaError(f"no token of the vocabulary continues the reply {prefix} under its grammar "
                              f"({self.matcher.get_error() or 'a dead end'}): loosen the reply shape")
        return allowed


class AllowedTokens:
    """A reply's allowed tokens per position, ``mask`` ``[n, vocab]`` (bool): handed to the learner's engine
    in place of an entropy flag, so the row's log-probs and entropies are those of the masked distribution."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def __bool__(self) -> bool:
        return True


def shortest_completion(matcher, lltokenizer, stop_token_ids: Sequence[int], max_tokens: int, beam: int = 16,
                        per_state: int = 24) -> int | None:
    """The length of some reply of at most ``max_tokens`` tokens that completes the matcher's grammar (the end
    of turn allowed after it, or nothing more possible), found by a beam search over tokens — the longest
    and the shortest allowed ones from each state — or ``None`` where it finds none."""
    stop = set(map(int, stop_token_ids))
    states = [(b"", matcher)]
    lengths: dict[int, int] = {}
    for depth in range(max_tokens + 1):
        for _, m in states:
            if m.is_accepting() or m.is_stopped():
                return depth
        if depth == max_tokens:
            break
        seen, nxt = set(), []
        for text, m in states:
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            ids = [t for t in np.flatnonzero(bits).tolist() if t not in stop]
            if len(ids) > per_state:
                for t in ids:
                    if t not in lengths:
                        lengths[t] = len(lltokenizer.decode_bytes([t]))
                ids.sort(key=lambda t: lengths[t])
                ids = ids[-per_state // 2:][::-1] + ids[: per_state // 2]
            for t in ids:
                child = m.deep_copy()
                if not child.consume_token(t):
                    continue
                key = text + lltokenizer.decode_bytes([t])  # one state per text, whatever its tokens
                if key not in seen:
                    seen.add(key)
                    nxt.append((key, child))
        if not nxt:
            return None
        states = nxt[:beam]
    return None
