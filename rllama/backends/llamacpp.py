"""Sampling replies with llama.cpp on the model's GGUF file, the learner's adapter swapped in after each update.

This is the CPU counterpart of the rollout/trainer split that GPU frameworks run with vLLM or SGLang:
llama.cpp samples, the learner trains the LoRA adapter in torch, and after every update the adapter
goes from the learner to the engine (:mod:`rllama.backends.gguf`) without reloading the base model.

- **One decode per token for the whole batch.** Each prompt gets a sequence of llama.cpp's KV cache
  (a *slot*); every step decodes one token of every unfinished reply in one ``llama_decode``.
- **Prefix reuse.** A slot keeps the tokens its KV holds. A new prompt continues the slot that
  already holds the longest start of it (the same episode's earlier turn), or shares the cells of
  another slot's prefix (the system prompt), so only the new tokens are evaluated.
- **Exact behaviour log-probs.** Tokens are sampled here, from ``softmax(logits / temperature)`` of
  the engine's logits, and each one's log-probability under that distribution is recorded. The
  learner recomputes its own before the update and corrects for the (small) difference with capped
  importance weights; the mismatch is logged (``rollout/engine_logprob_diff_*``).
- **Swaps.** When the learner's adapter changed, it is written as a GGUF adapter, loaded, swapped in,
  and the KV cache is cleared (cached prefixes hold the old adapter's keys and values). A file llama.cpp
  refuses is an error naming it, and the previous adapter stays in place.

Steps it acts carry no value estimate (the value head lives in the learner): they are marked
``learner_recompute``. Scoring candidate actions stays in the learner's process (the heads are
there): this backend only generates.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rllama.backends.base import InProcessBackend
from rllama.backends.gguf import adapter_is_zero, write_lora_gguf
from rllama.errors import RLlamaError
from rllama.policy.outputs import GeneratedReply
from rllama.replies import RowConstraints

logger = logging.getLogger(__name__)

MIN_VERSION = (0, 3, 17)
"""The oldest llama-cpp-python whose low-level API (memory, adapters, batches) this backend uses."""

INSTALL = ('pip install "rllama[llamacpp]" (built from source; on CPUs without AMX support pass '
           'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF '
           '-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF", as make install does)')
"""How to install llama.cpp's Python binding the way this project builds it."""


def llama_cpp_module():
    """The ``llama_cpp`` module, or a :class:`~rllama.errors.RLlamaError` saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RLlamaError(f"the llama.cpp backend needs llama-cpp-python >= {'.'.join(map(str, MIN_VERSION))}: "
                          f"{INSTALL}") from exc
    version = tuple(int(x) for x in llama_cpp.__version__.split(".")[:3] if x.isdigit())
    if version < MIN_VERSION:
        raise RLlamaError(f"llama-cpp-python {llama_cpp.__version__} is too old for the llama.cpp backend (needs "
                          f">= {'.'.join(map(str, MIN_VERSION))}): {INSTALL}")
    return llama_cpp


def available() -> bool:
    """Whether a usable llama-cpp-python is installed (imported on the first call)."""
    try:
        llama_cpp_module()
    except RLlamaError:
        return False
    return True


def gguf_of(policy) -> Path | None:
    """The GGUF file ``policy``'s base model was built from, where rllama knows one (the embedded default)."""
    from rllama.policy.loading import DEFAULT_MODEL, default_model_gguf

    if getattr(policy, "base_model_name", None) == DEFAULT_MODEL:
        try:
            return default_model_gguf()
        except RLlamaError:
            return None
    return None


def engine_serves(policy) -> bool:
    """Whether ``backend="auto"`` generates on llama.cpp for ``policy``: llama-cpp-python installed, the
    learner on the CPU, and a GGUF of its base model known (:func:`gguf_of`)."""
    if next(policy.lm.parameters()).device.type != "cpu" or gguf_of(policy) is None:
        return False
    return available()


_LOG_LEVELS = {4: logging.ERROR, 3: logging.INFO}  # ggml_log_level: 4 error, 3 warn (others: debug)
_log_callback = None


