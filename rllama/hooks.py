"""An agent's hooks: :class:`AgentHooks` declares the ones a subclass writes, with the defaults of
the optional ones, and :class:`Hooks` calls them checked: an exception inside a hook, or a value of
the wrong kind, becomes a :class:`~rllama.errors.HookError` that names the hook and what it was
given."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from rllama.errors import HookError, InvalidActionError, RLlamaError
from rllama.fileio import utf8_problem


class AgentHooks(ABC):
    """The hooks of :class:`rllama.RLlamaAgent`: three to write, the rest optional."""

    action_space = None  # a Gymnasium space, set by the agent

    @abstractmethod
    def get_system_prompt(self) -> str:
        """The system message that opens every episode's chat."""

    @abstractmethod
    def format_observation(self, observation) -> str:
        """Text of an observation, sent to the model as the user's message."""

    @abstractmethod
    def extract_action(self, response: str):
        """The environment action for the model's reply (a generated text or a chosen candidate)."""

    action_names: Sequence[str] | None = None
    """Optional names of a ``Discrete`` action space's actions; used as the candidates when set."""

    keep_history: bool | str = "auto"
    """Whether a prompt shows the episode's earlier turns. ``False`` where an observation is the whole
    state (Blackjack, a rendered grid): each prompt is then the system prompt and the current
    observation alone, shorter, the same for a state whenever it is met, and served from the prefix
    cache after the first time. ``True`` where earlier turns matter (a text game's room descriptions).
    ``"auto"`` (default): ``True`` when the observation is text (a ``str``) or the agent has working
    memory, ``False`` for a structured observation (a number, a tuple, an array: usually the env's
    state), which the agent says once in a log line."""

    reply_shape = None
    """What a generated reply must look like: ``None`` (free text, the default), or
    :class:`~rllama.replies.Choices`, :class:`~rllama.replies.Regex` or :class:`~rllama.replies.Grammar`
    (GBNF); generation is then constrained to it, so every reply parses
    (:mod:`rllama.replies`). Override :meth:`get_reply_shape` where it depends on the observation."""

    reply_prefix: str = ""
    """Text every generated reply starts with, written at the start of the assistant's turn so that the
    model continues it (RAGEN prefills ``<answer>``; ``"Action:"`` suits an agent that reads "Action: N").
    ``extract_action``, ``is_valid_reply`` and the chat history see the prefix and the generated text
    together; the learner trains on the generated tokens after it."""

    def is_valid_reply(self, response: str) -> bool:
        """Whether a generated reply is in the form this agent reads. The default: every reply that
        ``extract_action`` parses. Override it where ``extract_action`` never fails: the RLlama README's
        ``0 if "stay" in response else 1`` reads any text as "hit", so only this hook can tell that a
        reply named no action (``return "stay" in response or "hit" in response``). Invalid replies are
        counted (``rollout/invalid_replies``, the progress line's ``invalid=``), warned about when most
        replies are, and penalised with the agent's ``format_penalty``."""
        return True

    def get_reply_shape(self, observation):
        """The shape a generated reply to ``observation`` must have (default: :attr:`reply_shape`)."""
        return self.reply_shape

    def get_valid_actions(self, observation) -> list[str] | None:
        """Candidate action texts to score, or ``None`` to generate free text.

        The default returns ``action_names`` when the subclass sets it, else ``None``.
        """
        return list(self.action_names) if self.action_names else None

    def scores_actions(self) -> bool:
        """Whether this agent picks its actions among candidates rather than generating them. Asked
        once, while the agent is built, to decide the algorithm config's ``"auto"`` values (an
        on-policy policy head is for scoring agents). The default: ``action_names`` is set or
        ``get_valid_actions`` is overridden; override this where it depends on the agent's settings
        (``TextWorldAgent(generate=True)`` generates)."""
        return bool(self.action_names) or type(self).get_valid_actions is not AgentHooks.get_valid_actions

    def fallback_action(self, observation, response: str):
        """Action used in generate mode when ``extract_action`` fails on the model's reply.

        The default samples the action space (so it needs ``action_space``, which ``train`` and
        ``evaluate`` set from the environment). Every use is counted in the training statistics
        as ``rollout/parse_failures``.
        """
        if self.action_space is None:
            raise HookError(
                f"extract_action could not parse the reply {response!r} and no action_space is known for a "
                "fallback; pass action_space= to the agent or override fallback_action()"
            )
        return self.action_space.sample()


