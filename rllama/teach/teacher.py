"""The teaching page's model side, without the web: skills, their examples, chat and learning.

A :class:`Teacher` owns a :class:`~rllama.skills.SkillModel` (the learner, in torch), a chat engine that
answers while the learner trains, and a folder of skills that every change is saved to at once:

- **Chat** runs on llama.cpp where it is installed and the model has a GGUF file (the embedded model
  has): a second copy of the model that never takes the learner's lock, so a reply starts while a learn
  step runs. Each skill's adapter is written to it (a GGUF LoRA file) when a learn finishes: the
  chat answers with the last finished learn, never with half of one. Elsewhere the chat runs in torch
  on the learner's own model and waits for the learn step in progress (at most one) before its first
  token.
- **Learning** runs in one background thread: learn requests, from any number of tabs, are queued and
  run one after the other, each on the examples as they were when it was asked for. A job's events (each
  step's loss, the reply to a probe prompt before and after) are kept, so a page that reconnects
  replays them.
- **Saving**: a skill is a folder ``<root>/<name>/`` with ``skill.json`` (its examples, the steps its
  adapter has taken) and ``adapter/`` (a PEFT folder, once it has learned), written whole with a
  checksum manifest through a temporary folder and a rename, as checkpoints are. A crash or a closed
  browser leaves the previous save or the new one; a damaged folder is refused when loaded, naming the
  file.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rllama.errors import CorruptFileError, RLlamaError
from rllama.fileio import read_json, recover_dir, utf8_problem, verify_dir, writing_dir
from rllama.skills import SkillModel, validate_examples

logger = logging.getLogger(__name__)

SKILL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SKILL_FILE = "skill.json"
FORMAT = "rllama.skill"
FORMAT_VERSION = 1
MAX_EXAMPLES = 1000


class TeachError(RLlamaError):
    """A request the teaching page refuses, with the HTTP ``status`` to answer and a message for the page."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Skill:
    name: str
    examples: list[dict] = field(default_factory=list)
    steps: int = 0  # optimisation steps its adapter has taken
    saved_at: float | None = None


@dataclass
class LearnJob:
    """One queued or running learn: its events (``{"type": ..., ...}``) in order, kept for late readers."""

    id: str
    skill: str
    state: str = "queued"  # queued, running, done, failed
    events: list[dict] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def emit(self, kind: str, **data) -> None:
        with self.changed:
            self.events.append({"type": kind, "job": self.id, "skill": self.skill, **data})
            self.changed.notify_all()

    def wait_events(self, start: int, timeout: float) -> list[dict]:
        """The events from index ``start`` on, waiting up to ``timeout`` seconds for one when there are none."""
        with self.changed:
            if len(self.events) <= start and self.state in ("queued", "running"):
                self.changed.wait(timeout)
            return self.events[start:]

    def summary(self) -> dict:
        return {"id": self.id, "skill": self.skill, "state": self.state, "events": len(self.events)}


def check_skill_name(name: Any) -> str:
    if not isinstance(name, str) or not SKILL_NAME.fullmatch(name) or name == "default":
        raise TeachError(f"skill name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or "
                         "digit (and not 'default', the policy's own adapter)")
    return name


class TorchChat:
    """Chat on the learner's own model: a reply holds the model's lock, so it waits for a learn step in progress."""

    name = "torch"

    def __init__(self, skills: SkillModel) -> None:
        self.skills = skills

    def generate(self, prompt_ids: list[int], skill: str | None, max_new_tokens: int,
                 on_token: Callable[[int], None]) -> list[int]:
        policy = self.skills.policy
        with self.skills.lock, torch.no_grad(), policy.using_adapter(skill):
            reply, = policy.generate([prompt_ids], max_new_tokens=max_new_tokens, greedy=True,
                                     stop_token_ids=self.skills.chat.end_of_turn_ids,
                                     on_token=lambda row, token: on_token(token))
        return reply.token_ids

    def publish(self, skill: str) -> None:
        """Nothing to do: the chat reads the learner's weights."""

    def forget(self, skill: str) -> None:
        pass

    def close(self) -> None:
        pass