def _route_logs(llama_cpp) -> None:
    """llama.cpp's own log lines go to this module's logger (errors and warnings shown, the rest at debug)."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, _user_data):
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            logger.log(_LOG_LEVELS.get(int(level), logging.DEBUG), "llama.cpp: %s", message)

    _log_callback = callback  # kept alive: llama.cpp holds the pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@dataclass
class EngineStats:
    """Counters of a :class:`LlamaCppBackend` (``backend.stats``)."""

    decodes: int = 0  # llama_decode calls
    prompt_tokens: int = 0  # prompt tokens asked for
    prompt_tokens_evaluated: int = 0  # of those, evaluated (the rest came from cached prefixes)
    generated_tokens: int = 0
    swaps: int = 0  # adapters swapped in
    swap_seconds: float = 0.0  # writing + loading + swapping, in total
    evictions: int = 0  # slots emptied to make room in the KV cache
    context_growths: int = 0  # times the KV cache grew (a batch would not fit)
    generate_seconds: float = 0.0
    last_swap_ms: float = field(default=float("nan"))

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


class LlamaCppBackend(InProcessBackend):
    """Generate replies with llama.cpp on the model's GGUF file (scoring stays in this process).

    Args:
        gguf: the GGUF file of the learner's base model. ``None``: the one rllama knows for it (the
            embedded default model's); a model without one is an error naming this option. The file
            must hold the same weights the learner was loaded from (quantised is fine: the learner's
            embedded model is the same GGUF, dequantised).
        n_ctx: KV cache cells at first, shared by all sequences (prompt prefixes shared between sequences
            are held once). Where a batch's prompts and replies would not fit, the cache grows, doubling,
            up to ``max_ctx`` (a new context; the model and adapter stay), rather than evicting the
            prompts it will be asked to extend next step.
        max_ctx: the most cells the cache grows to.
        max_sequences: prompts decoded together (larger batches are split).
        n_batch: tokens evaluated per ``llama_decode`` when evaluating prompts.
        n_threads: llama.cpp's threads (default: torch's, ``torch.get_num_threads()``).
        lazy: load the engine when it first generates (or swaps in an adapter file) rather than when the
            agent binds the backend: for an agent that may never generate on it (one whose reply shape,
            chosen per observation, may be :class:`~rllama.replies.Choices` the learner chooses among
            under relative scores). The file is still checked when the agent is built.

    By default the engine is loaded when the agent binds the backend, so that a file llama.cpp cannot
    load is an error when the agent is built.
    """

    def __init__(self, gguf: str | os.PathLike | None = None, n_ctx: int = 8192, max_sequences: int = 64,
                 n_batch: int = 512, n_threads: int | None = None, max_ctx: int = 32768, lazy: bool = False) -> None:
        for name, value, least in (("n_ctx", n_ctx, 64), ("max_sequences", max_sequences, 1), ("n_batch", n_batch, 1),
                                   ("max_ctx", max_ctx, n_ctx if isinstance(n_ctx, int) else 64)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name}={value!r}; expected an int >= {least}")
        if max_sequences > 256:
            raise ValueError(f"max_sequences={max_sequences}; llama.cpp holds at most 256 sequences")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise ValueError(f"n_threads={n_threads!r}; expected None or a positive int")
        self.gguf = Path(gguf).expanduser() if gguf is not None else None
        self.n_ctx, self.max_sequences, self.n_batch, self.max_ctx = n_ctx, max_sequences, n_batch, max_ctx
        self.n_threads, self.lazy = n_threads, bool(lazy)
        self.stats = EngineStats()
        self.engine: _Engine | None = None
        self._path: Path | None = None  # the GGUF the engine loads, once bound
        self._adapter_key = None  # what the engine's adapter was written from
        self._lock = threading.Lock()
        self._reported: dict[str, float] = {}

    def bind(self, policy) -> None:
        super().bind(policy)
        path = self.gguf or gguf_of(policy)
        if path is None:
            raise RLlamaError(
                f"the llama.cpp backend needs the GGUF file of the learner's base model "
                f"({policy.base_model_name or type(policy.lm.get_base_model()).__name__}), and rllama knows none "
                "for it: pass LlamaCppBackend(gguf='path/to/model.gguf') (convert a transformers model with "
                "llama.cpp's convert_hf_to_gguf.py), or backend='torch' to generate in this process")
        if not path.is_file():
            raise RLlamaError(f"LlamaCppBackend(gguf={str(path)!r}): no such file")
        device = next(policy.lm.parameters()).device
        if device.type != "cpu":
            logger.warning("the llama.cpp backend runs on the CPU while the learner is on %s", device)
        self.close()
        self._path, self._adapter_key = path, None
        if not self.lazy:
            self._load()

    def _load(self) -> _Engine:
        """The engine, loaded on the bound policy's GGUF if it is not yet."""
        if self.engine is None:
            threads = self.n_threads or max(1, torch.get_num_threads())
            engine = _Engine(self._path, self.n_ctx, self.max_sequences, self.n_batch, threads, self.stats,
                             self.max_ctx)
            config_vocab = int(self.policy.lm.get_base_model().get_output_embeddings().weight.shape[0])
            if engine.n_vocab != config_vocab:
                engine.close()
                raise RLlamaError(f"LlamaCppBackend: {self._path} has a vocabulary of {engine.n_vocab} tokens, the "
                                  f"learner's model {config_vocab}: the GGUF is not the learner's base model")
            self.engine, self._adapter_key = engine, None
        return self.engine

    # ------------------------------------------------------------------ weights
    def sync(self, policy=None) -> bool:
        """Swap the learner's active adapter into the engine if it changed since the last swap; returns
        whether it swapped. Called after each update and before each generation."""
        policy = policy or self.policy
        if self.engine is None:  # a lazy engine not loaded yet: its first generation swaps the adapter in
            return False
        adapter = policy.active_adapter
        with torch.no_grad():
            enabled = not getattr(policy, "adapter_disabled", False)
            zero = adapter_is_zero(policy.lm, adapter) or not enabled
            key = None if zero else (adapter, _weights_key(policy.lm, adapter))
        if key == self._adapter_key:
            return False
        start = time.perf_counter()
        if key is None:
            self.engine.set_adapter(None)
        else:
            with tempfile.TemporaryDirectory(prefix="rllama-lora-") as tmp:
                path = Path(tmp) / f"{adapter}.gguf"
                write_lora_gguf(policy.lm, adapter, path, self.engine.architecture)
                self.engine.set_adapter(path)
        self._adapter_key = key
        seconds = time.perf_counter() - start
        self.stats.swaps += 1
        self.stats.swap_seconds += seconds
        self.stats.last_swap_ms = 1000 * seconds
        return True

    def load_adapter_file(self, path: str | os.PathLike) -> None:
        """Swap in a GGUF LoRA adapter file as it is (the learner's weights are not read); an error naming
        the file when llama.cpp refuses it, the previous adapter kept."""
        self._load().set_adapter(Path(path))
        self._adapter_key = ("file", str(path))

    def after_update(self, policy) -> None:
        with self._lock:
            self.sync(policy)

    # ------------------------------------------------------------------ acting
    def generate(self, prompts, max_new_tokens, greedy, stop_token_ids, generator, constraints=None):
        with self._lock:
            self._load()
            self.sync()
            start = time.perf_counter()
            replies = self.engine.generate(
                [list(map(int, p)) for p in prompts], int(max_new_tokens), bool(greedy),
                {int(t) for t in stop_token_ids}, generator, float(self.policy.temperature), constraints)
            self.stats.generate_seconds += time.perf_counter() - start
            return replies

    def update_stats(self) -> dict[str, float]:
        """Since the last call: ms per generated token, the share of prompt tokens taken from the KV
        cache, the last swap's ms."""
        now, before = self.stats.as_dict(), self._reported
        self._reported = now
        delta = {k: now[k] - before.get(k, 0.0) for k in now}
        out = {"engine/swap_ms": now["last_swap_ms"]}
        if delta["generated_tokens"]:
            out["engine/ms_per_token"] = 1000 * delta["generate_seconds"] / delta["generated_tokens"]
        if delta["prompt_tokens"]:
            out["engine/prompt_reuse"] = 1 - delta["prompt_tokens_evaluated"] / delta["prompt_tokens"]
        out["engine/evictions"] = delta["evictions"]
        out["engine/kv_cells"] = float(self.engine.n_ctx) if self.engine is not None else float("nan")
        return out

    def close(self) -> None:
        """Free llama.cpp's model and context (also done when the backend is garbage-collected)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _weights_key(lm, adapter: str) -> tuple:
    """A cheap fingerprint of ``adapter``'s weights: each LoRA tensor's version counter and sum."""
    params = [p for n, p in lm.named_parameters() if "lora_" in n and f".{adapter}." in n]
    return tuple(p._version for p in params) + tuple(torch.stack([p.float().sum() for p in params]).tolist())


class _Engine:
    """llama.cpp's model, context and KV slots, through the low-level API."""

    def __init__(self, path: Path, n_ctx: int, n_seq: int, n_batch: int, n_threads: int, stats: EngineStats,
                 max_ctx: int | None = None):
        llama_cpp = llama_cpp_module()
        self.lib = llama_cpp
        _route_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        self.path = path
        self.stats = stats
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RLlamaError(f"llama.cpp cannot load {path} (not a GGUF model this llama-cpp-python "
                              f"{llama_cpp.__version__} reads; its log above says why)")
        self.n_seq, self.n_batch, self.n_threads = n_seq, n_batch, n_threads
        self.max_ctx = max(n_ctx, max_ctx or n_ctx)
        self.ctx = None
        try:
            self._make_context(n_ctx)
        except RLlamaError:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        self.architecture = self._meta("general.architecture") or "llama"
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.last_used = [0] * n_seq
        self.clock = 0
        self.adapter = None  # the llama_adapter_lora pointer in use

    def _make_context(self, n_ctx: int) -> None:
        """A context of ``n_ctx`` KV cells in place of the current one (whose cache is then lost)."""
        lib = self.lib
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.n_seq
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = True  # one cache for all sequences: a shared prefix is held once
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise RLlamaError(f"llama.cpp cannot make a context for {self.path} with n_ctx={n_ctx}, "
                              f"max_sequences={self.n_seq}")
        if self.ctx:
            lib.llama_free(self.ctx)
        self.ctx, self.n_ctx = ctx, n_ctx
        self.memory = lib.llama_get_memory(ctx)
        self.slots: list[list[int]] = [[] for _ in range(self.n_seq)]  # the tokens each sequence's KV holds

    def _fit(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Grow the KV cache (doubling, up to ``max_ctx``) where ``prompts``, their shared start held once,
        and their replies would not fit in it together."""
        shared = min(_common_prefix(prompts[0], p) for p in prompts)
        needed = shared + sum(len(p) - shared + max_new_tokens for p in prompts)
        if needed <= self.n_ctx or self.n_ctx >= self.max_ctx:
            return
        size = self.n_ctx
        while size < needed and size < self.max_ctx:
            size *= 2
        size = min(size, self.max_ctx)
        logger.info("llama.cpp backend: %d prompts need about %d KV cells; growing the cache from %d to %d",
                    len(prompts), needed, self.n_ctx, size)
        self._make_context(size)
        if self.adapter:  # the adapter belongs to the model; the new context applies it too
            adapters = (self.lib.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            if self.lib.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                raise RLlamaError("llama.cpp could not apply the adapter to the grown context")
        self.stats.context_growths += 1

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    # ------------------------------------------------------------------ adapters
    def set_adapter(self, path: Path | None) -> None:
        lib = self.lib
        new = None
        if path is not None:
            new = lib.llama_adapter_lora_init(self.model, str(path).encode())
            if not new:
                raise RLlamaError(f"llama.cpp refused the LoRA adapter {path} (its log above says why: a damaged "
                                  f"file, or tensors that do not fit {self.path.name}); the previous adapter stays")
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(new)
            scales = (ctypes.c_float * 1)(1.0)
            status = lib.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        else:
            status = lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        if status != 0:
            if new:
                lib.llama_adapter_lora_free(new)
            raise RLlamaError(f"llama.cpp could not apply the LoRA adapter {path} (status {status}); "
                              "the previous adapter stays")
        if self.adapter:
            lib.llama_adapter_lora_free(self.adapter)
        self.adapter = new
        self.clear()  # no key or value computed with the old adapter survives

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)
        self.slots = [[] for _ in range(self.n_seq)]

    # ------------------------------------------------------------------ decoding
    def _decode(self, entries: list[tuple[int, int, int, bool]], keep: set[int]) -> torch.Tensor:
        """Evaluate ``(token, position, sequence, wants logits)`` entries, ``n_batch`` at a time; the logits
        of the entries that want them, in order, ``[n, vocab]``. Makes room in the KV cache by emptying
        slots outside ``keep`` when llama.cpp finds none."""
        lib, batch = self.lib, self.batch
        rows: list[torch.Tensor] = []
        for start in range(0, len(entries), self.n_batch):
            part = entries[start:start + self.n_batch]
            for i, (token, pos, seq, logits) in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            batch.n_tokens = len(part)
            status = lib.llama_decode(self.ctx, batch)
            if status == 1 and self._evict(keep):
                status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RLlamaError(f"llama.cpp could not decode a batch of {len(part)} tokens (status {status}"
                                  f"{': the KV cache is full, raise n_ctx' if status == 1 else ''})")
            self.stats.decodes += 1
            for token, pos, seq, _ in part:  # the slot's KV now holds these tokens
                slot = self.slots[seq]
                if pos == len(slot):
                    slot.append(token)
            n_out = sum(1 for e in part if e[3])
            if n_out:
                ptr = lib.llama_get_logits(self.ctx)
                flat = (ctypes.c_float * (n_out * self.n_vocab)).from_address(ctypes.addressof(ptr.contents))
                rows.append(torch.frombuffer(flat, dtype=torch.float32).view(n_out, self.n_vocab).clone())
        return torch.cat(rows) if rows else torch.empty(0, self.n_vocab)

    def _evict(self, keep: set[int]) -> bool:
        """Empty the least recently used slots outside ``keep``; whether any was emptied."""
        victims = [s for s in range(self.n_seq) if s not in keep and self.slots[s]]
        for s in victims:
            self.lib.llama_memory_seq_rm(self.memory, s, 0, -1)
            self.slots[s] = []
        self.stats.evictions += len(victims)
        return bool(victims)

    def _assign(self, prompts: list[list[int]]) -> list[int]:
        """A slot per prompt, its KV holding the longest start of the prompt that any slot held; returns
        the slots. Shares cells between slots (``seq_cp``) before truncating any."""
        lib = self.lib
        matches = []
        for prompt in prompts:
            best, length = -1, 0
            for s, held in enumerate(self.slots):
                n = _common_prefix(held, prompt)
                if n > length or (n == length and n > 0 and self.last_used[s] > self.last_used[best]):
                    best, length = s, n
            matches.append((best, min(length, len(prompt) - 1)))  # the last token is evaluated for its logits
        dst = [-1] * len(prompts)
        claimed: set[int] = set()
        for i in sorted(range(len(prompts)), key=lambda i: -matches[i][1]):
            src, length = matches[i]
            if length > 0 and src not in claimed:
                dst[i] = src
                claimed.add(src)
        free = sorted((s for s in range(self.n_seq) if s not in claimed), key=lambda s: self.last_used[s])
        for i in range(len(prompts)):
            if dst[i] < 0:
                dst[i] = free.pop(0)
                lib.llama_memory_seq_rm(self.memory, dst[i], 0, -1)
                self.slots[dst[i]] = []
                src, length = matches[i]
                if length > 0:  # share the other slot's cells of the common prefix
                    lib.llama_memory_seq_cp(self.memory, src, dst[i], 0, length)
                    self.slots[dst[i]] = list(self.slots[src][:length])
        for i, s in enumerate(dst):  # then truncate each slot to what its prompt shares
            length = min(_common_prefix(self.slots[s], prompts[i]), len(prompts[i]) - 1)
            if length < len(self.slots[s]):
                lib.llama_memory_seq_rm(self.memory, s, length, -1)
                del self.slots[s][length:]
            self.clock += 1
            self.last_used[s] = self.clock
        return dst

    def generate(self, prompts: list[list[int]], max_new_tokens: int, greedy: bool, stop: set[int],
                 generator: torch.Generator | None, temperature: float, constraints=None,
                 on_token=None) -> list[GeneratedReply]:
        """One reply per prompt; ``on_token(row, token_id)``, when given, is called for each token as it
        is chosen (``row`` indexes ``prompts``)."""
        if any(not p for p in prompts):
            raise RLlamaError("cannot generate after an empty prompt")
        bad = [t for p in prompts for t in p if not 0 <= t < self.n_vocab]
        if bad:
            raise RLlamaError(f"prompt token id {bad[0]} is outside the GGUF's vocabulary of {self.n_vocab}")
        longest = max(map(len, prompts)) + max_new_tokens
        if longest > self.max_ctx:
            raise RLlamaError(f"a prompt and its reply take {longest} tokens, more than the llama.cpp backend's "
                              f"max_ctx={self.max_ctx}: raise LlamaCppBackend(max_ctx=...)")
        constraints = list(constraints) if constraints is not None else [None] * len(prompts)  # sliced per batch
        replies: list[GeneratedReply] = []
        for start in range(0, len(prompts), self.n_seq):
            end = start + self.n_seq
            row_token = None if on_token is None else (lambda row, token, at=start: on_token(at + row, token))
            replies += self._generate(prompts[start:end], max_new_tokens, greedy, stop, generator, temperature,
                                      constraints[start:end], row_token)
        return replies

    def _prefill_shared(self, prompts: list[list[int]]) -> None:
        """Evaluate the start all ``prompts`` share once, into one slot, when no slot holds it yet (the
        system prompt at an episode's first step): the prompts' slots then share its cells."""
        shared = prompts[0][:min(map(len, prompts)) - 1]  # each prompt's last token is evaluated for its logits
        for prompt in prompts[1:]:
            shared = shared[:_common_prefix(shared, prompt)]
        held = max((_common_prefix(s, shared) for s in self.slots), default=0)
        if len(prompts) < 2 or len(shared) - held < 8:
            return
        (slot,) = self._assign([shared + [-1]])  # a slot holding as much of it as possible
        start = len(self.slots[slot])
        self._decode([(t, pos, slot, False) for pos, t in enumerate(shared[start:], start)], {slot})
        self.stats.prompt_tokens_evaluated += len(shared) - start

    def _generate(self, prompts, max_new_tokens, greedy, stop, generator, temperature, constraints, on_token=None):
        self._fit(prompts, max_new_tokens)
        self._prefill_shared(prompts)
        slots = self._assign(prompts)
        keep = set(slots)
        entries = []
        for prompt, s in zip(prompts, slots):
            held = len(self.slots[s])
            entries += [(t, pos, s, pos == len(prompt) - 1) for pos, t in enumerate(prompt[held:], held)]
            self.stats.prompt_tokens += len(prompt)
            self.stats.prompt_tokens_evaluated += len(prompt) - held
        logits = self._decode(entries, keep)
        replies = [GeneratedReply([], [], math.nan, exact=False) for _ in prompts]
        active = list(range(len(prompts)))
        constraints = RowConstraints(constraints, len(prompts))
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(constraints.mask(logits, active) / temperature, dim=-1)
            tokens = logp.argmax(-1) if greedy else _sample(logp, generator)
            chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
            entries, still = [], []
            for row, token, lp in zip(active, tokens.tolist(), chosen):
                replies[row].token_ids.append(token)
                replies[row].token_logprobs.append(lp)
                self.stats.generated_tokens += 1
                if on_token is not None:
                    on_token(row, token)
                if (token not in stop and len(replies[row].token_ids) < max_new_tokens
                        and not constraints.advance(row, replies[row].token_ids)):
                    s = slots[row]
                    entries.append((token, len(self.slots[s]), s, True))
                    still.append(row)
            if not still:
                break
            logits = self._decode(entries, keep)
            active = still
        return replies

    def close(self) -> None:
        lib = self.lib
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "adapter", None):
            lib.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass


def _sample(logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logp`` ``[A, V]``, drawn from ``exp(logp)`` by inverting its cumulative sum
    (a tenth of ``torch.multinomial``'s time over a 49k vocabulary)."""
    cdf = logp.exp().cumsum(-1)  # [A, V]
    u = torch.rand(logp.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logp.shape[-1] - 1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


__all__ = ["LlamaCppBackend", "available", "engine_serves", "gguf_of", "llama_cpp_module"]
