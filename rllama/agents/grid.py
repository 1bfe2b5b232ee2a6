"""What the grid-game agents (:class:`~rllama.agents.FrozenLakeAgent`, :class:`~rllama.agents.SokobanAgent`)
share: the grid as the whole state, and candidate moves that may say what they lead to."""

from __future__ import annotations

from rllama.agent import RLlamaAgent


class GridAgent(RLlamaAgent):
    """Plays a game whose observation is a grid drawn as text, scoring the four moves.

    The grid is the whole state, so prompts show no earlier turns (``keep_history = False``). With
    ``describe=True`` a subclass's ``get_valid_actions`` says in each candidate what the move leads
    to, and the model's own scores are left out of the policy (``score_normalization="none"``
    unless given, or when acting through a backend without the learner's heads): the model's
    likelihood of such sentences rates their wording, not the move, so the policy is the
    algorithm's head on the candidates' features, uniform before training. With bare moves the
    agent's default (``"auto"``) applies.

    Args:
        describe: name what each move leads to in its candidate text.
        **kwargs: :class:`~rllama.agent.RLlamaAgent`'s arguments.
    """

    keep_history = False

    def __init__(self, *args, describe: bool = True, **kwargs) -> None:
        self.describe = bool(describe)
        # Without the model's scores the policy is a head: only an agent acting in this process has one.
        local = kwargs.get("backend") is None
        if self.describe:
            kwargs.setdefault("score_normalization", "none" if local else "mean")
        super().__init__(*args, **kwargs)

    def format_observation(self, observation) -> str:
        return f"{observation}\nYour move?"
