"""Sampling free-text replies: a plain function over a forward engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rllama.policy.engine import Engine
from rllama.policy.outputs import GeneratedReply
from rllama.replies import RowConstraints


@torch.no_grad()
def generate(
    engine: Engine,
    value_head: nn.Module,
    prompts: Sequence[Sequence[int]],
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    greedy: bool = False,
    stop_token_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    constraints: Sequence | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[GeneratedReply]:
    """Sample one reply per prompt from ``softmax(logits / temperature)``, with each token's log-probability
    and the prompt's value (``value_head`` on its last hidden state).

    Stops a row at the first stop token (kept in the reply, so training learns when to stop) or after
    ``max_new_tokens``. Finished rows leave the batch. ``constraints``: per prompt ``None`` or a
    :class:`~rllama.replies.ChoiceTrie` / :class:`~rllama.replies.GrammarConstraint`; that row samples only
    the tokens its shape allows (the log-probs are those of the masked distribution) and stops when the
    shape is complete. ``on_token(row, token_id)``, when given, is called for each token as it is chosen
    (streaming a reply as it is written).
    """
    constraints = RowConstraints(constraints, len(prompts))
    stop = set(int(t) for t in stop_token_ids)
    hidden, cache, mask, lengths = engine.prompt_states(prompts)
    values = value_head(hidden).squeeze(-1).tolist()
    exact = engine.parts.decodes_in_precision
    replies = [GeneratedReply([], [], v, exact) for v in values]
    active = torch.arange(len(prompts), device=hidden.device)
    positions = lengths.clone()
    for _ in range(max_new_tokens):
        logits = constraints.mask(engine.next_token_logits(hidden).float(), active.tolist())
        logp = F.log_softmax(logits / temperature, dim=-1)  # [A, V]
        if greedy:
            tokens = logp.argmax(-1)
        else:
            tokens = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(-1).to(hidden.device)
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
        keep = []
        for j, (row, tok, lp) in enumerate(zip(active.tolist(), tokens.tolist(), chosen.tolist())):
            replies[row].token_ids.append(tok)
            replies[row].token_logprobs.append(lp)
            if on_token is not None:
                on_token(row, tok)
            if tok not in stop and not constraints.advance(row, replies[row].token_ids):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            keep_t = torch.as_tensor(keep, device=hidden.device)
            cache.batch_select_indices(keep_t)
            active, tokens, mask, positions = active[keep_t], tokens[keep_t], mask[keep_t], positions[keep_t]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        hidden, cache = engine.decode(tokens, mask, positions, cache)
        positions = positions + 1
    return replies
