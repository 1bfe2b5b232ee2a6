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

``RLlamaAgent(..., trajectory_log="episodes.jsonl")`` appends every finished training episode through a
:class:`TrajectoryWriter`. Several writers (threads, or processes such as parallel runs sharing one log)
may append to one file: each append holds an exclusive ``flock`` on the file, takes the next episode id
from the file itself (the largest id in it, plus one), and writes the whole episode as one ``write`` of
complete lines, then fsync. So ids stay unique and episodes never interleave.

:func:`read_trajectories` reads the file under a shared ``flock`` (never half an append), checks every line
and raises :class:`TrajectoryError` (a :class:`~rllama.errors.CorruptFileError`) with ``path:line:`` on the
first problem: a line that is not UTF-8, not JSON, not an object, or breaks the schema. One exception: a
writer killed mid-write leaves a last line with no newline that does not parse (a cut line). That line,
and the unfinished episode it belongs to, are skipped with a logged warning, and the next append cuts
them off the file. A bad line anywhere else, or a file that ends inside an episode at a line end, is an error:
that is damage, not an interrupted append. :func:`behaviour_cloning` fine-tunes an agent's adapter on the
responses of selected episodes (successful ones by default) before RL continues.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rllama.algorithms.buffers import _jsonable
from rllama.errors import CorruptFileError, RLlamaError
from rllama.fileio import utf8_problem

logger = logging.getLogger(__name__)

FIELDS = {"episode": int, "step": int, "observation": str, "prompt": list, "response": str, "reward": (int, float),
          "done": bool}


class TrajectoryError(CorruptFileError):
    """A trajectory file breaks the schema; the message starts with ``path:line:``."""


class TrajectoryWriter:
    """Appends episodes to a JSONL file; safe with other writers (threads or processes) on the same file.

    Each :meth:`write_episode` locks the file (``flock``, exclusive), reads what other writers appended
    since its last append to find the next free episode id, and writes the episode's lines with one
    ``write`` (unbuffered), then fsync. If the file ends with an episode cut off by a killed writer, that
    episode is removed first (with a warning) so the file stays readable.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # threads of this writer; flock orders them with every other writer
        self._scan = _Scan()

    def write_episode(self, record, truncated: bool = False, metadata: dict | None = None) -> int:
        """Write one finished episode from the agent's record of it (a :class:`rllama.recording.EnvRecord`
        kept with its prompts); returns its id."""
        for t, step in enumerate(record.steps):  # before the file is opened (or created)
            problem = utf8_problem({"observation": record.observations[t], "prompt": record.prompts[t],
                                    "response": step.text, "action": _jsonable(step.action),
                                    "metadata": metadata}, f"step {t}")
            if problem:
                raise RLlamaError(f"cannot log to {self.path}: {problem} is a lone surrogate, which UTF-8 cannot store")
        with self._lock, open(self.path, "a+b", buffering=0) as f:
            fd = f.fileno()
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed
            prefix = self._repair_tail(fd)
            episode = self._scan.last_episode + 1
            n = len(record.steps)
            lines = []
            for t, step in enumerate(record.steps):
                meta = dict(metadata or {})
                if t == n - 1 and truncated:
                    meta["truncated"] = True
                line = {
                    "episode": episode, "step": t, "observation": record.observations[t], "prompt": record.prompts[t],
                    "response": step.text, "action": _jsonable(step.action),
                    "reward": float(step.reward), "done": t == n - 1, "metadata": meta,
                }
                lines.append(json.dumps(line, ensure_ascii=False))
            payload = prefix + "".join(line + "\n" for line in lines).encode("utf-8")
            written = f.write(payload)  # one write(2) of the whole episode; the loop covers a short write
            while written < len(payload):
                written += f.write(payload[written:])
            os.fsync(fd)
            return episode

    def _repair_tail(self, fd: int) -> bytes:
        """Read what was appended since this writer's last look (the file locked); if the file ends with a cut
        line, remove it with its unfinished episode when they are only that, else return ``b"\\n"`` to end it
        so that the next episode's lines stay whole."""
        fragment = self._scan.read(fd)
        if not fragment:
            return b""
        torn = _parses(fragment) is _INVALID and fragment.startswith(b'{"episode": ')  # how our lines begin
        if not (torn and self._scan.tail_is_steps):
            return b"\n"  # a whole line, or damage that read_trajectories will report: leave it visible
        size = os.fstat(fd).st_size
        logger.warning("%s: removing the last %d bytes, an episode whose writer stopped in the middle of writing it",
                       self.path, size - self._scan.clean_end)
        os.ftruncate(fd, self._scan.clean_end)
        self._scan.reset()
        self._scan.read(fd)  # the ids again, without the removed episode's
        return b""


