"""Declared reply shapes: generation constrained so that every reply parses.

An agent that generates free text may say what a valid reply looks like. With :class:`Choices` the
reply is exactly one of a few texts, generated token by token with every other token masked out:
at each position only the tokens that continue some choice are allowed, and the reply ends with the
end-of-turn token once a choice is complete. Both backends sample from the same masked distribution,
``softmax`` over the allowed tokens of ``logits / temperature``, and record each token's
log-probability under it; the learner computes the same ones from the choices (a step keeps them in
``Step.choice_ids``): at each position, the token's log-probability renormalised over the allowed
tokens (:func:`constrained_logprobs`).

.. code-block:: python

    from rllama import RLlamaAgent
    from rllama.replies import Choices

    class StayOrHit(RLlamaAgent):
        reply_shape = Choices("stay", "hit")   # or override get_reply_shape(observation)
        ...
        def extract_action(self, response):
            return 0 if "stay" in response else 1

Unlike scoring (``get_valid_actions``), where a candidate's score is its mean token log-probability
and the policy a softmax over those, a constrained reply's probability is the product of its
renormalised token probabilities: the model's own free-text policy restricted to the choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rllama.errors import HookError


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
