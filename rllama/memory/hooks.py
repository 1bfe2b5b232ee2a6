"""An agent's memory: the hooks about it (how retrieved experiences are shown in a prompt, what is
stored with a finished episode) and their use. :class:`rllama.RLlamaAgent` inherits them; a subclass
overrides any of the hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rllama.memory.episodic import EpisodicMemory, Retrieved
from rllama.memory.working import WorkingMemory

if TYPE_CHECKING:
    from rllama.recording import EnvRecord


class MemoryHooks:
    """Memory hooks of an agent, with their defaults, and the agent's use of its memories."""

    episodic_memory: EpisodicMemory | None = None
    working_memory: WorkingMemory | None = None
    _write_memory = True  # False while evaluating, unless evaluating(write_memory=True)

    def format_memories(self, retrieved: list[Retrieved]) -> str:
        """The text block that presents retrieved experiences (override to change the template).

        The default lists each as ``- <observation> -> <action> (reward r, return g[, outcome][: lesson])``.
        """
        lines = ["Relevant past experience:"]
        for r in retrieved:
            e = r.experience
            extra = f", {e.outcome}" if e.outcome else ""
            lesson = f": {e.lesson}" if e.lesson else ""
            lines.append(f"- {e.observation} -> {e.action} "
                         f"(reward {e.reward:+g}, return {e.return_to_go:+g}{extra}){lesson}")
        return "\n".join(lines)

    def inject_memories(self, observation_text: str, retrieved: list[Retrieved]) -> str:
        """The user message shown for the current step: memories (if any) before the observation."""
        if not retrieved:
            return observation_text
        return f"{self.format_memories(retrieved)}\n\nNow:\n{observation_text}"

    def episode_outcome(self, episode_return: float, truncated: bool) -> str:
        """A word for how an episode ended, stored with its experiences in episodic memory."""
        if truncated:
            return "truncated"
        return "won" if episode_return > 0 else "lost" if episode_return < 0 else "draw"

    def episode_lesson(self, observations: list[str], actions: list[str], rewards: list[float]) -> str | None:
        """Optional free-text lesson stored with an episode's experiences (default: none)."""
        return None


    def _retrieve(self, texts: list[str]) -> list[list[Retrieved]]:
        """What episodic memory holds for each observation text (nothing without a memory)."""
        if self.episodic_memory is None or len(self.episodic_memory) == 0:
            return [[] for _ in texts]
        return self.episodic_memory.search(texts)

    def _remember(self, record: EnvRecord, truncated: bool) -> None:
        """Write a finished episode to episodic memory, with its outcome and lesson."""
        if self.episodic_memory is None or not self._write_memory or not record.steps:
            return
        observations, replies, rewards = list(record.observations), record.replies, record.rewards
        outcome = self.hooks.call("episode_outcome", float(sum(rewards)), truncated)
        lesson = self.hooks.call("episode_lesson", observations, replies, rewards)
        self.episodic_memory.add_episode(observations, replies, rewards, outcome=outcome,
                                         lesson=lesson, metadata={"episode": self.total_episodes})


def split_memory(memory) -> tuple[EpisodicMemory | None, WorkingMemory | None]:
    """The episodic and the working memory of an agent's ``memory=`` argument."""
    items = [] if memory is None else list(memory) if isinstance(memory, (list, tuple)) else [memory]
    episodic = [m for m in items if isinstance(m, EpisodicMemory)]
    working = [m for m in items if isinstance(m, WorkingMemory)]
    other = [m for m in items if not isinstance(m, (EpisodicMemory, WorkingMemory))]
    if other or len(episodic) > 1 or len(working) > 1:
        raise TypeError(
            f"memory={memory!r}: expected an EpisodicMemory, a WorkingMemory, or a list with at most one of each"
        )
    return (episodic[0] if episodic else None), (working[0] if working else None)