class _Scan:
    """What a writer has read of its file: the complete lines up to ``offset``, the largest episode id in them,
    where the last finished episode ends (``clean_end``), and whether every line after it is an unfinished
    episode's step (``tail_is_steps``). Reading resumes at ``offset``, so each append reads only what other
    writers added since."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, file_id: tuple[int, int] | None = None) -> None:
        """Forget what was read (the file was replaced or truncated)."""
        self.file_id = file_id
        self.offset = 0
        self.last_episode = -1
        self.clean_end = 0
        self.tail_is_steps = True

    def read(self, fd: int) -> bytes:
        """Take in the complete lines appended since the last read; return the cut line after them, if any."""
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.file_id or st.st_size < self.offset:  # another file, or truncated
            self.reset((st.st_dev, st.st_ino))
        data = os.pread(fd, st.st_size - self.offset, self.offset) if st.st_size > self.offset else b""
        complete = data.rfind(b"\n") + 1
        position = self.offset
        for line in data[:complete].split(b"\n")[:-1]:
            position += len(line) + 1
            if not line.strip():
                continue  # read_trajectories skips blank lines too
            record = _parses(line)
            if not isinstance(record, dict):
                self.tail_is_steps = False
                continue
            episode = record.get("episode")
            if isinstance(episode, int) and not isinstance(episode, bool):
                self.last_episode = max(self.last_episode, episode)
            if record.get("done") is True:
                self.clean_end, self.tail_is_steps = position, True
            elif record.get("done") is not False:
                self.tail_is_steps = False
        self.offset += complete
        return data[complete:]


_INVALID = object()


def _parses(line: bytes) -> Any:
    """The JSON value of ``line``, or ``_INVALID`` if it is not UTF-8 JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        return _INVALID


def read_trajectories(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The episodes of a trajectory file: ``[{"episode", "steps": [...], "return", "truncated"}]``.

    Raises :class:`TrajectoryError` (``path:line: what is wrong``) on the first line that breaks the schema;
    a cut last line (see the module docstring) and its unfinished episode are skipped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"{path}: no such file")
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # no writer is half-way through an append while we read
        lines = f.read().split(b"\n")
    cut = lines.pop()  # after the last newline: b"" in a file whose last append finished
    if cut.strip() and _parses(cut) is not _INVALID:
        lines.append(cut)  # a whole line that lacks only its newline
        cut = b""
    episodes: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: dict[str, Any] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = _check_line(line, where)
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
    if cut.strip():
        what = "the last line" if current is None else \
            f"the last line and the episode {current['episode']} it ends (from line {current['line']})"
        logger.warning("%s:%d: skipping %s: cut off by a writer that stopped while appending (no newline, not "
                       "JSON)", path, len(lines) + 1, what)
        current = None
    if current is not None:
        raise TrajectoryError(f"{path}:{len(lines)}: the file ends inside episode {current['episode']} "
                              f"(from line {current['line']}; no step with done=true)")
    return episodes


def _check_line(line: bytes, where: str) -> dict[str, Any]:
    """The step record on one line, checked against the schema; :class:`TrajectoryError` at ``where`` if not."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrajectoryError(f"{where}: not valid UTF-8 ({exc})") from None
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise TrajectoryError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise TrajectoryError(f"{where}: expected a JSON object, got {type(record).__name__}")
    problem = utf8_problem(record, "the step")
    if problem:  # an escaped lone surrogate ("\\ud800"): valid JSON, not text a tokenizer takes
        raise TrajectoryError(f"{where}: {problem} is a lone surrogate, which no text holds")
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
    return record


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
    none. For a scoring agent this raises the chosen candidates' scores, so its policy must include
    them (``score_normalization`` not ``"none"``; refused otherwise). Afterwards train the agent with
    any algorithm as usual.

    Returns ``{"episodes", "steps", "losses" (per epoch)}``.
    """
    from rllama.skills import sft_loss

    if not agent.policy.uses_scores and agent.scores_actions():
        raise RLlamaError(
            "behaviour cloning teaches the model its replies, but this agent's policy leaves the model's scores out "
            "(score_normalization='none', what 'auto' gives a policy head on the frozen adapter): the imitation "
            "would not change a single choice. Build the agent with score_normalization='mean' (the model's "
            "scores plus the head) or with the adapter alone as the policy (algorithm_config={'policy_head': 0})")
    if not isinstance(episodes, list):
        episodes = read_trajectories(episodes)
    chosen = select_episodes(episodes, keep)
    if not chosen:
        raise RLlamaError(f"no episode to imitate: none of the {len(episodes)} episodes passes keep={keep!r}")
    prompts = [agent.chat.prompt_ids(s["prompt"]) for e in chosen for s in e["steps"]]
    replies = [agent.chat.reply_ids(s["response"]) for e in chosen for s in e["steps"]]
    given = {id(e): i for i, e in enumerate(episodes)}  # an episode without an id is named by its place
    where = [(e["episode"] if "episode" in e else f"#{given[id(e)]} of the list", t)
             for e in chosen for t in range(len(e["steps"]))]
    agent.policy.check_context([len(p) + len(r) for p, r in zip(prompts, replies)],
                               lambda i: f"episode {where[i][0]} step {where[i][1]}: its prompt and response")
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