class Hooks:
    """The hooks of ``agent`` (its subclass's methods), called and checked. Any :class:`AgentHooks` will
    do (the memory hooks are called by name), so this module needs nothing from :mod:`rllama.agent`."""

    def __init__(self, agent: AgentHooks) -> None:
        self.agent = agent

    def call(self, name: str, *args):
        """``agent.<name>(*args)``; any exception but rllama's own becomes a HookError, and so does text
        in the result that UTF-8 cannot hold (it would reach the tokenizer, the trajectory log and the
        memory store, which all write UTF-8)."""
        try:
            result = getattr(self.agent, name)(*args)
        except RLlamaError:
            raise
        except Exception as exc:
            shown = ", ".join(short(a) for a in args)
            raise HookError(f"{type(self.agent).__name__}.{name}({shown}) raised {type(exc).__name__}: {exc}") from exc
        problem = utf8_problem(result, "its result")
        if problem:
            shown = ", ".join(short(a) for a in args)
            raise HookError(f"{type(self.agent).__name__}.{name}({shown}) returned text that UTF-8 cannot hold "
                            f"({problem}: a lone surrogate); decode the bytes it comes from with errors='replace'")
        return result

    def system_prompt(self) -> str:
        """``get_system_prompt()``, a string."""
        text = self.call("get_system_prompt")
        if not isinstance(text, str):
            raise HookError(f"get_system_prompt() returned {type(text).__name__}; expected str")
        return text

    def observation_text(self, observation) -> str:
        """``format_observation(observation)``, a string."""
        text = self.call("format_observation", observation)
        if not isinstance(text, str):
            raise HookError(
                f"format_observation({short(observation)}) returned {type(text).__name__} {short(text)}; expected str"
            )
        return text

    def valid_actions(self, observation) -> list[str] | None:
        """``get_valid_actions(observation)``: ``None``, or distinct non-empty strings."""
        candidates = self.call("get_valid_actions", observation)
        if candidates is None:
            return None
        if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)):
            raise HookError(
                f"get_valid_actions({short(observation)}) returned {short(candidates)}; expected a list of "
                "strings or None"
            )
        candidates = list(candidates)
        if not candidates:
            raise HookError(
                f"get_valid_actions({short(observation)}) returned an empty list; return None to generate free text"
            )
        bad = [c for c in candidates if not isinstance(c, str) or not c.strip()]
        if bad:
            raise HookError(f"get_valid_actions returned non-string or empty candidates {bad[:3]}")
        if len(set(candidates)) != len(candidates):
            raise HookError(f"get_valid_actions returned duplicate candidates {candidates}")
        return candidates

    def reply_is_valid(self, response: str) -> bool:
        """``is_valid_reply(response)``, a bool."""
        valid = self.call("is_valid_reply", response)
        if not isinstance(valid, (bool, np.bool_)):
            raise HookError(f"is_valid_reply({short(response)}) returned {short(valid)}; expected True or False")
        return bool(valid)

    def reply_prefix(self) -> str:
        """The agent's ``reply_prefix``, a string."""
        prefix = self.agent.reply_prefix
        if not isinstance(prefix, str):
            raise HookError(f"reply_prefix = {short(prefix)}; expected a string (\"\" for none)")
        if utf8_problem(prefix, "reply_prefix"):
            raise HookError(f"reply_prefix = {short(prefix)} holds a lone surrogate, which UTF-8 cannot hold")
        return prefix

    def reply_shape(self, observation):
        """``get_reply_shape(observation)``: ``None``, or a :class:`~rllama.replies.Choices`,
        :class:`~rllama.replies.Regex` or :class:`~rllama.replies.Grammar`."""
        return self.check_shape(self.call("get_reply_shape", observation),
                                f"get_reply_shape({short(observation)}) returned")

    @staticmethod
    def check_shape(shape, where: str = "reply_shape is"):
        """``shape`` if it is ``None`` or a reply shape of :mod:`rllama.replies`, else an error naming it."""
        from rllama.replies import Choices, GrammarShape

        if shape is not None and not isinstance(shape, (Choices, GrammarShape)):
            raise HookError(f"{where} {short(shape)}; expected None or one of rllama.replies.Choices, Regex, Grammar")
        return shape

    def user_message(self, observation_text: str, retrieved: list) -> str:
        """The user message of a step: ``inject_memories(observation_text, retrieved)`` when memory gave
        something, else the observation text; a string."""
        if not retrieved:
            return observation_text
        content = self.call("inject_memories", observation_text, retrieved)
        if not isinstance(content, str):
            raise HookError(f"inject_memories returned {type(content).__name__}; expected str")
        return content

    def check_action(self, action, response: str) -> None:
        """Raise InvalidActionError unless ``action`` is in the agent's action space (when it has one)."""
        if self.agent.action_space is not None and not space_contains(self.agent.action_space, action):
            raise InvalidActionError(
                f"extract_action({response!r}) returned {action!r}, which is not in the action space "
                f"{self.agent.action_space}"
            )


def space_contains(space, action) -> bool:
    try:
        return bool(space.contains(action))
    except Exception:  # a space may raise on values of the wrong type; that is a "no"
        return False


def short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

