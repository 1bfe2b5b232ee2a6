"""Turning the agent's chat into token ids.

With a tokenizer that has a chat template (instruct models), the template renders the chat. A
tokenizer without one (base models, tiny test models) gets this plain default format::

    System: {system prompt}

    User: {observation 1}

    Assistant: {reply 1}</s>

    User: {observation 2}

    Assistant:

where ``</s>`` is the tokenizer's end-of-sequence token. A reply is tokenised on its own and ends
with the end-of-turn token (the EOS token), so the log-likelihood of a candidate action is that of
the model saying exactly that text and stopping.
"""

from __future__ import annotations

from collections.abc import Sequence

from rllama.errors import RLlamaError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

DEFAULT_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


class ChatFormat:
    """Renders chats with the tokenizer's chat template, or the plain default format without one.

    Args:
        tokenizer: a transformers tokenizer.
        use_chat_template: ``None`` uses the template when the tokenizer has one.
    """

    def __init__(self, tokenizer, use_chat_template: bool | None = None) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        eos = getattr(tokenizer, "eos_token_id", None)
        self.end_of_turn_ids: list[int] = [int(eos)] if eos is not None else []
        self.eos_text = getattr(tokenizer, "eos_token", None) or ""

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text for the next assistant reply."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        parts = []
        for m in messages:
            name = DEFAULT_ROLE_NAMES.get(m["role"], m["role"].capitalize())
            end = self.eos_text if m["role"] == "assistant" else ""
            parts.append(f"{name}: {m['content']}{end}\n\n")
        return "".join(parts) + f"{DEFAULT_ROLE_NAMES['assistant']}:"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt for the next assistant reply."""
        return self.encode(self.render(messages))

    def reply_ids(self, text: str) -> list[int]:
        """Token ids of an assistant reply followed by the end-of-turn token."""
        if not self.use_chat_template:
            text = " " + text  # the default format puts a space after "Assistant:"
        return self.encode(text) + self.end_of_turn_ids

    def reply_prefix_ids(self, text: str) -> list[int]:
        """Token ids of the start of an assistant reply (no end of turn): what a reply prefix adds to
        the prompt."""
        ids = self.reply_ids(text)
        return ids[: len(ids) - len(self.end_of_turn_ids)]

    def decode_reply(self, token_ids: Sequence[int]) -> str:
        """Text of a generated reply, without the end-of-turn token and special tokens."""
        ids = list(token_ids)
        if ids and ids[-1] in self.end_of_turn_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class PromptBuilder:
    """Builds the prompt of each step from an episode's chat: the system prompt, the earlier turns
    (all of them, those working memory selects, or none), and the current user message; the oldest
    turns are dropped until the prompt fits ``max_prompt_tokens`` and, with the reply, the model's
    context.

    Args:
        chat: renders messages to token ids.
        max_prompt_tokens: the longest prompt.
        context: the model's context length (position limit), if it has one.
    """

    def __init__(self, chat: ChatFormat, max_prompt_tokens: int, context: int | None = None) -> None:
        self.chat = chat
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.context = None if context is None else int(context)

    def build(self, messages: Sequence[Message], content: str, *, keep_history: bool = True,
              working_memory=None, reply_tokens: int = 0) -> tuple[list[int], list[Message]]:
        """The prompt ids for the user message ``content`` after the chat ``messages`` (system prompt
        first), and the messages they were rendered from.

        Args:
            keep_history: show the earlier turns (else the system prompt and ``content`` alone).
            working_memory: a :class:`~rllama.memory.WorkingMemory` choosing which earlier turns to
                show within its token budget.
            reply_tokens: the longest reply that must fit after the prompt (a candidate's tokens, or
                the generation budget).
        """
        messages = self.compose(messages, content, keep_history=keep_history, working_memory=working_memory)
        return self.fit(messages, reply_tokens)

    def compose(self, messages: Sequence[Message], content: str, *, keep_history: bool = True,
                working_memory=None) -> list[Message]:
        """System prompt + history (through working memory, if any; none without ``keep_history``) +
        the current user message."""
        system, history = list(messages[:1]), (list(messages[1:]) if keep_history else [])
        current = [{"role": "user", "content": content}]
        if working_memory is not None and history:
            base = len(self.chat.prompt_ids(system + current))
            history = working_memory.select(
                history, lambda msgs: len(self.chat.prompt_ids(system + msgs + current)) - base
            )
        return system + history + current

    def fit(self, messages: list[Message], reply_tokens: int = 0) -> tuple[list[int], list[Message]]:
        """Prompt ids of ``messages``, dropping the oldest (observation, reply) pairs until it fits
        ``max_prompt_tokens`` and leaves ``reply_tokens`` of the context; returns the ids and the
        messages they were rendered from (the system prompt always stays)."""
        limit = self.max_prompt_tokens
        if self.context is not None:
            limit = min(limit, self.context - int(reply_tokens))
        ids = self.chat.prompt_ids(messages)
        while len(ids) > limit and len(messages) > 3:
            messages = messages[:1] + messages[3:]
            ids = self.chat.prompt_ids(messages)
        if len(ids) > limit:
            within = f"max_prompt_tokens={self.max_prompt_tokens}"
            if limit < self.max_prompt_tokens:
                within = (f"the {limit} tokens the model's context of {self.context} leaves beside a reply of "
                          f"{reply_tokens} tokens (the longest candidate, or max_new_tokens)")
            raise RLlamaError(
                f"the prompt of the current observation alone is {len(ids)} tokens, over {within}; shorten the "
                "system prompt, format_observation's text or the candidates"
            )
        return ids, messages
