"""A ready-made agent for ``rllama/TextWorld-v0``: scores admissible commands or generates one."""

from __future__ import annotations

import re

from rllama.agent import RLlamaAgent
from rllama.memory import WorkingMemory


class TextWorldAgent(RLlamaAgent):
    """Plays TextWorld games; scores admissible commands or generates one (``generate=True``)."""

    def __init__(self, *args, generate: bool = False, **kwargs) -> None:
        self.generate = generate
        # keep_first=1: the first observation states the goal; keep it in sight all episode.
        kwargs.setdefault("memory", WorkingMemory(max_tokens=256, keep_first=1))
        kwargs.setdefault("max_new_tokens", 12)
        super().__init__(*args, **kwargs)

    def get_system_prompt(self) -> str:
        return ("You are playing a text adventure game. Read the goal and the room, then reply with exactly "
                "one command, such as 'go north', 'take key' or 'open chest'.")

    def format_observation(self, observation) -> str:
        text = observation["text"] if isinstance(observation, dict) else str(observation)
        text = re.sub(r"\n{2,}", "\n", text).strip()
        if self.generate and isinstance(observation, dict):
            text += "\nCommands you can use: " + ", ".join(observation["admissible_commands"])
        return text

    def scores_actions(self) -> bool:
        return not self.generate

    def get_valid_actions(self, observation):
        if self.generate or not isinstance(observation, dict):
            return None
        return list(observation["admissible_commands"])

    def extract_action(self, response: str) -> str:
        line = response.strip().splitlines()[0] if response.strip() else ""
        command = line.strip().lstrip("> ").strip("'\"` ").rstrip(".!")
        if not command:
            raise ValueError(f"no command in {response!r}")
        return command.lower()

    def fallback_action(self, observation, response: str) -> str:
        return "look"
