"""Scoring candidate actions, features, evaluating recorded steps under the current weights, and the reference
policy's distributions."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from array import array
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rllama.policy.heads import POLICY_HEAD
from rllama.policy.outputs import (
    CandidateOutputs,
    Continuations,
    StepEvaluation,
    _segment_log_softmax,
)

REFERENCE_MEMO_ENTRIES = 100_000
"""Steps whose reference distributions a :class:`PolicyModel` with the prefix cache remembers (about 30 MB)."""


class ScoringMixin:
    """What a :class:`~rllama.policy.PolicyModel` computes for the agent and the algorithms: candidates' scores
    and values, features, the evaluation of recorded steps under the current weights, and the reference
    policy's distributions."""

    @property
    def uses_scores(self) -> bool:
        """Whether candidates' logits include the model's own scores (``score_normalization`` is not
        ``"none"``); without them a candidate's log-probs are not computed at all."""
        return self.score_normalization != "none"

    def values(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Value estimates ``[B]`` of the prompts."""
        hidden, _, _, _ = self._forward_prompts(prompts, use_cache=False)
        return self.heads["value"](hidden).squeeze(-1)

    def _candidate_scores(self, enc: Continuations) -> torch.Tensor:
        if not self.uses_scores:
            return enc.mask.new_zeros(enc.mask.shape[0], dtype=torch.float32)
        summed = enc.token_logprobs.sum(-1)  # [R]
        if self.score_normalization == "sum":
            return summed
        # "mean": the mean over the candidate's text tokens plus its last (end-of-turn) token. Averaging
        # the end-of-turn token in with a one-token action word would halve the model's own preference.
        lengths = enc.mask.sum(-1)
        last = enc.token_logprobs.gather(1, (lengths.long() - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        text = (lengths - 1).clamp(min=1)
        return torch.where(lengths > 1, (summed - last) / text + last, summed)

    def _policy_scores(self, enc: Continuations) -> torch.Tensor:
        """The candidates' logits ``[R]``: their scores over the temperature, plus the policy head's
        output on their features when the policy has one (:data:`POLICY_HEAD`; not in the reference)."""
        scores = self._candidate_scores(enc) / self.temperature
        if POLICY_HEAD in self.heads and not self._in_reference:
            scores = scores + self.heads[POLICY_HEAD](enc.action_hidden).squeeze(-1)
        return scores

    def score_candidates(
        self, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Policy log-probabilities over each prompt's candidate actions, and the prompts' values.

        Args:
            prompts: ``B`` token-id lists.
            candidates: for each prompt, the token ids of each candidate action.

        Returns:
            ``(logprobs, values)``: ``logprobs[b]`` is ``[K_b]`` (a log-softmax over prompt ``b``'s
            candidates); ``values`` is ``[B]``.
        """
        out = self.candidate_outputs(prompts, candidates)
        return out.logprobs, out.values

    def candidate_outputs(
        self,
        prompts: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[Sequence[int]]],
        q_heads: Sequence[str] = (),
        frozen_body: bool = False,
        scores: bool = True,
    ) -> CandidateOutputs:
        """Like :meth:`score_candidates`, plus the values of state-action heads ``q_heads``.

        With ``frozen_body`` the model runs without gradients (so the prefix cache serves every
        block it holds) and only the heads keep theirs: what a head-only update needs. With
        ``scores=False`` the candidates are not projected to the vocabulary (most of a cached
        pass's cost) and ``logprobs`` are uniform placeholders: for Q-value targets.
        """
        flat = [c for cands in candidates for c in cands]
        owner = [b for b, cands in enumerate(candidates) for _ in cands]
        with torch.no_grad() if frozen_body else contextlib.nullcontext():
            enc = self.continuation_logprobs(prompts, flat, owner, logprobs=scores and self.uses_scores)
        sizes = [len(c) for c in candidates]
        scores = self._policy_scores(enc)  # [R]
        values = self.heads["value"](enc.prompt_hidden).squeeze(-1)
        q = {name: list(torch.split(self.heads[name](enc.action_hidden).squeeze(-1), sizes)) for name in q_heads}
        return CandidateOutputs(_segment_log_softmax(scores, sizes), values, q)

    @torch.no_grad()
    def features(self, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]],
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states heads read: ``(prompt [B, H], action [sum of K_b, H])``, in batches of prompts."""
        prompt_parts, action_parts = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = candidates[start:start + batch_size]
            flat = [c for cands in chunk for c in cands]
            owner = [b for b, cands in enumerate(chunk) for _ in cands]
            enc = self.continuation_logprobs(prompts[start:start + batch_size], flat, owner, logprobs=False)
            prompt_parts.append(enc.prompt_hidden)
            action_parts.append(enc.action_hidden)
        return torch.cat(prompt_parts).float(), torch.cat(action_parts).float()

    def action_features(self, prompts, candidates, batch_size: int = 32) -> torch.Tensor:
        """The hidden states a state-action head reads, ``[sum of K_b, H]`` (see :meth:`features`)."""
        return self.features(prompts, candidates, batch_size)[1]

    def evaluate_actions(self, steps, with_values: bool = True, with_entropy: bool = True,
                 frozen_body: bool = False) -> StepEvaluation:
        """Re-evaluate stored steps under the current parameters (with gradients if enabled).

        One batched pass serves scored and generated steps alike. With ``frozen_body`` the model runs
        without gradients (through the prefix cache) and only the heads keep theirs.
        """
        prompts = [s.prompt_ids for s in steps]
        conts, owner, ent_rows, spans = [], [], [], []
        for i, s in enumerate(steps):
            rows = s.candidate_ids if s.is_scored else [s.response_ids]
            spans.append((len(conts), len(rows)))
            conts.extend(rows)
            owner.extend([i] * len(rows))
            ent_rows.extend([with_entropy and not s.is_scored] * len(rows))
        with torch.no_grad() if frozen_body else contextlib.nullcontext():
            enc = self.continuation_logprobs(prompts, conts, owner, entropy_rows=ent_rows,
                                             logprobs=self.uses_scores or not all(s.is_scored for s in steps))
        scores = self._policy_scores(enc)  # [R], meaningful for scored rows
        dists, entropies, indices = [], [], []
        for s, (start, n) in zip(steps, spans):
            if s.is_scored:
                logp = F.log_softmax(scores[start : start + n], dim=-1)
                dists.append(logp)
                entropies.append(-(logp.exp() * logp).sum())
                indices.append(s.action_index)
            else:
                m = enc.mask[start].bool()
                dists.append(enc.token_logprobs[start][m])
                if with_entropy:
                    entropies.append(enc.entropy[start][m].mean())
                indices.append(None)
        values = self.heads["value"](enc.prompt_hidden).squeeze(-1) if with_values else None
        entropy = torch.stack(entropies) if with_entropy else None
        return StepEvaluation(values, dists, entropy, indices)

    def evaluate(self, steps, **kwargs) -> StepEvaluation:
        """Deprecated name of :meth:`evaluate_actions` (``agent.evaluate`` plays episodes; this scores steps)."""
        warnings.warn("PolicyModel.evaluate is renamed evaluate_actions", DeprecationWarning, stacklevel=2)
        return self.evaluate_actions(steps, **kwargs)

    @torch.no_grad()
    def reference_distributions(self, steps, batch_size: int = 16) -> list[torch.Tensor]:
        """Each step's action distribution under the reference policy (the base model, adapter disabled).

        The reference never changes, so with the prefix cache active each distinct step (prompt
        and candidates, or prompt and reply) is computed once and remembered, up to
        ``REFERENCE_MEMO_ENTRIES`` steps (least recently used forgotten): a state met again costs
        nothing in later updates. Without the cache every call computes afresh (so that resumed
        runs stay bit for bit).
        """
        memo = self._reference_memo if self.prefix_cache_active else None
        keys = [self._step_key(s) for s in steps] if memo is not None else [None] * len(steps)
        out: list[torch.Tensor | None] = [None] * len(steps)
        todo = []
        for i, key in enumerate(keys):
            if key is not None and key in memo:
                memo.move_to_end(key)
                out[i] = memo[key]
            else:
                todo.append(i)
        with self.reference():
            for start in range(0, len(todo), batch_size):
                part = todo[start : start + batch_size]
                ev = self.evaluate_actions([steps[i] for i in part], with_values=False, with_entropy=False)
                for i, dist in zip(part, ev.distributions):
                    out[i] = dist
                    if memo is not None:
                        memo[keys[i]] = dist
        while memo is not None and len(memo) > REFERENCE_MEMO_ENTRIES:
            memo.popitem(last=False)
        return out

    def _score_keys(self, prompts, continuations, owner) -> list[bytes]:
        """Per continuation, a digest of what its token log-probs depend on besides the weights: the
        temperature, its prompt and its tokens."""
        heads = []
        for ids in prompts:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.temperature!r}|".encode())
            h.update(array("l", ids).tobytes())
            heads.append(h)
        keys = []
        for c, b in zip(continuations, owner):
            h = heads[b].copy()
            h.update(b"|")
            h.update(array("l", c).tobytes())
            keys.append(h.digest())
        return keys

    def _step_key(self, step) -> bytes:
        """A digest of what defines a step's reference distribution (its tokens and the scoring settings)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.temperature!r}|{self.score_normalization}|{step.is_scored}".encode())
        for ids in [step.prompt_ids, *(step.candidate_ids or [step.response_ids])]:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(array("l", ids).tobytes())
        return h.digest()
