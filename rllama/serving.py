"""A small OpenAI-compatible completions server around a :class:`~rllama.policy.PolicyModel`.

It speaks the part of the API that :class:`rllama.backends.OpenAIBackend` uses, the way vLLM does:
``POST /v1/completions`` (token-id prompts, ``echo`` + ``logprobs`` for scoring, sampling with
``seed``, ``stop_token_ids``, ``return_tokens_as_token_ids``), ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter`` (PEFT adapter folders), and ``GET /v1/models``, on FastAPI and uvicorn
(the ``ui`` extra) under the rules every rllama server keeps (:mod:`rllama.web`). It runs one request on
the model at a time. It exists to test the client and to develop against on a machine without vLLM;
for throughput serve the model with vLLM or SGLang.

.. code-block:: python

    from rllama.serving import CompletionServer

    server = CompletionServer(policy, port=0).start()   # a background thread
    print(server.url)                                    # http://127.0.0.1:<port>/v1
    ...
    server.stop()

It is safe to expose within its limits: without ``api_key`` it binds to a loopback address only;
with one, every request must carry ``Authorization: Bearer <api_key>``. Adapters load only from
folders inside ``adapter_root`` (none by default). Bodies, ``max_tokens``, prompts per request and the
time a client may take to send its request are bounded, and every error is answered with an
OpenAI-style JSON body (``{"error": {"message", "type", "code"}}``); unexpected ones as a 500 whose
traceback goes to this module's :mod:`logging` logger, not to the client.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from rllama.errors import RLlamaError
from rllama.fileio import utf8_problem
from rllama.web import (
    BackgroundServer,
    Guard,
    authorized,
    check_binding,
    error_body,
    install_json_errors,
    require_web_stack,
)

logger = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[\w-]{1,100}")  # PEFT adapter names become module keys: no dots


class RequestError(ValueError):
    """A request the server refuses; answered with HTTP ``status`` and ``message`` as a JSON error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CompletionServer:
    """Serves ``policy`` on ``host:port`` (port 0: any free port).

    Requests naming ``model_name`` (or no model) run the base model (adapters disabled); requests
    naming a loaded adapter run with it.

    Args:
        policy: the :class:`~rllama.policy.PolicyModel` to serve.
        host: the address to bind. Without ``api_key`` only a loopback address (``127.0.0.1``,
            ``::1``, ``localhost``) is accepted: anyone who reaches the port could run the model.
        port: the port (0: any free one; see :attr:`url`).
        model_name: the name requests use for the base model.
        api_key: when set, every request must carry ``Authorization: Bearer <api_key>`` (401
            otherwise). ``OpenAIBackend(url, model, api_key=...)`` sends it.
        adapter_root: the folder ``/v1/load_lora_adapter`` may load adapters from (after resolving
            symlinks and ``..``; a relative ``lora_path`` is taken under it). ``None`` (default):
            adapter loading is disabled (403).
        max_body_bytes: the largest request body accepted (413 above it, refused before reading).
        read_timeout_s: seconds a client has to send its whole request (head and body); a stalled
            client, or one that sends a byte now and then, is dropped (408 once its head has arrived),
            so it cannot hold a server thread.
        max_tokens_cap: the largest ``max_tokens`` a request may ask for (400 above it), so one
            request cannot hold the model for long.
        max_prompts: the most prompts one request may carry (400 above it).
    """

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 0, model_name: str = "rllama-base", *,
                 api_key: str | None = None, adapter_root: str | os.PathLike | None = None,
                 max_body_bytes: int = 1 << 20, read_timeout_s: float = 30.0, max_tokens_cap: int = 512,
                 max_prompts: int = 256) -> None:
        require_web_stack("the completions server")
        check_binding(host, api_key)
        for name, value in (("max_body_bytes", max_body_bytes), ("max_tokens_cap", max_tokens_cap),
                            ("max_prompts", max_prompts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive integer")
        if isinstance(read_timeout_s, bool) or not isinstance(read_timeout_s, (int, float)) or \
                not 0 < read_timeout_s < math.inf:
            raise ValueError(f"read_timeout_s={read_timeout_s!r}; expected a positive number of seconds")
        self.adapter_root = None
        if adapter_root is not None:
            self.adapter_root = Path(adapter_root).resolve()
            if not self.adapter_root.is_dir():
                raise ValueError(f"adapter_root={str(adapter_root)!r} is not a folder")
        self.policy = policy
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = float(read_timeout_s)
        self.max_tokens_cap = max_tokens_cap
        self.max_prompts = max_prompts
        self.adapters: set[str] = set()
        self.lock = threading.Lock()
        self.requests = 0
        base = policy.lm.get_base_model()
        self.vocab_size = base.get_input_embeddings().num_embeddings
        self.context_length = policy.context_length
        self.server = BackgroundServer(self.app(), host, port, read_timeout_s=self.read_timeout_s)
        self.server_address = self.server.server_address

    @property
    def url(self) -> str:
        return self.server.base_url + "/v1"

    def start(self) -> CompletionServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> CompletionServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value admits the request (always, without ``api_key``)."""
        return authorized(self.api_key, header)

    def app(self):
        """The ASGI app: the four routes behind :class:`rllama.web.Guard` (key, host, bounded bodies, JSON errors)."""
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response
        from starlette.concurrency import run_in_threadpool

        app = FastAPI(title="rllama completions", docs_url=None, redoc_url=None, openapi_url=None)
        install_json_errors(app, logger)

        @app.exception_handler(RequestError)
        async def refused(request, exc: RequestError):
            return Response(error_body(exc.status, exc.message), status_code=exc.status, media_type="application/json")

        def route(endpoint):
            async def handle(request):  # a Starlette route: the request as it came, checked here
                payload = _payload(await request.body()) if request.method == "POST" else {}
                # the model works in a thread, off the event loop, which keeps reading other requests
                return JSONResponse(await run_in_threadpool(self._run, endpoint, payload))
            return handle

        app.add_route("/v1/models", route(self.models), methods=["GET"])
        app.add_route("/v1/completions", route(self.completions), methods=["POST"])
        app.add_route("/v1/load_lora_adapter", route(self.load_adapter), methods=["POST"])
        app.add_route("/v1/unload_lora_adapter", route(self.unload_adapter), methods=["POST"])
        return Guard(app, self.api_key, self.max_body_bytes, log=logger)

    def _run(self, endpoint, payload: dict[str, Any]) -> dict[str, Any]:
        with self.lock:  # one request on the model at a time
            self.requests += 1
            return endpoint(payload)

    # ------------------------------------------------------------------ routes
    def models(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``GET /v1/models``: the base model's name and the loaded adapters'."""
        names = [self.model_name, *sorted(self.adapters)]
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}

    def _adapter_context(self, model: str | None):
        if model in (None, self.model_name):
            return self.policy.reference()
        if model not in self.adapters:
            served = [self.model_name, *sorted(self.adapters)]
            raise RequestError(404, f"model {model!r} is not served; serving {served}")
        return self.policy.using_adapter(model)

    def load_adapter(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/load_lora_adapter``: load the PEFT folder ``lora_path`` (in ``adapter_root``) as ``lora_name``."""
        if self.adapter_root is None:
            raise RequestError(403, "loading adapters is disabled on this server; start it with "
                                    "adapter_root=<folder> to load adapters saved inside that folder")
        name = _adapter_name(payload)
        if name in self.adapters or name == self.model_name or name in self.policy.list_adapters():
            raise RequestError(400, f"lora_name {name!r} is taken (by the base model, a loaded adapter or the "
                                    "policy's own); unload it first or pick another name")
        path = self._adapter_path(payload.get("lora_path"))
        try:
            self.policy.load_adapter(name, path)
        except RLlamaError:
            logger.warning("loading adapter %r from %s failed", name, path, exc_info=True)
            raise RequestError(400, f"the adapter at lora_path {payload['lora_path']!r} cannot be loaded into "
                                    "this model (the server's log has the details)") from None
        self.adapters.add(name)
        return {"message": f"loaded {name}"}

    def _adapter_path(self, lora_path: Any) -> Path:
        """``lora_path`` resolved (symlinks and ``..`` followed) if it is an adapter folder inside ``adapter_root``.

        Any other path, whether missing, outside the root or not an adapter, gets the same answer, so
        that the server does not tell which folders exist elsewhere on its machine.
        """
        if not isinstance(lora_path, str) or not lora_path or "\x00" in lora_path:
            raise RequestError(400, f"lora_path must be a non-empty string (a folder path); got {_short(lora_path)}")
        refused = RequestError(404, f"lora_path {lora_path!r} is not an adapter folder (one holding "
                                    "adapter_config.json) inside this server's adapter_root")
        try:
            path = (self.adapter_root / lora_path).resolve()
            if not path.is_relative_to(self.adapter_root) or not (path / "adapter_config.json").is_file():
                raise refused
        except (OSError, RuntimeError):  # a symlink loop, an unreadable component, a name too long
            raise refused from None
        return path

    def unload_adapter(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/unload_lora_adapter``: forget the adapter ``lora_name`` loaded before."""
        name = _adapter_name(payload)
        if name not in self.adapters:
            raise RequestError(404, f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters)}")
        self.policy.delete_adapter(name)
        self.adapters.discard(name)
        return {"message": f"unloaded {name}"}

    def completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/completions``: every field checked first (:class:`RequestError`, a 400, names the bad one)."""
        max_tokens = _int_field(payload, "max_tokens", min(16, self.max_tokens_cap))
        if max_tokens > self.max_tokens_cap:
            raise RequestError(400, f"max_tokens={max_tokens} is above this server's max_tokens_cap="
                                    f"{self.max_tokens_cap}; ask for at most {self.max_tokens_cap}")
        prompts = self._prompts(payload.get("prompt"), max_tokens)
        echo = _bool_field(payload, "echo")
        want_logprobs = _int_field(payload, "logprobs", None) is not None
        temperature = _temperature(payload)
        greedy = temperature == 0.0
        as_ids = _bool_field(payload, "return_tokens_as_token_ids")
        stop = _token_ids(payload.get("stop_token_ids") or [], "stop_token_ids")
        seed = _int_field(payload, "seed", None, high=2**63 - 1)
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, f"model must be a string; got {_short(model)}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if not greedy and temperature != self.policy.temperature:
            raise RequestError(400, f"temperature={temperature}: this server samples at temperature "
                                    f"{self.policy.temperature} or 0 (greedy)")

        with torch.no_grad(), self._adapter_context(model):
            echoed = self._prompt_logprobs(prompts) if echo and want_logprobs else None
            replies = (self.policy.generate(prompts, max_new_tokens=max_tokens, greedy=greedy, stop_token_ids=stop,
                                            generator=generator) if max_tokens > 0 else [None] * len(prompts))
        choices = []
        for i, (prompt, reply) in enumerate(zip(prompts, replies)):
            ids = reply.token_ids if reply is not None else []
            lps = reply.token_logprobs if reply is not None else []
            tokens = ([f"token_id:{t}" for t in ids] if as_ids else
                      [self.policy.tokenizer.decode([t]) for t in ids])
            token_logprobs = list(lps)
            text = self.policy.tokenizer.decode(ids)
            if echo:
                text = self.policy.tokenizer.decode(prompt) + text
                prompt_tokens = ([f"token_id:{t}" for t in prompt] if as_ids else
                                 [self.policy.tokenizer.decode([t]) for t in prompt])
                tokens = prompt_tokens + tokens
                token_logprobs = (echoed[i] if echoed is not None else [None] * len(prompt)) + token_logprobs
            finish = "stop" if ids and ids[-1] in stop else "length"
            choice = {"index": i, "text": text, "finish_reason": finish}
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs} if want_logprobs else None
            choices.append(choice)
        return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": model or self.model_name, "choices": choices}

    def _prompts(self, prompts: Any, max_tokens: int) -> list[list[int]]:
        """The request's prompts as token-id lists, each checked against the vocabulary and the context."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and _is_int(prompts[0])):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise RequestError(400, "prompt must be a string, a list of token ids, or a non-empty list of those; "
                                    f"got {_short(prompts)}")
        if len(prompts) > self.max_prompts:
            raise RequestError(400, f"the request carries {len(prompts)} prompts; this server takes at most "
                                    f"max_prompts={self.max_prompts} per request")
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if utf8_problem(prompt, f"prompt[{i}]"):
                    raise RequestError(400, f"prompt[{i}] holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                                            "which is not text any tokenizer takes")
                ids = self.policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = _token_ids(prompt, f"prompt[{i}]")
            if not ids:
                raise RequestError(400, f"prompt[{i}] holds no tokens; every prompt must hold at least one")
            outside = [t for t in ids if not 0 <= t < self.vocab_size]
            if outside:
                raise RequestError(400, f"prompt[{i}] holds token ids {outside[:5]} outside the vocabulary "
                                        f"[0, {self.vocab_size})")
            if self.context_length and len(ids) + max_tokens > self.context_length:
                raise RequestError(400, f"prompt[{i}] has {len(ids)} tokens; with max_tokens={max_tokens} that "
                                        f"exceeds the model's context of {self.context_length} tokens")
            out.append(ids)
        return out

    def _prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """Each prompt token's log-prob given the tokens before it (``None`` for the first)."""
        out: list[list[float | None]] = [[None] for _ in prompts]
        rows = [i for i, p in enumerate(prompts) if len(p) > 1]
        if rows:
            enc = self.policy.continuation_logprobs([prompts[i][:1] for i in rows], [prompts[i][1:] for i in rows],
                                                    list(range(len(rows))))
            for j, i in enumerate(rows):
                n = len(prompts[i]) - 1
                out[i] += [float(x) for x in enc.token_logprobs[j, :n].tolist()]
        return out


def _payload(data: bytes) -> dict[str, Any]:
    """The JSON object in a request body (``{}`` for an empty one)."""
    if not data:
        return {}
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise RequestError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"the body must be a JSON object; got {type(payload).__name__}")
    return payload


def _short(value: Any) -> str:
    """A value for an error message: its type and the start of its repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(payload: dict[str, Any], name: str, default: int | None, high: int | None = None) -> int | None:
    """``payload[name]``: a non-negative integer (at most ``high``), or ``default`` when absent or null."""
    value = payload.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < 0 or (high is not None and value > high):
        upper = f" up to {high}" if high is not None else ""
        raise RequestError(400, f"{name} must be a non-negative integer{upper}; got {_short(value)}")
    return value


def _bool_field(payload: dict[str, Any], name: str) -> bool:
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false; got {_short(value)}")
    return value


def _temperature(payload: dict[str, Any]) -> float:
    value = payload.get("temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise RequestError(400, f"temperature must be a non-negative number; got {_short(value)}")
    return float(value)


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise RequestError(400, f"{name} must be a list of integer token ids; got {_short(value)}")
    return list(value)


def _adapter_name(payload: dict[str, Any]) -> str:
    name = payload.get("lora_name")
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise RequestError(400, f"lora_name must be 1-100 letters, digits, '_' or '-'; got {_short(name)}")
    return name
