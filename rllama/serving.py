"""A small OpenAI-compatible completions server around a :class:`~rllama.policy.PolicyModel`.

It speaks the part of the API that :class:`rllama.backends.OpenAIBackend` uses, the way vLLM does:
``POST /v1/completions`` (token-id prompts, ``echo`` + ``logprobs`` for scoring, sampling with
``seed``, ``stop_token_ids``, ``return_tokens_as_token_ids``), ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter`` (PEFT adapter folders), and ``GET /v1/models``. It serves one request at a
time. It exists to test the client and to develop against on a machine without vLLM; for throughput
serve the model with vLLM or SGLang.

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

import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from rllama.errors import RLlamaError

logger = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[\w-]{1,100}")  # PEFT adapter names become module keys: no dots
API_KEY = re.compile(r"[\x21-\x7e]+")  # what an HTTP header carries unchanged: visible ASCII


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
        if api_key is not None and not (isinstance(api_key, str) and API_KEY.fullmatch(api_key)):
            raise ValueError("api_key: expected a non-empty string of visible ASCII characters without spaces; got "
                             f"an unusable {type(api_key).__name__} (its value is not shown: it is a secret)")
        if api_key is None and not _is_loopback(host):
            raise ValueError(f"host={host!r} is not a loopback address and api_key is None: anyone who can reach "
                             f"the port could run the model; pass api_key=... (clients send 'Authorization: Bearer "
                             "<api_key>') or serve on host='127.0.0.1'")
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
        self.routes = {("GET", "/v1/models"): self.models, ("POST", "/v1/completions"): self.completions,
                       ("POST", "/v1/load_lora_adapter"): self.load_adapter,
                       ("POST", "/v1/unload_lora_adapter"): self.unload_adapter}

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            app = self  # what the handler serves

        self.httpd = Server((host, port), _Handler)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"

    def start(self) -> CompletionServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="rllama-serving")
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> CompletionServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value admits the request (always, without ``api_key``)."""
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        # compare_digest takes as long whatever the key's first wrong byte: no timing oracle
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

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
        except (OSError, RuntimeError):  # a symlink loop, an unreadable component
            raise refused from None
        if not path.is_relative_to(self.adapter_root) or not (path / "adapter_config.json").is_file():
            raise refused
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


class _Handler(BaseHTTPRequestHandler):
    """One connection: authenticate, bound and parse the body, run the route, answer JSON (errors too)."""

    server_version = "rllama-serving"
    sys_version = ""  # no Python version in the Server header

    def setup(self) -> None:
        # StreamRequestHandler sets this as the socket's timeout: a backstop to the watchdog below (which
        # bounds the whole request), for a client that stops reading its answer
        self.timeout = 2 * self.server.app.read_timeout_s
        super().setup()
        self._watchdog: threading.Timer | None = None
        self._expired = False
        self._arm()

    # A client that sends a byte every few seconds is never silent for read_timeout_s: a watchdog bounds
    # the whole request instead. Armed while a request is read, it closes the reading side when time is
    # up (the blocked read returns at once), and is disarmed while the request runs.
    def _arm(self) -> None:
        self._disarm()
        self._watchdog = threading.Timer(self.server.app.read_timeout_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _expire(self) -> None:
        self._expired = True
        try:
            self.connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def finish(self) -> None:
        self._disarm()
        super().finish()

    def log_message(self, fmt, *args) -> None:
        logger.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        app = self.server.app
        try:
            if self._expired:  # the head was cut short at the deadline
                raise TimeoutError
            if not app.authorized(self.headers.get("Authorization")):
                raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <api_key>'")
            route = self.path.split("?", 1)[0].rstrip("/")
            endpoint = app.routes.get((method, route))
            if endpoint is None:
                allowed = [m for m, r in app.routes if r == route]
                raise RequestError(405 if allowed else 404, f"{method} {route} is not served" +
                                   (f"; use {allowed[0]}" if allowed else ""))
            payload = self._read_payload(app.max_body_bytes) if method == "POST" else {}
            self._disarm()  # the request is in: its work is not bounded by the read deadline
            with app.lock:
                app.requests += 1
                body = endpoint(payload)
            self._send_json(200, body)
        except RequestError as exc:
            self._send_error(exc.status, exc.message)
        except TimeoutError:
            self._send_error(408, f"the request was not sent within read_timeout_s={app.read_timeout_s}")
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("%s %s failed (error id %s)", method, self.path, error_id)
            self._send_error(500, f"internal server error (error id {error_id}); the server's log has the details")
        if not self.close_connection:
            self._arm()  # the next request on this connection gets its own deadline

    def _read_payload(self, limit: int) -> dict[str, Any]:
        """The JSON object in the body, refused before reading when its Content-Length is absent or above ``limit``."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "chunked bodies are not accepted; send a Content-Length header")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise RequestError(411, "a POST needs a Content-Length header")
        value = values[0].strip()
        if len(set(values)) > 1 or not re.fullmatch(r"[0-9]+", value):
            raise RequestError(400, f"Content-Length {', '.join(values)!r} is not one non-negative integer")
        if len(value.lstrip("0")) > len(str(limit)) or int(value) > limit:
            raise RequestError(413, f"the body has {value} bytes; this server accepts at most "
                                    f"max_body_bytes={limit}")
        length = int(value)
        data = self.rfile.read(length)
        if len(data) < length:
            if self._expired:
                raise TimeoutError
            raise RequestError(400, f"the body ended after {len(data)} of its {length} bytes")
        if not data:
            return {}
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
            raise RequestError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(payload, dict):
            raise RequestError(400, f"the body must be a JSON object; got {type(payload).__name__}")
        return payload

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unsupported method) answer JSON too."""
        if self._expired:  # the head was cut short by the deadline, not malformed by the client
            code, message = 408, f"the request was not sent within read_timeout_s={self.server.app.read_timeout_s}"
        self._send_error(code, message or self.responses.get(code, ("error",))[0])

    def _send_error(self, status: int, message: str) -> None:
        # the body may be unread: the connection cannot carry another request
        self.close_connection = True
        headers = {"Connection": "close"}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._send_json(status, {"error": {"message": message, "type": _error_type(status), "code": status}},
                        headers)

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        if self.request_version == "HTTP/0.9":  # a request line cut short (no version): answer with a status line
            self.request_version = "HTTP/1.0"
        try:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(data)
        except OSError as exc:  # the client left (or stalled) before reading its answer
            logger.debug("could not answer %s: %s", self.address_string(), exc)
            self.close_connection = True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or "": it may resolve to (or mean) any interface
        return False


def _error_type(status: int) -> str:
    """The OpenAI-style ``error.type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            408: "timeout_error"}.get(status, "invalid_request_error")


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
