"""The forward-engine interface: how a policy's forward passes run, behind a handful of methods.

An engine turns token ids into what the policy needs: the log-probability of each token of
continuations after their prompts with the features heads read (:meth:`Engine.encode`), the prompts'
features alone (:meth:`Engine.encode_prompts`), and the states generation starts from and extends
(:meth:`Engine.prompt_states`, :meth:`Engine.decode`). It is given the model's parts
(:class:`ModelParts`: the body, the projection to the vocabulary, the precision) and never the policy,
so an engine can be read, tested and replaced on its own: :class:`~rllama.policy.engine.PlainEngine` is
the reference every other engine is tested against through this same interface.

An engine that keeps states between calls drops them in :meth:`Engine.invalidate`: those that depend on
the adapters when adapters are added, loaded or deleted, all of them when the base weights were changed by
hand or a run must start from a known state (a checkpoint saved, a segment begun: what is kept decides how
a pass is split, and so its last bits).
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rllama.errors import RLlamaError
from rllama.policy.outputs import Continuations


@dataclass
class ModelParts:
    """What an engine runs: a causal LM's body and output projection, and how.

    Args:
        body: the transformer body (``LlamaModel``, ``GPT2Model`` …, the LoRA layers inside it): token
            ids in, last hidden states (after the final norm) out.
        lm_head: the projection of hidden states to the vocabulary.
        pad_id: the token id put at padded positions (never attended to).
        device: where the model runs.
        precision: ``"fp32"``, or ``"bf16"`` for bfloat16 autocast of the matmuls.
        min_shared_prefix: a prefix shared by every prompt of a batch runs once for the batch when at
            least this long.
    """

    body: nn.Module
    lm_head: nn.Module
    pad_id: int
    device: torch.device
    precision: str = "fp32"
    min_shared_prefix: int = 8
    _cache_name: str = field(default="", init=False, repr=False)

    def autocast(self):
        """The autocast context of this precision (none in fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def decode_autocast(self):
        """The autocast context of generation's one-token decode steps: none on a CPU, where casting the
        float32 weights to bf16 at every matmul costs more than the bf16 matmul saves on a step's few rows
        (measured on a 2-core Xeon, SmolLM2-135M, one thread: 168 → 68 ms a step at 1 row, 315 → 259 at
        16), else :meth:`autocast`."""
        return contextlib.nullcontext() if self.device.type == "cpu" else self.autocast()

    @property
    def decodes_in_precision(self) -> bool:
        """Whether generation's decode steps run in the precision the learner trains in (see
        :meth:`decode_autocast`); when not, the sampled log-probs differ from the learner's slightly."""
        return self.precision == "fp32" or self.device.type != "cpu"

    @property
    def eager_attention(self) -> bool:
        """Whether the model's attention takes additive float masks (``"eager"``) rather than boolean ones."""
        return getattr(self.body.config, "_attn_implementation", "sdpa") == "eager"

    @property
    def mask_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else next(self.body.parameters()).dtype

    def cache_arg(self, cache) -> dict:
        """The key/value cache argument under the name this transformers version takes (``cache`` from 5.x on,
        ``past_key_values`` before)."""
        if not self._cache_name:
            params = inspect.signature(type(self.body).forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return {self._cache_name: cache}


def cache_of(output):
    """The key/value cache of a model output (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class PromptStates(NamedTuple):
    """Prompts read by the whole model, ready to be extended token by token (see :meth:`Engine.prompt_states`)."""

    hidden: torch.Tensor  # [B, H] the last hidden state of each prompt
    cache: object  # the key/value cache of every block, prompts left-padded
    mask: torch.Tensor  # [B, L] 1 at real positions
    lengths: torch.Tensor  # [B] tokens of each prompt


class Engine(ABC):
    """The interface every forward engine implements, and what they share: checking inputs, projecting hidden
    states to token log-probabilities, decoding one generated token.

    Args:
        parts: the model to run (:class:`ModelParts`).
    """

    def __init__(self, parts: ModelParts) -> None:
        self.parts = parts

    # ------------------------------------------------------------------ the interface
    def encode(self, prompts, continuations, owner, *, temperature: float = 1.0, entropy_rows=None,
               logprobs: bool = True) -> Continuations:
        """Log-probability of each token of each continuation given its prompt, and the features heads read.

        Args:
            prompts: ``B`` token-id lists.
            continuations: ``R`` non-empty token-id lists.
            owner: ``R`` prompt indices: continuation ``r`` follows prompt ``owner[r]``.
            temperature: token log-probs are ``log_softmax(logits / temperature)``.
            entropy_rows: rows whose next-token entropies are wanted (``None``: none). A row's entry may be a
                :class:`~rllama.replies.AllowedTokens` instead: its tokens' log-probs and entropies are then
                those of the distribution restricted to the allowed tokens at each position (a reply
                generated under a declared grammar).
            logprobs: ``False`` skips the projection to the vocabulary (the log-probs are then zeros): for
                callers that want only the features, such as Q heads.

        Gradients flow to the adapters and heads when enabled.
        """
        check_batch(prompts, continuations, owner)
        return self._encode(prompts, continuations, owner, float(temperature), entropy_rows, logprobs)

    def encode_prompts(self, prompts) -> torch.Tensor:
        """The last hidden state ``[B, H]`` of each prompt (what a value head reads)."""
        check_batch(prompts)
        return self.forward_prompts(prompts, use_cache=False).hidden

    def prompt_states(self, prompts) -> PromptStates:
        """The prompts read by every block, with the key/value cache :meth:`decode` extends."""
        check_batch(prompts)
        return self.forward_prompts(prompts, use_cache=True, every_block=True)

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        """One generated token per row: ``tokens`` ``[A]`` at ``positions`` ``[A]`` after ``cache``, whose real
        positions ``mask`` ``[A, L]`` marks (the new token's included). Returns ``(hidden [A, H], cache)``."""
        p = self.parts
        with p.decode_autocast():
            out = p.body(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         **p.cache_arg(cache), use_cache=True)
        return out.last_hidden_state[:, -1], cache_of(out)

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits ``[A, V]`` of the next token after generation's hidden states ``[A, H]`` (in the
        precision of :meth:`decode`)."""
        head = self.parts.lm_head
        with self.parts.decode_autocast():
            return head(hidden.to(head.weight.dtype) if self.parts.device.type == "cpu" else hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The projection of hidden states ``[..., H]`` to the vocabulary ``[..., V]``."""
        with self.parts.autocast():
            return self.parts.lm_head(hidden)

    def invalidate(self, adapters_only: bool = False) -> None:
        """Forget every state kept between calls (nothing, for an engine that keeps none); with ``adapters_only``,
        what depends on the adapters (they were added, loaded or deleted)."""
        return None  # an engine that keeps nothing has nothing to forget

    def stats(self) -> dict:
        """What the engine keeps between calls (``{}`` when nothing)."""
        return {}

    # ------------------------------------------------------------------ for implementations
    @abstractmethod
    def _encode(self, prompts, continuations, owner, temperature, entropy_rows, logprobs) -> Continuations:
        """:meth:`encode` of checked inputs (an engine's own way of running the passes)."""

    @abstractmethod
    def forward_prompts(self, prompts, use_cache: bool, every_block: bool = False) -> PromptStates:
        """Left-padded forward of the prompts; with ``use_cache`` the returned cache can be extended (with
        ``every_block``, by every block: what generation extends)."""

    def project(self, prompt_hidden, hidden, continuations, temperature, entropy_rows, logprobs,
                known=None) -> Continuations:
        """The :class:`Continuations` of hidden states ``hidden`` ``[R, Lc, H]`` (position ``j`` predicts token
        ``j`` of row ``r``'s continuation).

        ``known[r]``, where given and not ``None``, holds row ``r``'s token log-probs already: those rows are
        not projected to the vocabulary (the projection is a fifth of a small model's cost).
        """
        device = self.parts.device
        R, Lc = len(continuations), max(len(c) for c in continuations)
        cont = torch.full((R, Lc), self.parts.pad_id, dtype=torch.long)
        cmask = torch.zeros((R, Lc), dtype=torch.long)
        for r, c in enumerate(continuations):
            cont[r, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            cmask[r, : len(c)] = 1
        cont, cmask = cont.to(device), cmask.to(device)
        # The state after reading a continuation's text: the position that predicts its last token
        # (the end-of-turn token for candidates), so the text itself is seen in full.
        last = cmask.sum(-1) - 1
        action_hidden = hidden[torch.arange(R, device=device), last]
        token_logprobs = torch.zeros((R, Lc), dtype=torch.float32, device=device)
        if not logprobs:
            return Continuations(prompt_hidden, token_logprobs, cmask, None, action_hidden)
        todo = torch.ones(R, dtype=torch.bool)
        for r, logp in enumerate(known or ()):
            if logp is not None:
                token_logprobs[r, : len(logp)] = logp
                todo[r] = False
        rows, cols = (cmask * todo.to(device)[:, None]).nonzero(as_tuple=True)  # the real positions to project
        logits = self.logits(hidden[rows, cols]).float()  # [N, V]
        allowed = allowed_positions(entropy_rows, rows, cols, logits.shape[-1])
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(device), float("-inf"))
        logp = F.log_softmax(logits / temperature, dim=-1)
        token_logprobs = token_logprobs.index_put((rows, cols), logp.gather(-1, cont[rows, cols, None]).squeeze(-1))
        entropy = None
        if entropy_rows is not None and any(entropy_rows):
            want = torch.as_tensor([bool(e) for e in entropy_rows], dtype=torch.bool, device=device)[rows]
            ent = torch.zeros((R, Lc), dtype=torch.float32, device=device)
            lp = logp[want].clamp_min(torch.finfo(logp.dtype).min)  # masked tokens: 0 * (-inf) would be NaN
            entropy = ent.index_put((rows[want], cols[want]), -(lp.exp() * lp).sum(-1))
        return Continuations(prompt_hidden, token_logprobs, cmask, entropy, action_hidden)


def allowed_positions(entropy_rows, rows: torch.Tensor, cols: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """The allowed tokens ``[N, vocab]`` (bool) at the projected positions ``(rows, cols)``, from the rows of
    ``entropy_rows`` that carry a mask (``AllowedTokens``); ``None`` where none does."""
    masked = [(r, e.mask) for r, e in enumerate(entropy_rows or ()) if hasattr(e, "mask")]
    if not masked:
        return None
    allowed = torch.ones((len(rows), vocab), dtype=torch.bool)
    rows_cpu, cols_cpu = rows.cpu(), cols.cpu()
    for r, mask in masked:
        at = (rows_cpu == r).nonzero(as_tuple=True)[0]
        if len(at) > mask.shape[0]:
            raise ValueError(f"row {r}: {len(at)} reply tokens but allowed tokens for {mask.shape[0]} positions")
        width = min(vocab, mask.shape[1])
        allowed[at] = False
        allowed[at, :width] = mask[cols_cpu[at], :width]
    return allowed


def check_batch(prompts, continuations=None, owner=None) -> None:
    """Errors for a batch no engine can run: an empty prompt or continuation, owners that do not match."""
    if continuations is not None:
        if len(continuations) != len(owner):
            raise ValueError(f"{len(continuations)} continuations but {len(owner)} owners")
        if any(len(c) == 0 for c in continuations):
            raise RLlamaError("every continuation must hold at least one token")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RLlamaError("every prompt must hold at least one token")
