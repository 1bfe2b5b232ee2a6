"""Sampling free-text replies from a policy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from rllama.policy.forward import _cache_of
from rllama.policy.outputs import (
    GeneratedReply,
)


class GenerationMixin:
    """Sampling free-text replies from a :class:`~rllama.policy.PolicyModel`."""

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        greedy: bool = False,
        stop_token_ids: Iterable[int] = (),
        generator: torch.Generator | None = None,
    ) -> list[GeneratedReply]:
        """Sample one reply per prompt from ``softmax(logits / temperature)``.

        Stops a row at the first stop token (kept in the reply, so training learns when to stop)
        or after ``max_new_tokens``. Finished rows leave the batch.
        """
        stop = set(int(t) for t in stop_token_ids)
        hidden, cache, mask, lengths = self._forward_prompts(prompts, use_cache=True, bottom_kv=True)
        values = self.heads["value"](hidden).squeeze(-1).tolist()
        replies = [GeneratedReply([], [], v) for v in values]
        active = torch.arange(len(prompts), device=self.device)
        positions = lengths.clone()
        for _ in range(max_new_tokens):
            with self._autocast():
                logits = self._lm_head()(hidden)
            logp = F.log_softmax(logits.float() / self.temperature, dim=-1)  # [A, V]
            if greedy:
                tokens = logp.argmax(-1)
            else:
                tokens = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(-1).to(self.device)
            chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
            keep = []
            for j, (row, tok, lp) in enumerate(zip(active.tolist(), tokens.tolist(), chosen.tolist())):
                replies[row].token_ids.append(tok)
                replies[row].token_logprobs.append(lp)
                if tok not in stop:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):
                keep_t = torch.as_tensor(keep, device=self.device)
                cache.batch_select_indices(keep_t)
                active, tokens, mask, positions = active[keep_t], tokens[keep_t], mask[keep_t], positions[keep_t]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            with self._autocast():
                out = self._body()(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                    **self._cache_arg(cache), use_cache=True,
                )
            hidden, cache = out.last_hidden_state[:, -1], _cache_of(out)
            positions = positions + 1
        return replies
