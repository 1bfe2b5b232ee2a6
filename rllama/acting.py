"""Choosing actions. An :class:`Actor` turns an agent's prompts into :class:`~rllama.algorithms.Step`\\ s:
it scores the candidate actions, or generates a reply, through the agent's backend (a relative policy's
reply to declared choices through the learner); samples the choice (or, greedy, takes the likeliest);
and reads the environment action off the reply with the agent's ``extract_action`` hook, falling back
to ``fallback_action`` when a generated reply cannot be parsed."""

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

INVALID_WARNING_AFTER = 32
"""Generated replies after which the agent warns (once) if most of them were invalid."""


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
    format_penalty: float  # added to the shaping of a step whose generated reply is invalid
    reply_prefix_ids: list[int]  # the agent's reply_prefix, written before every generated reply

    def extract_action(self, response: str) -> Any: ...


class Actor:
    """How ``agent`` chooses its actions."""

    def __init__(self, agent: ActingAgent) -> None:
        self.agent = agent
        self.greedy = False  # take the likeliest action instead of sampling (evaluation)
        self.parse_failures = 0  # generated replies extract_action failed on, since the last update
        self.replies = 0  # generated replies, since the last update
        self.invalid_replies = 0  # of which invalid (extract_action failed, or is_valid_reply said no)
        self._seen_replies = self._seen_invalid = 0  # since the agent was built (for the warning)
        self._warned_fallback = False
        self._warned_invalid = False

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
            # a relative policy's reply to declared choices is measured against the base model: in this process
            relative = [i for i in generated if choice_ids[i] is not None and policy.score_normalization == "relative"]
            if relative:
                self._choose_relative(relative, prompts, steps, choice_ids, training)
            sampled = [i for i in generated if i not in relative]
            if sampled:
                self._generate(sampled, prompts, steps, choice_ids, grammars)
        for step, observation in zip(steps, observations):
            if step.is_scored:
                step.action = agent.hooks.call("extract_action", step.text)
                agent.hooks.check_action(step.action, step.text)
            else:
                step.action, parsed = self._parse(observation, step.text)
                self._check_reply(step, parsed)
        return steps

    def take_reply_counts(self) -> tuple[int, int, int]:
        """``(replies, invalid, parse failures)`` since the last call, and start counting again."""
        counts = (self.replies, self.invalid_replies, self.parse_failures)
        self.replies = self.invalid_replies = self.parse_failures = 0
        return counts

    def add_reply_counts(self, replies: int, invalid: int, parse_failures: int) -> None:
        """Count replies generated elsewhere (an asynchronous worker's)."""
        self.replies += int(replies)
        self.invalid_replies += int(invalid)
        self.parse_failures += int(parse_failures)

    def _check_reply(self, step: Step, parsed: bool) -> None:
        """Mark a generated reply invalid (unparsed, or refused by ``is_valid_reply``), penalise it with the
        agent's ``format_penalty``, count it, and warn once when most replies so far are invalid."""
        agent = self.agent
        step.invalid_reply = not parsed or not agent.hooks.reply_is_valid(step.text)
        if step.invalid_reply:
            step.shaping += agent.format_penalty
        self.replies += 1
        self.invalid_replies += step.invalid_reply
        self._seen_replies += 1
        self._seen_invalid += step.invalid_reply
        seen, invalid = self._seen_replies, self._seen_invalid
        if not self._warned_invalid and seen >= INVALID_WARNING_AFTER and invalid > seen / 2:
            self._warned_invalid = True
            logger.warning(
                "%d of the first %d generated replies are not in the form %s reads (the last: %r). Declare a "
                "reply_shape (generation constrained to it: every reply parses), set reply_prefix, or set "
                "format_penalty (e.g. -0.1) so that invalid replies cost something; docs/porting.md, "
                "\"Replies that parse\". (Warned once.)", invalid, seen, type(agent).__name__, step.text)

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
                token_logprobs=reply.token_logprobs, value=reply.value,
                # the text extract_action reads starts with the reply prefix (the prompt's last tokens)
                text=agent.chat.decode_reply(agent.reply_prefix_ids + list(reply.token_ids)),
                # sampled with other numerics than the learner's: it recomputes the step before the update
                learner_recompute=not (agent.backend.provides_values and reply.exact) or math.isnan(reply.value),
                policy_version=agent.algorithm.num_updates,
                choice_ids=choice_ids[i], reply_grammar=grammars[i],  # the declared reply shape, if any
            )

    def _choose_relative(self, rows, prompts, steps, choice_ids, training: bool) -> None:
        """Replies to declared choices under a relative policy: the whole choices' distribution from the learner
        (:meth:`~rllama.policy.PolicyModel.choice_outputs`), a choice sampled from it (greedy: the likeliest
        whole choice, which is the token-by-token argmax where the choices branch once), recorded as a
        generated step with its tokens' log-probs."""
        agent = self.agent
        outputs, token_logprobs = agent.policy.choice_outputs([prompts[i] for i in rows], [choice_ids[i] for i in rows])
        picks = agent.algorithm.choose_actions(outputs, greedy=self.greedy, generator=agent.generator,
                                               training=training)
        for j, (i, (k, logprob)) in enumerate(zip(rows, picks)):
            reply = list(choice_ids[i][k])
            steps[i] = Step(
                prompt_ids=prompts[i], response_ids=reply, logprob=logprob,
                token_logprobs=token_logprobs[j][k].float().tolist(), value=float(outputs.values[j]),
                text=agent.chat.decode_reply(agent.reply_prefix_ids + reply),
                learner_recompute=False, policy_version=agent.algorithm.num_updates, choice_ids=choice_ids[i],
            )

    def _parse(self, observation, text: str):
        """``(action, parsed)``: ``extract_action``'s, or ``fallback_action``'s where it failed."""
        hooks = self.agent.hooks
        try:
            action = self.agent.extract_action(text)
            if action is None:
                raise ValueError("extract_action returned None")
            hooks.check_action(action, text)
            return action, True
        except Exception as exc:  # generate mode: unparseable text falls back, counted in the stats
            self.parse_failures += 1
            if not self._warned_fallback:
                logger.warning("extract_action failed on %r (%s: %s); using fallback_action (warned once)",
                               text, type(exc).__name__, exc)
                self._warned_fallback = True
            action = hooks.call("fallback_action", observation, text)
            hooks.check_action(action, text)
            return action, False
