"""Scoring candidate actions and evaluating recorded steps: plain functions over a forward engine.

A candidate's logit is its score from the model (:class:`ScoreRule`: the mean or sum of its tokens'
log-probs, or nothing) over the temperature, plus a policy head's output on its features where the
policy has one. Everything here asks the engine for token log-probs and features and applies heads;
none of it knows how the engine runs its passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rllama.policy.engine import Engine
from rllama.policy.outputs import CandidateOutputs, Continuations, StepEvaluation, _segment_log_softmax
from rllama.replies import constrained_logprobs


@dataclass(frozen=True)
class ScoreRule:
    """How candidates' logits are made from an engine's output.

    Args:
        normalization: ``"mean"``, ``"sum"``, ``"none"`` or ``"relative"`` (see
            :class:`~rllama.policy.PolicyModel`).
        temperature: the logits are the scores over it.
        policy_head: a head whose output on a candidate's features is added to its logit (``None``: none, as
            in the reference policy).
        reference: for ``"relative"``, a context in which the engine's passes are the base model's (the
            adapter disabled). The reference policy of a relative one is ``"none"`` with ``uniform_choices``:
            uniform.
        uniform_choices: a reply constrained to declared choices is uniform at each token where the choices
            branch (the reference of a relative policy); otherwise it is the model's own token log-probs
            renormalised over the allowed tokens, relative to the base model's under ``"relative"``.
    """

    normalization: str
    temperature: float
    policy_head: nn.Module | None = None
    reference: Callable[[], AbstractContextManager] | None = None
    uniform_choices: bool = False

    @property
    def uses_scores(self) -> bool:
        """Whether the logits include the model's own scores (without them no token log-prob is computed)."""
        return self.normalization != "none"

    @property
    def relative(self) -> bool:
        """Whether each score is measured against the base model's (and so needs a pass with the adapter disabled)."""
        return self.normalization == "relative"

    def __post_init__(self) -> None:
        if self.relative and self.reference is None:
            raise ValueError("relative scores need the context of the base model's passes (reference=)")

    def reference_encoding(self, engine: Engine, prompts, continuations, owner) -> Continuations | None:
        """The base model's token log-probs of the continuations, where the scores are relative (else ``None``);
        never with gradients: the base model is fixed."""
        if not self.relative:
            return None
        with torch.no_grad(), self.reference():
            return engine.encode(prompts, continuations, owner, temperature=self.temperature)

    def scores(self, enc: Continuations, reference: Continuations | None = None) -> torch.Tensor:
        """The model's score of each candidate ``[R]`` (relative: minus the base model's, from ``reference``)."""
        if not self.uses_scores:
            return enc.mask.new_zeros(enc.mask.shape[0], dtype=torch.float32)
        if self.normalization == "sum":
            return enc.token_logprobs.sum(-1)
        if self.relative:
            return _mean_score(enc) - _mean_score(reference)
        return _mean_score(enc)

    def logits(self, enc: Continuations, reference: Continuations | None = None) -> torch.Tensor:
        """The candidates' logits ``[R]``."""
        logits = self.scores(enc, reference) / self.temperature
        if self.policy_head is not None:
            logits = logits + self.policy_head(enc.action_hidden).squeeze(-1)
        return logits

    def choice_logprobs(self, enc: Continuations, reference: Continuations | None, start: int,
                        choice_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A reply constrained to ``choice_ids`` (rows ``start...`` of ``enc``) as one decision: each whole
        choice's log-probability ``[K]`` (the sum of its tokens', which sum to one over the choices) and each
        choice's tokens' ``[n_k]`` (:func:`~rllama.replies.constrained_logprobs` over the model's token
        log-probs, or their differences from the base model's, or zeros)."""
        rows = [enc.token_logprobs[start + k][: len(c)] for k, c in enumerate(choice_ids)]
        if self.uniform_choices:
            rows = [torch.zeros_like(r) for r in rows]
        elif self.relative:
            rows = [r - reference.token_logprobs[start + k][: len(c)] for k, (r, c) in enumerate(zip(rows, choice_ids))]
        per_token = [constrained_logprobs(rows, choice_ids, c)[0] for c in choice_ids]
        return torch.stack([t.sum() for t in per_token]), per_token


def _mean_score(enc: Continuations) -> torch.Tensor:
    """The mean log-prob over each candidate's text tokens plus its last (end-of-turn) token's ``[R]``. Averaging
    the end-of-turn token in with a one-token action word would halve the model's own preference."""
    summed = enc.token_logprobs.sum(-1)
    lengths = enc.mask.sum(-1)
    last = enc.token_logprobs.gather(1, (lengths.long() - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    text = (lengths - 1).clamp(min=1)
    return torch.where(lengths > 1, (summed - last) / text + last, summed)


def candidate_outputs(engine: Engine, heads: nn.ModuleDict, rule: ScoreRule, prompts, candidates,
                      q_heads: Sequence[str] = (), frozen_body: bool = False, scores: bool = True) -> CandidateOutputs:
    """The policy's log-probabilities over each prompt's candidates, the prompts' values and the state-action
    heads ``q_heads``' values (see :meth:`~rllama.policy.PolicyModel.candidate_outputs`)."""
    flat = [c for cands in candidates for c in cands]
    owner = [b for b, cands in enumerate(candidates) for _ in cands]
    with torch.no_grad() if frozen_body else contextlib.nullcontext():
        enc = engine.encode(prompts, flat, owner, temperature=rule.temperature, logprobs=scores and rule.uses_scores)
    reference = rule.reference_encoding(engine, prompts, flat, owner) if scores else None
    sizes = [len(c) for c in candidates]
    values = heads["value"](enc.prompt_hidden).squeeze(-1)
    q = {name: list(torch.split(heads[name](enc.action_hidden).squeeze(-1), sizes)) for name in q_heads}
    # without scores the logits are placeholders: the policy head's alone, as under "none"
    logits = rule.logits(enc, reference) if scores else replace(rule, normalization="none").logits(enc)
    return CandidateOutputs(_segment_log_softmax(logits, sizes), values, q)


def choice_outputs(engine: Engine, heads: nn.ModuleDict, rule: ScoreRule, prompts,
                   choice_ids) -> tuple[CandidateOutputs, list[list[torch.Tensor]]]:
    """The distribution of a reply constrained to each prompt's declared choices, without sampling it token by
    token: per prompt, each whole choice's log-probability (the sum of its tokens', which sum to one over the
    choices) and the prompts' values, and per prompt and choice its tokens' log-probs (what a generated step
    records). How a relative policy acts on declared choices (see :meth:`~rllama.policy.PolicyModel.choice_outputs`)."""
    flat = [list(c) for choices in choice_ids for c in choices]
    owner = [b for b, choices in enumerate(choice_ids) for _ in choices]
    enc = engine.encode(prompts, flat, owner, temperature=rule.temperature)
    reference = rule.reference_encoding(engine, prompts, flat, owner)
    logprobs, token_logprobs, start = [], [], 0
    for choices in choice_ids:
        whole, per_token = rule.choice_logprobs(enc, reference, start, choices)
        logprobs.append(whole)
        token_logprobs.append(per_token)
        start += len(choices)
    values = heads["value"](enc.prompt_hidden).squeeze(-1)
    return CandidateOutputs(logprobs, values, {}), token_logprobs


@torch.no_grad()
def features(engine: Engine, prompts, candidates, temperature: float = 1.0,
             batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The features heads read: ``(prompt [B, H], action [sum of K_b, H])``, in batches of prompts."""
    prompt_parts, action_parts = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = candidates[start:start + batch_size]
        flat = [c for cands in chunk for c in cands]
        owner = [b for b, cands in enumerate(chunk) for _ in cands]
        enc = engine.encode(prompts[start:start + batch_size], flat, owner, temperature=temperature, logprobs=False)
        prompt_parts.append(enc.prompt_hidden)
        action_parts.append(enc.action_hidden)
    return torch.cat(prompt_parts).float(), torch.cat(action_parts).float()


def evaluate_actions(engine: Engine, heads: nn.ModuleDict, rule: ScoreRule, steps, with_values: bool = True,
                     with_entropy: bool = True, frozen_body: bool = False, masks=None) -> StepEvaluation:
    """Recorded steps under the current weights, scored and generated alike, in one batched pass (see
    :meth:`~rllama.policy.PolicyModel.evaluate_actions`). ``masks``: per step ``None`` or the
    :class:`~rllama.replies.AllowedTokens` of a reply generated under a grammar (its log-probs are then
    those of the masked distribution)."""
    masks = masks or [None] * len(steps)
    prompts = [s.prompt_ids for s in steps]
    conts, owner, ent_rows, spans = [], [], [], []
    for i, (s, allowed) in enumerate(zip(steps, masks)):
        # a reply constrained to declared choices is evaluated from every choice's token log-probs
        rows = s.candidate_ids if s.is_scored else (s.choice_ids or [s.response_ids])
        spans.append((len(conts), len(rows)))
        conts.extend(rows)
        owner.extend([i] * len(rows))
        # the engine masks a grammar's reply (and gives the masked distribution's entropies)
        ent_rows.extend([allowed if allowed is not None else
                         with_entropy and not s.is_scored and not s.choice_ids] * len(rows))
    with torch.no_grad() if frozen_body else contextlib.nullcontext():
        enc = engine.encode(prompts, conts, owner, temperature=rule.temperature, entropy_rows=ent_rows,
                            logprobs=rule.uses_scores or not all(s.is_scored for s in steps))
    scored = any(s.is_scored for s in steps)
    chosen = any(not s.is_scored and s.choice_ids for s in steps)
    reference = rule.reference_encoding(engine, prompts, conts, owner) if scored or chosen else None
    logits = rule.logits(enc, reference) if scored else None  # [R], meaningful for scored rows
    dists, entropies, indices = [], [], []
    for s, (start, n) in zip(steps, spans):
        if s.is_scored:
            logp = F.log_softmax(logits[start : start + n], dim=-1)
            dists.append(logp)
            entropies.append(-(logp.exp() * logp).sum())
            indices.append(s.action_index)
        elif s.choice_ids:  # one decision among the choices: exact entropy (and KL) over the whole choices
            logp = rule.choice_logprobs(enc, reference, start, s.choice_ids)[0]
            dists.append(logp)
            entropies.append(-(logp.exp() * logp).sum())
            indices.append(s.unit_index)
        else:
            m = enc.mask[start].bool()
            dists.append(enc.token_logprobs[start][m])
            if with_entropy:
                entropies.append(enc.entropy[start][m].mean())
            indices.append(None)
    values = heads["value"](enc.prompt_hidden).squeeze(-1) if with_values else None
    entropy = torch.stack(entropies) if with_entropy else None
    return StepEvaluation(values, dists, entropy, indices)
