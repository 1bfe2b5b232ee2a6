"""Trajectory logs: episodes as JSONL, written by agents, read back with validation, used for behaviour cloning.

One JSON object a line, one line a step, the steps of an episode consecutive and in order::

    {"episode": 0, "step": 0, "observation": "Your hand totals 14. ...",
     "prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "response": "stick", "action": 0, "reward": -1.0, "done": true, "metadata": {"env_id": 3}}

- ``episode`` (int): the episode's id, unique in the file; ``step`` (int): 0, 1, 2, ... within it.
- ``observation`` (str): the observation text (``format_observation``'s output).
- ``prompt`` (list of ``{"role", "content"}`` messages): the chat the reply was chosen from, as the
  model saw it (memories and working-memory notes included).
- ``response`` (str): the reply (the chosen candidate, or the generated text).
- ``action``: what ``extract_action`` returned (JSON; other types as their ``repr``).
- ``reward`` (number), ``done`` (bool: true on an episode's last step only).
- ``metadata`` (object, optional): anything else (``env_id``, ``truncated`` on the last step).

``RLlamaAgent(..., trajectory_log="episodes.jsonl")`` appends every finished training episode.
:func:`read_trajectories` checks every line and raises :class:`TrajectoryError` with
``path:line:`` on the first problem. :func:`behaviour_cloning` fine-tunes an agent's adapter on the
responses of selected episodes (successful ones by default) before RL continues.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rllama.algorithms.buffers import _jsonable
from rllama.errors import RLlamaError

FIELDS = {"episode": int, "step": int, "observation": str, "prompt": list, "response": str, "reward": (int, float),
          "done": bool}


class TrajectoryError(RLlamaError):
    """A trajectory file breaks the schema; the message starts with ``path:line:``."""


class TrajectoryWriter:
    """Appends episodes to a JSONL file (each episode's lines in one write, flushed)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._next_episode = _next_episode_id(self.path)

    def write_episode(self, record, truncated: bool = False, metadata: dict | None = None) -> int:
        """Write one finished episode from the agent's record of it (a :class:`rllama.recording.EnvRecord`
        kept with its prompts); returns its id."""
        with self._lock:
            episode = self._next_episode
            self._next_episode += 1
            lines = []
            n = len(record.steps)
            for t, step in enumerate(record.steps):
                meta = dict(metadata or {})
                if t == n - 1 and truncated:
                    meta["truncated"] = True
                lines.append(json.dumps({
                    "episode": episode, "step": t, "observation": record.observations[t], "prompt": record.prompts[t],
                    "response": step.text, "action": _jsonable(step.action),
                    "reward": float(step.reward), "done": t == n - 1, "metadata": meta,
                }, ensure_ascii=False))
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
            return episode


def _next_episode_id(path: Path) -> int:
    if not path.exists():
        return 0
    last = -1
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            last = max(last, int(json.loads(line).get("episode", -1)))
        except (ValueError, AttributeError, TypeError):
            continue
    return last + 1


def read_trajectories(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The episodes of a trajectory file: ``[{"episode", "steps": [...], "return", "truncated"}]``.

    Raises :class:`TrajectoryError` (``path:line: what is wrong``) on the first line that breaks the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"{path}: no such file")
    episodes: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: dict[str, Any] | None = None
    last_line = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        last_line = number
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise TrajectoryError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise TrajectoryError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name, kind in FIELDS.items():
            if name not in record:
                raise TrajectoryError(f"{where}: missing field {name!r}")
            value = record[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TrajectoryError(f"{where}: field {name!r} is {type(value).__name__} {value!r:.60}, "
                                      f"expected {getattr(kind, '__name__', 'number')}")
        if not math.isfinite(record["reward"]):
            raise TrajectoryError(f"{where}: reward {record['reward']} is not finite")
        for i, m in enumerate(record["prompt"]):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TrajectoryError(f"{where}: prompt message {i} is not a {{'role': str, 'content': str}} object")
        if "metadata" in record and not isinstance(record["metadata"], dict):
            raise TrajectoryError(f"{where}: metadata must be an object")
        if current is None:
            if record["episode"] in seen:
                raise TrajectoryError(f"{where}: episode {record['episode']} appears again after it ended")
            if record["step"] != 0:
                raise TrajectoryError(f"{where}: episode {record['episode']} starts at step {record['step']}, not 0")
            current = {"episode": record["episode"], "steps": [], "line": number}
        elif record["episode"] != current["episode"]:
            raise TrajectoryError(f"{where}: episode {current['episode']} (from line {current['line']}) has no "
                                  f"step with done=true before episode {record['episode']} starts")
        elif record["step"] != len(current["steps"]):
            raise TrajectoryError(f"{where}: step {record['step']} of episode {record['episode']}; expected "
                                  f"{len(current['steps'])}")
        current["steps"].append(record)
        if record["done"]:
            steps = current["steps"]
            episodes.append({"episode": current["episode"], "steps": steps,
                             "return": float(sum(s["reward"] for s in steps)),
                             "truncated": bool(steps[-1].get("metadata", {}).get("truncated", False))})
            seen.add(current["episode"])
            current = None
    if current is not None:
        raise TrajectoryError(f"{path}:{last_line}: the file ends inside episode {current['episode']} "
                              f"(from line {current['line']}; no step with done=true)")
    return episodes


def select_episodes(episodes: list[dict], keep: str | float | Callable[[dict], bool] = "success") -> list[dict]:
    """The episodes to imitate: ``"success"`` (return > 0), a float ``q`` (the top ``q`` fraction by
    return), ``"all"``, or a predicate on the episode dict."""
    if keep == "all":
        return list(episodes)
    if keep == "success":
        return [e for e in episodes if e["return"] > 0]
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"keep={keep}: a fraction must lie in (0, 1]")
        ranked = sorted(episodes, key=lambda e: -e["return"])
        return ranked[: max(1, round(keep * len(episodes)))]
    if callable(keep):
        return [e for e in episodes if keep(e)]
    raise ValueError(f"keep={keep!r}: expected 'success', 'all', a fraction or a predicate")


def behaviour_cloning(agent, episodes: list[dict] | str | os.PathLike, *,
                      keep: str | float | Callable[[dict], bool] = "success", epochs: int = 2,
                      learning_rate: float = 1e-4, batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Fine-tune the agent's active adapter to reproduce the responses of the selected episodes.

    Each step's ``prompt`` chat is rendered with the agent's chat format and the loss is the
    response tokens' negative log-likelihood (:func:`rllama.skills.sft_loss`), the prompt carrying
    none. For a scoring agent this raises the chosen candidates' scores. Afterwards train the agent
    with any algorithm as usual.

    Returns ``{"episodes", "steps", "losses" (per epoch)}``.
    """
    from rllama.skills import sft_loss

    if not isinstance(episodes, list):
        episodes = read_trajectories(episodes)
    chosen = select_episodes(episodes, keep)
    if not chosen:
        raise RLlamaError(f"no episode to imitate: none of the {len(episodes)} episodes passes keep={keep!r}")
    prompts = [agent.chat.prompt_ids(s["prompt"]) for e in chosen for s in e["steps"]]
    replies = [agent.chat.reply_ids(s["response"]) for e in chosen for s in e["steps"]]
    params = agent.policy.adapter_parameters()
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(int(seed))
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(prompts), generator=generator).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss, n = sft_loss(agent.policy, [prompts[i] for i in rows], [replies[i] for i in rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            total += loss.item() * n
            count += n
        losses.append(total / count)
    return {"episodes": len(chosen), "steps": len(prompts), "losses": losses}
