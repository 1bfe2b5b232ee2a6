"""The acting interface every backend implements, the in-process backend, and choosing one."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from rllama.policy.model import CandidateOutputs, GeneratedReply

logger = logging.getLogger(__name__)


class Backend(ABC):
    """The acting interface: score candidates, sample replies, hear about updates.

    Attributes:
        provides_values: whether :meth:`candidate_outputs` and :meth:`generate` give the value head's
            estimates (and Q heads). When ``False`` the values are NaN and the steps are marked for the
            learner to recompute.
    """

    provides_values: bool = True

    def bind(self, policy) -> None:
        """Called once by the agent with its policy (the learner's model)."""
        self.policy = policy

    @abstractmethod
    def candidate_outputs(self, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]],
                          q_heads: Sequence[str] = ()) -> CandidateOutputs:
        """Per prompt, the log-probabilities over its candidates, the values (NaN when not provided) and Q heads."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, greedy: bool,
                 stop_token_ids: Sequence[int], generator: torch.Generator | None,
                 constraints: Sequence | None = None) -> list[GeneratedReply]:
        """One sampled (or greedy) reply per prompt: token ids and their log-probabilities. ``constraints``:
        per prompt ``None`` or the :class:`~rllama.replies.ChoiceTrie` / :class:`~rllama.replies.GrammarConstraint`
        its reply must follow (the log-probs are then those of the constrained distribution)."""

    def after_update(self, policy) -> None:  # noqa: B027 (a hook: most backends need nothing)
        """The learner's weights changed (called after each update, with the agent's adapter active)."""

    def update_stats(self) -> dict[str, float]:
        """Statistics of the acting since the last update, added to the update's (``engine/...``)."""
        return {}


class InProcessBackend(Backend):
    """The agent's own policy model, in this process (the default)."""

    def candidate_outputs(self, prompts, candidates, q_heads=()):
        return self.policy.candidate_outputs(prompts, candidates, q_heads=q_heads)

    def generate(self, prompts, max_new_tokens, greedy, stop_token_ids, generator, constraints=None):
        return self.policy.generate(prompts, max_new_tokens=max_new_tokens, greedy=greedy,
                                    stop_token_ids=stop_token_ids, generator=generator, constraints=constraints)


BACKEND_NAMES = ("auto", "torch", "llamacpp")
"""What ``backend=`` accepts besides a :class:`Backend`."""


def make_backend(backend, policy=None, generates: bool = False, lazy: bool = False) -> Backend:
    """The backend ``backend`` names, for an agent on ``policy`` that ``generates`` its replies.

    ``None`` or ``"auto"``: :class:`~rllama.backends.LlamaCppBackend` for an agent that generates, on a
    CPU, when llama-cpp-python is installed and the model has a GGUF counterpart (the embedded default
    model); otherwise :class:`InProcessBackend`. With ``lazy`` (an agent that may never generate on it),
    llama.cpp loads at the first reply it generates. ``"torch"``: :class:`InProcessBackend`.
    ``"llamacpp"``: :class:`~rllama.backends.LlamaCppBackend` (an error saying why when it cannot
    run). A :class:`Backend` is used as it is.
    """
    if isinstance(backend, Backend):
        return backend
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKEND_NAMES))}, None "
                         "or a rllama.backends.Backend")
    if backend == "torch":
        return InProcessBackend()
    from rllama.backends import llamacpp

    if backend == "llamacpp":
        llamacpp.llama_cpp_module()  # installed, or an error saying how
        return llamacpp.LlamaCppBackend()
    if generates and policy is not None and llamacpp.engine_serves(policy):
        logger.info("generating on llama.cpp (%s); backend='torch' generates in this process",
                    llamacpp.gguf_of(policy).name)
        return llamacpp.LlamaCppBackend(lazy=lazy)
    return InProcessBackend()


def check_can_serve(backend: Backend, algorithm, policy) -> None:
    """Raise ``ValueError`` when ``backend`` cannot act for ``algorithm`` on ``policy``: a backend without
    the learner's heads (:attr:`Backend.provides_values` false) serves neither Q heads nor a policy head, nor
    scores relative to the base model."""
    from rllama.policy.model import POLICY_HEAD

    if algorithm.acting_heads and not backend.provides_values:
        raise ValueError(f"algorithm {algorithm.name!r} acts on Q heads {list(algorithm.acting_heads)}, "
                         f"which {type(backend).__name__} does not serve; use the in-process backend")
    if POLICY_HEAD in policy.heads and not backend.provides_values:
        raise ValueError(f"a policy head (the on-policy policy_head > 0, or SAC's actor with its default "
                         f"train_adapter=False) adds to the candidates' scores in this process; "
                         f"{type(backend).__name__} cannot serve it: use the in-process backend, or "
                         f"policy_head=0 / SAC's train_adapter=True and whiten_features=0")
    if policy.score_normalization == "relative" and not backend.provides_values:
        raise ValueError(f"score_normalization='relative' measures each candidate's score against the base model's "
                         f"(the adapter disabled) in this process; {type(backend).__name__} scores on a server: "
                         f"use 'mean' there, or the in-process backend")
