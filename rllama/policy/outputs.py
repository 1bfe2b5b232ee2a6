"""What a policy's forward passes return: continuations to score, candidates' outputs, generated replies, the
evaluation of recorded steps; and the score of a candidate from its tokens' log-probs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCORE_NORMALIZATIONS = ("mean", "sum", "none", "relative")
"""How a candidate's token log-probs become its score (``PolicyModel(score_normalization=...)``)."""


def candidate_score(token_logprobs: Sequence[float], normalization: str) -> float:
    """A candidate's score from its tokens' log-probs (the last token being its end-of-turn token):
    their sum, (``"mean"``) the mean over the text tokens plus the last token's log-prob, or
    (``"none"``) 0, the model's preference left out. ``"relative"`` needs the base model's scores too
    (:class:`~rllama.policy.scoring.ScoreRule`), which token log-probs alone do not give.
    :class:`~rllama.policy.scoring.ScoreRule` computes the same on tensors."""
    if normalization == "relative":
        raise ValueError("score_normalization='relative' subtracts the base model's score (the adapter disabled), "
                         "which needs the in-process learner; use 'mean' with this backend")
    if normalization == "none":
        return 0.0
    lps = [float(x) for x in token_logprobs]
    if normalization == "sum" or len(lps) < 2:
        return sum(lps)
    return sum(lps[:-1]) / (len(lps) - 1) + lps[-1]


@dataclass
class Continuations:
    """Log-probabilities of token continuations of several prompts (see ``continuation_logprobs``)."""

    prompt_hidden: torch.Tensor  # [B, H] last hidden state of each prompt
    token_logprobs: torch.Tensor  # [R, L] log p of each continuation token, 0 at padding
    mask: torch.Tensor  # [R, L] 1 for real tokens
    entropy: torch.Tensor | None  # [R, L] entropy of the next-token distribution, or None
    action_hidden: torch.Tensor  # [R, H] hidden state after the continuation's text (before its last token)


@dataclass
class CandidateOutputs:
    """Per prompt: the policy's log-probabilities over its candidates and each head's values.

    ``q[name][b]`` is ``[K_b]``: head ``name`` applied to the hidden state of prompt ``b`` followed
    by each candidate's text (the state-action features of value-based algorithms).
    """

    logprobs: list[torch.Tensor]
    values: torch.Tensor  # [B]
    q: dict[str, list[torch.Tensor]]


@dataclass
class GeneratedReply:
    """A sampled reply: token ids (ending with the stop token if one was produced) and their log-probs.

    ``exact``: the log-probs are the learner's own (same weights, same numerics); ``False`` when they came
    from other numerics (an engine, or decode steps in another precision), so that the learner
    recomputes its own before an update and corrects for the difference. ``value`` is NaN where the
    sampler has no value head.
    """

    token_ids: list[int]
    token_logprobs: list[float]
    value: float
    exact: bool = True


@dataclass
class StepEvaluation:
    """What the policy says about a batch of steps (used by the algorithms' losses).

    ``distributions[i]`` holds the log-probabilities that define step ``i``'s action: for a scored
    step the log-softmax over its candidates (``[K]``), for a reply to declared choices each whole
    choice's log-probability (``[K]``, summing to one; :mod:`rllama.replies`), for a free generated
    step the log-probability of each reply token (``[n]``). ``action_indices[i]`` is the candidate or
    choice taken (``None`` for a free reply). ``entropy`` is the entropy over the candidates or choices,
    or the mean next-token entropy over a free reply.
    """

    values: torch.Tensor | None  # [S]
    distributions: list[torch.Tensor]
    entropy: torch.Tensor | None  # [S]
    action_indices: list[int | None]

    def unit_logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each *unit* of the chosen actions and the step each unit belongs to.

        A scored step is one unit (its chosen candidate), and so is a reply to declared choices (the whole
        choice); a free generated step has one unit per token.
        Returns ``(logprobs [U], step_index [U])``.
        """
        parts, owners = [], []
        for i, (dist, idx) in enumerate(zip(self.distributions, self.action_indices)):
            part = dist[idx : idx + 1] if idx is not None else dist
            parts.append(part)
            owners.append(torch.full((part.numel(),), i, dtype=torch.long))
        return torch.cat(parts), torch.cat(owners)


def _merge_continuations(parts: list[Continuations], order_b: list[int], order_r: list[int], device) -> Continuations:
    """One :class:`Continuations` from those of groups of prompts, in the original order of prompts and rows."""
    inv_b = torch.as_tensor(order_b, device=device).argsort()
    inv_r = torch.as_tensor(order_r, device=device).argsort()
    Lc = max(p.token_logprobs.shape[1] for p in parts)

    def rows(name: str) -> torch.Tensor:
        out = []
        for p in parts:
            t = getattr(p, name)
            if t is None:
                t = torch.zeros_like(p.token_logprobs)
            out.append(F.pad(t, (0, Lc - t.shape[1])))
        return torch.cat(out)[inv_r]

    entropy = rows("entropy") if any(p.entropy is not None for p in parts) else None
    return Continuations(torch.cat([p.prompt_hidden for p in parts])[inv_b], rows("token_logprobs"), rows("mask"),
                         entropy, torch.cat([p.action_hidden for p in parts])[inv_r])


def _segment_log_softmax(scores: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Log-softmax over consecutive segments of ``scores`` (one segment per prompt)."""
    out, start = [], 0
    for n in sizes:
        out.append(F.log_softmax(scores[start : start + n], dim=-1))
        start += n
    return out
