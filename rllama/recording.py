"""The agent's record of each environment's running episode.

One :class:`EnvRecord` per environment holds the chat the model sees and one :class:`Step` per
action, with the reward that followed it; episodic memory, trajectory logs and the algorithm all
read the episode from that one list when it ends. :class:`Recorder` maps environment ids to their
records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rllama.algorithms import Step


@dataclass
class EnvRecord:
    """The running episode of one environment.

    Attributes:
        messages: the chat so far (system prompt, observations, the agent's replies), as the
            history of the next prompt.
        steps: one :class:`Step` per action, each holding its reply text, the environment action
            and the reward assigned after it. Kept in evaluation too (for memory and the loop's
            bookkeeping); only training episodes go to the algorithm.
        observations: the observation text of each step (what memory stores; the prompt may hold more).
        prompts: the chat each action was chosen from (kept only when a trajectory log needs it).
    """

    messages: list[dict] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    prompts: list[list[dict]] = field(default_factory=list)

    def add(self, step: Step, observation: str, prompt: list[dict] | None = None) -> None:
        """Record an action: ``step`` taken on the observation text ``observation``, and the turn in the chat."""
        self.messages = self.messages + [{"role": "user", "content": observation},
                                         {"role": "assistant", "content": step.text}]
        self.steps.append(step)
        self.observations.append(observation)
        if prompt is not None:
            self.prompts.append(prompt)

    @property
    def replies(self) -> list[str]:
        """The reply text of each step."""
        return [s.text for s in self.steps]

    @property
    def rewards(self) -> list[float]:
        """The reward of each step."""
        return [s.reward for s in self.steps]

    @property
    def total_reward(self) -> float:
        return float(sum(s.reward for s in self.steps))


class Recorder:
    """The running episodes of an agent's environments, by environment id.

    ``recorder[env_id]`` is that environment's :class:`EnvRecord` (``KeyError`` if none is running);
    :meth:`open` starts one with the system prompt when the environment has none.
    """

    def __init__(self) -> None:
        self._records: dict[int, EnvRecord] = {}

    def open(self, env_id: int, system_prompt: Callable[[], str]) -> EnvRecord:
        """The record of ``env_id``'s running episode; a new one (its chat opened with
        ``system_prompt()``) if the environment has none."""
        record = self._records.get(env_id)
        if record is None:
            record = self._records[env_id] = EnvRecord(messages=[{"role": "system", "content": system_prompt()}])
        return record

    def get(self, env_id: int) -> EnvRecord | None:
        return self._records.get(env_id)

    def close(self, env_id: int) -> EnvRecord:
        """Remove and return ``env_id``'s record (its episode ended)."""
        return self._records.pop(env_id)

    def drop(self, env_ids=None) -> None:
        """Forget the running episodes of ``env_ids`` (all when ``None``)."""
        if env_ids is None:
            self._records.clear()
        for env_id in env_ids or ():
            self._records.pop(int(env_id), None)

    def swap(self, records: dict[int, EnvRecord]) -> dict[int, EnvRecord]:
        """Replace every record by ``records``; returns the ones replaced (evaluation sets training's aside)."""
        previous, self._records = self._records, records
        return previous

    @property
    def mid_episode(self) -> bool:
        """Whether some environment has steps of an unfinished episode."""
        return any(record.steps for record in self._records.values())

    def __getitem__(self, env_id: int) -> EnvRecord:
        return self._records[env_id]

    def __contains__(self, env_id) -> bool:
        return env_id in self._records

    def __iter__(self) -> Iterator[int]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)
