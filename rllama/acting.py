"""Choosing actions. An :class:`Actor` turns an agent's prompts into :class:`~rllama.algorithms.Step`\\ s:
it scores the candidate actions, or generates a reply, through the agent's backend; samples the
choice (or, greedy, takes the likeliest); and reads the environment action off the reply with the
agent's ``extract_action`` hook, falling back to ``fallback_action`` when a generated reply cannot
be parsed."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from rllama.algorithms import Algorithm, Step
from rllama.backends import Backend
from rllama.errors import RLlamaError
from rllama.hooks import Hooks, short
from rllama.policy import PolicyModel
from rllama.prompting import ChatFormat
from rllama.replies import ChoiceTrie

logger = logging.getLogger(__name__)


class ActingAgent(Protocol):
    """What an :class:`Actor` reads off the agent it chooses actions for (:class:`rllama.RLlamaAgent` is
    one). Stated here rather than imported, so that this module needs nothing from :mod:`rllama.agent`."""

    policy: PolicyModel
    adapter_name: str  # the LoRA adapter it acts with
    algorithm: Algorithm
    backend: Backend
    chat: ChatFormat
    hooks: Hooks
    generator: torch.Generator
    max_new_tokens: int

    def extract_action(self, response: str) -> Any: ...


class Actor:
    """How ``agent`` chooses its actions."""

    def __init__(self, agent: ActingAgent) -> None:
        self.agent = agent
        self.greedy = False  # take the likeliest action instead of sampling (evaluation)
        self.parse_failures = 0  # generated replies extract_action failed on, since the last update
        self._warned_fallback = False

    def steps(self, observations: Sequence, prompts: list[list[int]], candidates: list[list[str] | None],
              candidate_ids: list[list[list[int]] | None], training: bool,
              choice_ids: list[list[list[int]] | None] | None = None,
              grammars: list[str | None] | None = None) -> list[Step]:
        """One step per observation, its action chosen: scored among its candidates (texts, and their
        reply token ids), or generated where its candidates are ``None`` (constrained to ``choice_ids``
        where given: :mod:`rllama.replies`)."""
        choice_ids = choice_ids or [None] * len(observations)
        grammars = grammars or [None] * len(observations)
        agent = self.agent
        scored = [i for i, c in enumerate(candidates) if c is not None]
        generated = [i for i, c in enumerate(candidates) if c is None]
        if generated:
            self._check_can_generate(agent.algorithm, observations[generated[0]], training)
        steps: list[Step] = [None] * len(observations)  # type: ignore[list-item]
        policy = agent.policy
        with torch.no_grad(), policy.lock, policy.using_adapter(agent.adapter_name):
            if scored:
                self._score(scored, prompts, candidates, candidate_ids, steps, training)
            if generated:
                self._generate(generated, prompts, steps, choice_ids, grammars)
        for step, observation in zip(steps, observations):
            if step.is_scored:
                step.action = agent.hooks.call("extract_action", step.text)
                agent.hooks.check_action(step.action, step.text)
            else:
                step.action = self._parse(observation, step.text)
        return steps

    @staticmethod
    def _check_can_generate(algorithm, observation, training: bool) -> None:
        if algorithm.requires_candidates:
            raise RLlamaError(
                f"{type(algorithm).__name__} is value-based and needs a discrete set of candidate actions, "
                f"but get_valid_actions({short(observation)}) returned None (free text). "
                "Implement get_valid_actions(observation) or set action_names on the agent."
            )
        if training and not algorithm.trains_adapter:
            # Said now rather than at the first update, hundreds of steps later.
            raise RLlamaError(
                f"{type(algorithm).__name__} trains heads on a frozen adapter (train_adapter=False), which "
                f"needs scored steps, but get_valid_actions({short(observation)}) returned None "
                "(free text). Set train_adapter=True (or policy_head=0), or have the agent's scores_actions() "
                "return False so that the defaults train the adapter."
            )

    def _score(self, rows, prompts, candidates, candidate_ids, steps, training: bool) -> None:
        agent = self.agent
        cand_ids = [candidate_ids[i] for i in rows]
        outputs = agent.backend.candidate_outputs([prompts[i] for i in rows], cand_ids,
                                                  q_heads=agent.algorithm.acting_heads)
        choices = agent.algorithm.choose_actions(outputs, greedy=self.greedy, generator=agent.generator,
                                                 training=training)
        for j, (i, (k, logprob)) in enumerate(zip(rows, choices)):
            steps[i] = Step(
                prompt_ids=prompts[i], candidate_ids=cand_ids[j], action_index=k, logprob=logprob,
                value=float(outputs.values[j]), text=candidates[i][k],
                learner_recompute=not agent.backend.provides_values, policy_version=agent.algorithm.num_updates,
            )

    def _generate(self, rows, prompts, steps, choice_ids, grammars) -> None:
        agent = self.agent
        constraints = [ChoiceTrie(choice_ids[i]) if choice_ids[i] is not None
                       else agent.reply_grammars.constraint(grammars[i]) if grammars[i] is not None else None
                       for i in rows]
        replies = agent.backend.generate(
            [prompts[i] for i in rows], max_new_tokens=agent.max_new_tokens, greedy=self.greedy,
            stop_token_ids=agent.chat.end_of_turn_ids, generator=agent.generator,
            **({"constraints": constraints} if any(c is not None for c in constraints) else {}),
        )
        for i, reply in zip(rows, replies):
            steps[i] = Step(
                prompt_ids=prompts[i], response_ids=reply.token_ids, logprob=float(sum(reply.token_logprobs)),
                token_logprobs=reply.token_logprobs, value=reply.value, text=agent.chat.decode_reply(reply.token_ids),
                # sampled with other numerics than the learner's: it recomputes the step before the update
                learner_recompute=not (agent.backend.provides_values and reply.exact) or math.isnan(reply.value),
                policy_version=agent.algorithm.num_updates,
                choice_ids=choice_ids[i], reply_grammar=grammars[i],  # the declared reply shape, if any
            )

    def _parse(self, observation, text: str):
        hooks = self.agent.hooks
        try:
            action = self.agent.extract_action(text)
            if action is None:
                raise ValueError("extract_action returned None")
            hooks.check_action(action, text)
            return action
        except Exception as exc:  # generate mode: unparseable text falls back, counted in the stats
            self.parse_failures += 1
            if not self._warned_fallback:
                logger.warning("extract_action failed on %r (%s: %s); using fallback_action (warned once)",
                               text, type(exc).__name__, exc)
                self._warned_fallback = True
            action = hooks.call("fallback_action", observation, text)
            hooks.check_action(action, text)
            return action