class LlamaCppChat:
    """Chat on llama.cpp, a model of its own: each skill's adapter is written to it as a GGUF LoRA file when
    published (after a learn), and swapped in for the requests that name the skill."""

    name = "llama.cpp"

    def __init__(self, skills: SkillModel, gguf: str | os.PathLike | None = None) -> None:
        from rllama.backends.llamacpp import LlamaCppBackend

        self.skills = skills
        self.backend = LlamaCppBackend(gguf, n_ctx=2048, max_sequences=1, max_ctx=8192)
        self.backend.bind(skills.policy)
        self.folder = tempfile.TemporaryDirectory(prefix="rllama-teach-lora-")
        self.files: dict[str, Path] = {}
        self.current: Path | None = None
        self.lock = threading.Lock()  # one reply at a time on the engine
        self.counter = itertools.count()

    def generate(self, prompt_ids: list[int], skill: str | None, max_new_tokens: int,
                 on_token: Callable[[int], None]) -> list[int]:
        with self.lock:
            path = self.files.get(skill) if skill is not None else None
            if path != self.current:
                self.backend.engine.set_adapter(path)
                self.current = path
            reply, = self.backend.engine.generate(
                [prompt_ids], max_new_tokens, True, set(self.skills.chat.end_of_turn_ids), None,
                float(self.skills.policy.temperature), None, on_token=lambda row, token: on_token(token))
        return reply.token_ids

    def publish(self, skill: str) -> None:
        """Write ``skill``'s adapter (as the learner holds it now) for the chat; call with the learner's lock held."""
        from rllama.backends.gguf import write_lora_gguf

        path = Path(self.folder.name) / f"{skill}-{next(self.counter)}.gguf"
        write_lora_gguf(self.skills.policy.lm, skill, path, self.backend.engine.architecture)
        with self.lock:
            old = self.files.get(skill)
            self.files[skill] = path
            if old is not None and old != self.current:
                old.unlink(missing_ok=True)

    def forget(self, skill: str) -> None:
        with self.lock:
            path = self.files.pop(skill, None)
            if path is not None and path == self.current:
                self.backend.engine.set_adapter(None)
                self.current = None
            if path is not None:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self.lock:
            self.backend.close()
            self.folder.cleanup()


def make_chat(skills: SkillModel, engine: str = "auto", gguf: str | os.PathLike | None = None):
    """The chat engine: ``"llama.cpp"``, ``"torch"``, or ``"auto"`` (llama.cpp where it can serve this model)."""
    if engine not in ("auto", "torch", "llama.cpp"):
        raise ValueError(f"chat engine {engine!r}: expected 'auto', 'torch' or 'llama.cpp'")
    if engine == "torch":
        return TorchChat(skills)
    from rllama.backends import llamacpp

    if engine == "auto" and not (llamacpp.available() and (gguf is not None or llamacpp.gguf_of(skills.policy))):
        logger.info("chat runs in torch: llama.cpp is %s", "not installed" if not llamacpp.available()
                    else "installed but knows no GGUF file of this model (pass gguf=...)")
        return TorchChat(skills)
    return LlamaCppChat(skills, gguf)


