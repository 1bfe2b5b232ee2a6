"""The agent hooks about memory: how retrieved experiences are shown in a prompt, and what is stored
with a finished episode. :class:`rllama.RLlamaAgent` inherits them; a subclass overrides any of them."""

from __future__ import annotations

from rllama.memory.episodic import Retrieved


class MemoryHooks:
    """Memory hooks of an agent, with their defaults."""

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

