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
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class CompletionServer:
    """Serves ``policy`` on ``host:port`` (port 0: any free port).

    Requests naming ``model_name`` (or no model) run the base model (adapters disabled); requests
    naming a loaded adapter run with it.
    """

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 0, model_name: str = "rllama-base") -> None:
        self.policy = policy
        self.model_name = model_name
        self.adapters: set[str] = set()
        self.lock = threading.Lock()
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    names = [server.model_name, *sorted(server.adapters)]
                    self._send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                try:
                    payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                    route = self.path.rstrip("/")
                    with server.lock:
                        server.requests += 1
                        if route == "/v1/completions":
                            body = server.completions(payload)
                        elif route == "/v1/load_lora_adapter":
                            body = server.load_adapter(payload)
                        elif route == "/v1/unload_lora_adapter":
                            body = server.unload_adapter(payload)
                        else:
                            self._send(404, {"error": {"message": f"no route {self.path}"}})
                            return
                    self._send(200, body)
                except (ValueError, KeyError, TypeError) as exc:
                    self._send(400, {"error": {"message": f"{type(exc).__name__}: {exc}"}})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

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

    # ------------------------------------------------------------------ routes
    def _adapter_context(self, model: str | None):
        if model in (None, self.model_name):
            return self.policy.reference()
        if model not in self.adapters:
            raise ValueError(f"model {model!r} is not served; serving {[self.model_name, *sorted(self.adapters)]}")
        return self.policy.using_adapter(model)

    def load_adapter(self, payload: dict[str, Any]) -> dict[str, Any]:
        name, path = str(payload["lora_name"]), str(payload["lora_path"])
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        self.policy.load_adapter(name, path)
        self.adapters.add(name)
        return {"message": f"loaded {name}"}

    def unload_adapter(self, payload: dict[str, Any]) -> dict[str, Any]:
        name = str(payload["lora_name"])
        if name not in self.adapters:
            raise ValueError(f"adapter {name!r} is not loaded")
        self.policy.delete_adapter(name)
        self.adapters.discard(name)
        return {"message": f"unloaded {name}"}

    def completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        prompts = payload["prompt"]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [self.policy.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else
                   [int(t) for t in p] for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        max_tokens = int(payload.get("max_tokens", 16))
        echo = bool(payload.get("echo", False))
        want_logprobs = payload.get("logprobs") is not None
        greedy = float(payload.get("temperature", 1.0)) == 0.0
        as_ids = bool(payload.get("return_tokens_as_token_ids", False))
        stop = [int(t) for t in payload.get("stop_token_ids") or []]
        generator = torch.Generator().manual_seed(int(payload["seed"])) if payload.get("seed") is not None else None
        if not greedy and float(payload.get("temperature", 1.0)) != self.policy.temperature:
            raise ValueError(f"this server samples at temperature {self.policy.temperature} or 0 (greedy)")

        with torch.no_grad(), self._adapter_context(payload.get("model")):
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
                "model": payload.get("model") or self.model_name, "choices": choices}

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