class Teacher:
    """Skills with their examples, a chat that answers while they learn, and a folder they are saved to.

    Args:
        skills: the :class:`~rllama.skills.SkillModel` (``None``: the embedded default model).
        folder: where skills are saved, one subfolder each; the skills found there are loaded.
        engine: the chat engine, ``"auto"`` (llama.cpp where possible), ``"llama.cpp"`` or ``"torch"``.
        gguf: the GGUF file of the model for the llama.cpp chat (``None``: the one rllama knows for it).
        lora_config: the adapter of a new skill (default: LoRA on every block, which learns a new fact
            faster than the policy's top blocks: ``examples/zoggian.py``).
        epochs: epochs of each learn (``SkillModel.learn``).
        learning_rate: its learning rate.
        max_new_tokens: the longest reply.
        load_roots: folders whose skill and adapter folders may be loaded (default: ``folder`` and the
            working directory).
    """

    def __init__(self, skills: SkillModel | None = None, folder: str | os.PathLike = "skills", *,
                 engine: str = "auto", gguf: str | os.PathLike | None = None, lora_config=None, epochs: int = 12,
                 learning_rate: float = 3e-4, max_new_tokens: int = 64,
                 load_roots: Sequence[str | os.PathLike] | None = None) -> None:
        from rllama.policy import default_lora_config

        self.skills = skills if skills is not None else SkillModel()
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lora_config = lora_config or default_lora_config(layers="all")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs={epochs!r}; expected a positive integer")
        if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate!r}; expected a positive number")
        self.epochs, self.learning_rate, self.max_new_tokens = epochs, float(learning_rate), int(max_new_tokens)
        self.load_roots = [Path(p).expanduser().resolve() for p in (load_roots or [self.folder, Path.cwd()])]
        self.state_lock = threading.RLock()  # the skills table and the folder
        self.table: dict[str, Skill] = {}
        self.jobs: dict[str, LearnJob] = {}
        self.learning: dict[str, list[str]] = {}  # skill -> its queued or running jobs
        self._job_ids = itertools.count(1)
        self._learner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rllama-teach-learn")
        self.chat = make_chat(self.skills, engine, gguf)
        self.damaged: dict[str, str] = {}  # skill folders found damaged at the start: name -> why
        for path in sorted(self.folder.iterdir()):
            if path.is_dir() and not path.name.startswith(".") and (recover_dir(path) / SKILL_FILE).is_file():
                try:
                    self.table[path.name] = self._load_folder(path, path.name)
                except (CorruptFileError, RLlamaError) as exc:
                    self.damaged[path.name] = str(exc)
                    logger.warning("skill folder %s is not loaded: %s", path, exc)

    # ------------------------------------------------------------------ skills
    def info(self) -> dict:
        policy = self.skills.policy
        return {"model": policy.base_model_name or type(policy.lm.get_base_model()).__name__,
                "engine": self.chat.name, "folder": str(self.folder), "epochs": self.epochs,
                "learning_rate": self.learning_rate, "max_new_tokens": self.max_new_tokens,
                "damaged": dict(self.damaged)}

    def list_skills(self) -> list[dict]:
        with self.state_lock:
            return [self._describe(s) for s in sorted(self.table.values(), key=lambda s: s.name)]

    def _describe(self, skill: Skill) -> dict:
        return {"name": skill.name, "examples": len(skill.examples), "steps": skill.steps,
                "folder": str(self.folder / skill.name), "saved_at": skill.saved_at,
                "learning": list(self.learning.get(skill.name, []))}

    def skill(self, name: str) -> Skill:
        if not isinstance(name, str):
            raise TeachError(f"skill must be a skill's name (a string); got {type(name).__name__}")
        with self.state_lock:
            found = self.table.get(name)
        if found is None:
            raise TeachError(f"no skill named {name!r}; skills: {sorted(self.table)}", 404)
        return found

    def _check_free(self, name: str) -> None:
        """Refuse a skill name taken by a skill, a folder in the skills folder, or another adapter of the model."""
        if name in self.table or (self.folder / name).exists():
            raise TeachError(f"a skill named {name!r} exists already (or a folder of that name in {self.folder})", 409)
        if name in self.skills.list_adapters():
            raise TeachError(f"the model already has an adapter named {name!r} that is not a skill (an agent's): "
                             "pick another name", 409)

    def create_skill(self, name: Any) -> dict:
        name = check_skill_name(name)
        with self.state_lock:
            self._check_free(name)
            skill = Skill(name)
            self._save(skill)  # on disk first: a failed save leaves no skill behind
            self.table[name] = skill
            return self._describe(skill)

    def rename_skill(self, name: str, new: Any) -> dict:
        new = check_skill_name(new)
        with self.state_lock:
            skill = self.skill(name)
            self._idle(name, "renamed")
            self._check_free(new)
            adapted = name in self.skills.list_adapters()
            if adapted:  # a copy under the new name first: the old one stays until the new one is saved
                with self.skills.lock, tempfile.TemporaryDirectory(prefix="rllama-rename-") as tmp:
                    self.skills.policy.save_adapter(name, Path(tmp) / "adapter")
                    self.skills.policy.load_adapter(new, Path(tmp) / "adapter")
            renamed = Skill(new, skill.examples, skill.steps)
            try:
                self._save(renamed)
            except BaseException:
                if adapted:
                    self.skills.delete_adapter(new)
                raise
            with self.skills.lock:
                if adapted:
                    self.chat.publish(new)
                    self.chat.forget(name)
                    self.skills.policy.delete_adapter(name)
            self.table[new] = renamed
            del self.table[name]
            self._remove_folder(self.folder / name)
            return self._describe(renamed)

    def delete_skill(self, name: str) -> None:
        with self.state_lock:
            self.skill(name)
            self._idle(name, "deleted")
            if name in self.skills.list_adapters():
                self.skills.delete_adapter(name)
            self.chat.forget(name)
            del self.table[name]
            self._remove_folder(self.folder / name)

    def save_skill(self, name: str) -> dict:
        with self.state_lock:
            skill = self.skill(name)
            self._save(skill)
            return self._describe(skill)

    def _idle(self, name: str, what: str) -> None:
        if self.learning.get(name):
            raise TeachError(f"skill {name!r} is learning (jobs {self.learning[name]}); it can be {what} when "
                             "they finish", 409)

    def _remove_folder(self, path: Path) -> None:
        """Remove a skill's folder: first renamed aside (one atomic step), then deleted."""
        if path.exists():
            aside = path.with_name(f".{path.name}.deleted-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(path, aside)
            shutil.rmtree(aside, ignore_errors=True)

    # ------------------------------------------------------------------ saving and loading
    def _save(self, skill: Skill, examples: list[dict] | None = None) -> None:
        """Write the skill's folder whole (examples, adapter, checksum manifest), replacing the previous save;
        ``examples``, when given, replace the skill's once they are on disk (a failed save changes nothing)."""
        examples = skill.examples if examples is None else examples
        try:
            self._write(skill, examples)
        except OSError as exc:
            raise TeachError(f"could not save skill {skill.name!r} to {self.folder / skill.name}: {exc}; nothing "
                             "was changed", 507 if getattr(exc, "errno", None) == 28 else 500) from exc
        skill.examples = examples
        skill.saved_at = time.time()

    def _write(self, skill: Skill, examples: list[dict]) -> None:
        with self.state_lock, writing_dir(self.folder / skill.name) as tmp:
            record = {"format": FORMAT, "version": FORMAT_VERSION, "name": skill.name, "steps": skill.steps,
                      "base_model": self.skills.policy.base_model_name, "examples": examples}
            (tmp / SKILL_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
            if skill.name in self.skills.list_adapters():
                with self.skills.lock:
                    from rllama.policy import persistence

                    (tmp / "adapter").mkdir()
                    persistence.write_adapter(self.skills.policy.lm, skill.name, tmp / "adapter")

    def _load_folder(self, path: Path, name: str) -> Skill:
        """Load a skill folder this class saved (checked against its manifest) as skill ``name``."""
        verify_dir(path, required=f"{SKILL_FILE} is a skill's, whose folders always carry one", must_list=(SKILL_FILE,))
        record = read_json(path / SKILL_FILE)
        if record.get("format") != FORMAT or not isinstance(record.get("version"), int):
            raise CorruptFileError(f"{path / SKILL_FILE} is not an rllama skill file")
        if record["version"] > FORMAT_VERSION:
            raise CorruptFileError(f"{path / SKILL_FILE} has version {record['version']}; this rllama reads up to "
                                   f"{FORMAT_VERSION}: upgrade rllama")
        examples = record.get("examples", [])
        try:
            examples = validate_examples(examples) if examples != [] else []
        except ValueError as exc:
            raise CorruptFileError(f"{path / SKILL_FILE}: {exc}") from None
        examples = [{"prompt": e["prompt"], "response": e["response"]} for e in examples]
        steps = record.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise CorruptFileError(f"{path / SKILL_FILE}: steps={steps!r} is not a count")
        adapter = path / "adapter"
        if adapter.is_symlink() or (adapter.exists() and not adapter.resolve().is_relative_to(path.resolve())):
            raise CorruptFileError(f"{adapter} is a link out of its skill folder; a saved skill holds its adapter")
        if adapter.is_dir():
            listed = read_json(path / "manifest.json").get("files", {})
            if not any(str(k).startswith("adapter/") for k in listed):
                raise CorruptFileError(f"{path / 'manifest.json'} does not list the files of {adapter}: the folder "
                                       "was put together by hand or damaged")
            self._load_adapter(adapter, name)
        return Skill(name, examples, steps, saved_at=(path / SKILL_FILE).stat().st_mtime)

    def _load_adapter(self, path: Path, name: str) -> None:
        with self.skills.lock:
            self.skills.policy.load_adapter(name, path)
            try:
                self.chat.publish(name)
            except BaseException:
                self.skills.policy.delete_adapter(name)
                raise

    def load_skill(self, path: Any, name: Any = None) -> dict:
        """Load a skill folder (``skill.json`` and its adapter) or a PEFT adapter folder as skill ``name``
        (default: the folder's name), copied into this teacher's folder."""
        if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
            raise TeachError(f"path must be a folder path; got {str(path)[:80]!r}")
        try:
            source = Path(path).expanduser().resolve()
            inside = [p.resolve() for p in [source, *source.rglob("*")]] if source.is_dir() else [source]
        except (OSError, RuntimeError) as exc:  # a symlink loop, an unknown ~user, a name too long
            raise TeachError(f"cannot read {path!r}: {exc}", 404) from None
        outside = [p for p in inside if not any(p == root or p.is_relative_to(root) for root in self.load_roots)]
        if outside:
            raise TeachError(f"{path!r} is or holds a link to {str(outside[0])!r}, outside the folders skills may be "
                             f"loaded from ({', '.join(map(str, self.load_roots))})", 403)
        name = check_skill_name(name if name is not None else source.name)
        with self.state_lock:
            self._check_free(name)
            try:
                if (source / SKILL_FILE).is_file():
                    skill = self._load_folder(source, name)
                elif (source / "adapter_config.json").is_file():
                    self._load_adapter(source, name)
                    skill = Skill(name)
                else:
                    raise TeachError(f"{path!r} holds neither a skill ({SKILL_FILE}) nor a PEFT adapter "
                                     "(adapter_config.json)", 404)
            except TeachError:
                raise
            except (CorruptFileError, RLlamaError) as exc:
                raise TeachError(f"cannot load {path!r}: {exc}") from None
            return self._enter(skill)

    def _enter(self, skill: Skill) -> dict:
        """Save a skill whose adapter was just loaded and list it; a failed save takes the adapter out again."""
        try:
            self._save(skill)
        except BaseException:
            self._unload(skill.name)
            raise
        self.table[skill.name] = skill
        return self._describe(skill)

    def _unload(self, name: str) -> None:
        """Take adapter ``name`` out of the model and the chat (a load or adoption that could not be saved)."""
        with self.skills.lock:
            self.chat.forget(name)
            if name in self.skills.list_adapters():
                self.skills.policy.delete_adapter(name)

    def adopt_adapter(self, adapter: str, name: Any) -> dict:
        """Make a copy of the policy's adapter ``adapter`` (an agent's trained one) the skill ``name``."""
        name = check_skill_name(name)
        with self.state_lock:
            self._check_free(name)
            with tempfile.TemporaryDirectory(prefix="rllama-adopt-") as tmp:
                with self.skills.lock:
                    self.skills.policy.save_adapter(adapter, Path(tmp) / "adapter")
                self._load_adapter(Path(tmp) / "adapter", name)
            skill = Skill(name)
            return self._enter(skill)

    # ------------------------------------------------------------------ examples
    def examples(self, name: str) -> list[dict]:
        with self.state_lock:
            return [dict(e) for e in self.skill(name).examples]

    def set_examples(self, name: str, examples: Any) -> list[dict]:
        """Replace the skill's examples (an empty list clears them)."""
        if not isinstance(examples, list):
            raise TeachError("examples must be a list of {prompt, response} objects")
        if len(examples) > MAX_EXAMPLES:
            raise TeachError(f"{len(examples)} examples; a skill holds at most {MAX_EXAMPLES}")
        try:
            checked = validate_examples(examples) if examples else []
        except ValueError as exc:
            raise TeachError(str(exc)) from None
        with self.state_lock:
            skill = self.skill(name)
            self._save(skill, [{"prompt": e["prompt"], "response": e["response"]} for e in checked])
            return self.examples(name)

    def add_example(self, name: str, prompt: Any, response: Any) -> list[dict]:
        """Add one example: a corrected reply, or an approved one."""
        with self.state_lock:
            return self.set_examples(name, self.examples(name) + [{"prompt": prompt, "response": response}])

    def export_jsonl(self, name: str) -> str:
        """The examples as trajectory JSONL (:mod:`rllama.trajectories`): one single-step episode each, reward 1.

        :func:`~rllama.trajectories.read_trajectories` reads it back, and
        :func:`~rllama.trajectories.behaviour_cloning` trains an agent's adapter on it."""
        lines = []
        for i, e in enumerate(self.examples(name)):
            messages = ([{"role": "system", "content": self.skills.system_prompt}] if self.skills.system_prompt
                        else []) + [{"role": "user", "content": e["prompt"]}]
            lines.append(json.dumps({"episode": i, "step": 0, "observation": e["prompt"], "prompt": messages,
                                     "response": e["response"], "action": e["response"], "reward": 1.0,
                                     "done": True, "metadata": {"skill": name}}, ensure_ascii=False))
        return "".join(line + "\n" for line in lines)

    # ------------------------------------------------------------------ chat
    def check_request(self, prompt: Any, skill: Any = None, max_new_tokens: Any = None) -> tuple[list[int], int]:
        """``(prompt token ids, max_new_tokens)`` of a chat request, or a :class:`TeachError` naming what is wrong."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise TeachError("prompt must be a non-empty string")
        problem = utf8_problem(prompt, "the prompt")
        if problem:
            raise TeachError(f"{problem} is a lone surrogate, which no tokenizer takes")
        if skill is not None:
            self.skill(skill)
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1024:
            raise TeachError(f"max_new_tokens={limit!r}; expected an integer from 1 to 1024")
        try:
            ids = self.skills._prompt_ids(prompt)
            self.skills.policy.check_context([len(ids)], lambda i: "the prompt", room=limit)
        except (ValueError, RLlamaError) as exc:
            raise TeachError(str(exc)) from None
        return ids, limit

    def reply(self, prompt: Any, skill: str | None = None, max_new_tokens: int | None = None,
              on_text: Callable[[str], None] | None = None) -> str:
        """The model's reply to ``prompt`` with ``skill``'s adapter (``None``: the base model); ``on_text``
        receives the reply's text as it grows (each new piece)."""
        ids, limit = self.check_request(prompt, skill, max_new_tokens)
        adapter = skill if skill in self.skills.list_adapters() else None  # a skill that never learned: the base
        tokens: list[int] = []
        sent = [""]

        def on_token(token: int) -> None:
            tokens.append(token)
            if on_text is None:
                return
            text = self.skills.chat.decode_reply(tokens)
            if text.endswith("\ufffd"):  # half of a character: wait for the rest
                return
            piece = text[len(sent[0]):] if text.startswith(sent[0]) else text
            if piece:
                sent[0] = text
                on_text(piece)

        try:
            return self.skills.chat.decode_reply(self.chat.generate(ids, adapter, limit, on_token))
        except RLlamaError:
            if skill is not None and skill not in self.skills.list_adapters():  # deleted or renamed meanwhile
                raise TeachError(f"skill {skill!r} was deleted or renamed while it was answering", 409) from None
            raise

    # ------------------------------------------------------------------ learning
    def learn(self, name: str, probe: Any = None) -> LearnJob:
        """Queue a learn of skill ``name`` on its examples as they are now; returns the job at once.

        ``probe``: the prompt whose reply is shown before and after (default: the last example's)."""
        with self.state_lock:
            skill = self.skill(name)
            if not skill.examples:
                raise TeachError(f"skill {name!r} has no examples yet: correct or approve a reply first, then learn")
            examples = self.examples(name)
            if probe is not None:
                self.check_request(probe)
            job = LearnJob(f"job-{next(self._job_ids)}", name)
            self.jobs[job.id] = job
            self.learning.setdefault(name, []).append(job.id)
        job.emit("queued", position=sum(j.state in ("queued", "running") for j in self.jobs.values()) - 1)
        self._learner.submit(self._run, job, examples, probe or examples[-1]["prompt"])
        return job

    def _run(self, job: LearnJob, examples: list[dict], probe: str) -> None:
        start = time.perf_counter()
        job.state = "running"
        try:
            job.emit("started", examples=len(examples), epochs=self.epochs, probe=probe)
            before = self.reply(probe, job.skill)
            job.emit("before", prompt=probe, reply=before)
            with self.skills.lock:
                new = job.skill not in self.skills.list_adapters()
            result = self.skills.learn(examples, adapter=job.skill, epochs=self.epochs,
                                       learning_rate=self.learning_rate, batch_size=8,
                                       lora_config=self.lora_config if new else None,
                                       on_step=lambda s: job.emit("step", **s))
            with self.skills.lock:
                self.chat.publish(job.skill)
            with self.state_lock:
                skill = self.table.get(job.skill)
                if skill is not None:
                    skill.steps += result["steps"]
                    self._save(skill)
            after = self.reply(probe, job.skill)
            job.emit("done", prompt=probe, before=before, after=after, losses=result["losses"],
                     steps=result["steps"], seconds=time.perf_counter() - start)
            job.state = "done"
        except Exception as exc:  # reported to the page; the skill keeps its last save
            logger.exception("learning %s failed", job.skill)
            job.emit("failed", message=f"{type(exc).__name__}: {exc}")
            job.state = "failed"
        finally:
            with job.changed:
                job.changed.notify_all()
            with self.state_lock:
                queued = self.learning.get(job.skill, [])
                if job.id in queued:
                    queued.remove(job.id)
                if not queued:
                    self.learning.pop(job.skill, None)

    def job(self, job_id: str) -> LearnJob:
        found = self.jobs.get(job_id)
        if found is None:
            raise TeachError(f"no learn job {job_id!r}", 404)
        return found

    def wait(self, job_id: str, timeout: float | None = None) -> LearnJob:
        """Block until the job has finished (or ``timeout`` seconds passed); returns it."""
        job = self.job(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with job.changed:
            while job.state in ("queued", "running"):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                job.changed.wait(left)
        return job

    def close(self) -> None:
        self._learner.shutdown(wait=True)
        self.chat.close()


__all__ = ["LearnJob", "Skill", "TeachError", "Teacher", "check_skill_name", "make_chat"]
