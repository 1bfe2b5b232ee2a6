"""Working memory: the current episode's recent turns, kept within a token budget.

The rule: the history of the running episode (every observation the agent saw and every reply it
gave, after the system prompt and before the current observation) is kept whole while it fits in
``max_tokens`` tokens of the model's tokenizer. When it does not, the oldest (observation, reply)
pairs are dropped, oldest first, and replaced by one note: by default ``"[3 earlier turns of this
episode are not shown.]"``, or what ``summarize(dropped_messages)`` returns. The note counts toward
the budget (more pairs are dropped until history plus note fit); if even the newest pair alone does
not fit, no history is shown, only the note when it fits. The system prompt and the current
observation are never dropped and do not count.

``keep_first=n`` pins the episode's first ``n`` (observation, reply) pairs: they are dropped only
after every other pair, and the note goes after them. In text games the first observation carries
the goal, so ``keep_first=1`` keeps the goal in sight for the whole episode.

Token counts are of the history as it is rendered in the prompt (chat template included): the agent
measures them with its own tokenizer and chat format. Standalone use::

    wm = WorkingMemory(max_tokens=256)
    kept = wm.select(history, count_tokens=lambda msgs: len(tokenizer.apply_chat_template(msgs)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _default_note(dropped: Sequence[dict]) -> str:
    turns = sum(1 for m in dropped if m.get("role") == "user")
    if turns == 1:
        return "[1 earlier turn of this episode is not shown.]"
    return f"[{turns} earlier turns of this episode are not shown.]"


class WorkingMemory:
    """Keeps the running episode's history within ``max_tokens`` (see the module docstring).

    Args:
        max_tokens: budget for the history, in tokens of the model's tokenizer.
        summarize: ``None`` for the default note, ``False`` for no note, or a callable
            ``summarize(dropped_messages) -> str`` (for instance one that lists the rooms visited).
        note_role: the chat role of the note (``"user"`` by default, so chat templates accept it).
        keep_first: leading (observation, reply) pairs dropped last (see the module docstring).
    """

    def __init__(self, max_tokens: int = 512, summarize: Callable[[Sequence[dict]], str] | bool | None = None,
                 note_role: str = "user", keep_first: int = 0) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens}; expected >= 0")
        if summarize is True:
            summarize = None
        if summarize is not None and summarize is not False and not callable(summarize):
            raise TypeError(f"summarize={summarize!r}: expected None, False or a callable(dropped_messages) -> str")
        if keep_first < 0:
            raise ValueError(f"keep_first={keep_first}; expected >= 0")
        self.keep_first = int(keep_first)
        self.max_tokens = int(max_tokens)
        self.summarize = summarize
        self.note_role = note_role

    def __repr__(self) -> str:
        return f"WorkingMemory(max_tokens={self.max_tokens})"

    def note(self, dropped: Sequence[dict]) -> dict | None:
        """The message standing for ``dropped`` turns, or ``None``."""
        if not dropped or self.summarize is False:
            return None
        text = _default_note(dropped) if self.summarize is None else self.summarize(list(dropped))
        if not isinstance(text, str):
            raise TypeError(f"WorkingMemory.summarize returned {type(text).__name__}; expected str")
        return {"role": self.note_role, "content": text} if text else None

    def select(self, history: Sequence[dict], count_tokens: Callable[[list[dict]], int]) -> list[dict]:
        """The messages of ``history`` to show: a suffix of whole (user, assistant) pairs, after a note.

        Args:
            history: the episode's messages after the system prompt, alternating user / assistant.
            count_tokens: tokens of a list of messages as rendered in the prompt.
        """
        history = list(history)
        if count_tokens(history) <= self.max_tokens:
            return history
        pinned, rest = history[: 2 * self.keep_first], history[2 * self.keep_first:]
        if pinned and rest:
            start = 0
            while start < len(rest):
                start += 2 if start + 1 < len(rest) else 1
                note = self.note(rest[:start])
                shown = pinned + ([note] if note else []) + rest[start:]
                if count_tokens(shown) <= self.max_tokens:
                    return shown
        # Binary search would save renders, but histories are short and this keeps the rule obvious.
        start = 0
        while start < len(history):
            start += 2 if start + 1 < len(history) else 1
            kept = history[start:]
            note = self.note(history[:start])
            shown = ([note] if note else []) + kept
            if count_tokens(shown) <= self.max_tokens:
                return shown
        note = self.note(history)
        return [note] if note and count_tokens([note]) <= self.max_tokens else []
