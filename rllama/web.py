"""What rllama's web servers share, on FastAPI and uvicorn: who may connect, bounded requests, JSON errors,
and a server that runs in a background thread.

- **Nobody in uninvited.** Without an API key a server binds to a loopback address only, and answers only
  requests whose ``Host`` header names a loopback host (a web page elsewhere cannot reach it through a
  rebound DNS name); requests with a body must be ``application/json`` (a page elsewhere cannot send
  one without the browser asking first, which is never granted). With a key, every protected route
  needs ``Authorization: Bearer <key>``.
- **Bounded.** A body must announce its length (``Content-Length``), at most ``max_body_bytes``, and is
  refused before it is read when larger.
- **Errors are JSON**, OpenAI's shape: ``{"error": {"message", "type", "code"}}``; an unexpected error is
  a 500 whose traceback goes to the log, not to the client.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable

logger = logging.getLogger(__name__)

API_KEY = re.compile(r"[\x21-\x7e]+")  # what an HTTP header carries unchanged: visible ASCII
LOOPBACK_NAMES = ("localhost",)


def require_web_stack(what: str) -> None:
    """Raise an error naming the ``ui`` extra when FastAPI or uvicorn is missing."""
    import importlib.util

    from rllama.errors import RLlamaError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise RLlamaError(f"{what} needs {' and '.join(missing)}: pip install 'rllama[ui]'")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name or "": it may resolve to (or mean) any interface
        return False


def check_binding(host: str, api_key: str | None, what: str = "the model") -> None:
    """Refuse an unusable ``api_key``, and a non-loopback ``host`` without one."""
    if api_key is not None and not (isinstance(api_key, str) and API_KEY.fullmatch(api_key)):
        raise ValueError("api_key: expected a non-empty string of visible ASCII characters without spaces; got "
                         f"an unusable {type(api_key).__name__} (its value is not shown: it is a secret)")
    if api_key is None and not is_loopback(host):
        raise ValueError(f"host={host!r} is not a loopback address and api_key is None: anyone who can reach "
                         f"the port could run {what}; pass api_key=... (clients send 'Authorization: Bearer "
                         "<api_key>') or serve on host='127.0.0.1'")


def error_type(status: int) -> str:
    """The OpenAI-style ``error.type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            408: "timeout_error"}.get(status, "invalid_request_error")


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type(status), "code": status}}).encode()


def authorized(api_key: str | None, header: str | None) -> bool:
    """Whether an ``Authorization`` header value admits the request (always, without ``api_key``)."""
    if api_key is None:
        return True
    scheme, _, token = (header or "").partition(" ")
    # compare_digest takes as long whatever the key's first wrong byte: no timing oracle
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Guard:
    """ASGI middleware in front of an app: the host, key, body and error rules of this module.

    Args:
        app: the ASGI app guarded.
        api_key: the key protected routes need (``None``: none, and loopback ``Host`` headers only).
        max_body_bytes: the largest body accepted.
        protected: which paths need the key (default: all).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 protected: Callable[[str], bool] = lambda path: True) -> None:
        self.app, self.api_key, self.max_body_bytes, self.protected = app, api_key, max_body_bytes, protected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            status, message = refusal
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            return await send_error(send, status, message, extra)
        try:
            await self.app(scope, receive, send)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("%s %s failed (error id %s)", scope["method"], scope["path"], error_id)
            await send_error(send, 500, f"internal server error (error id {error_id}); the server's log has the "
                                        "details")

    def refusal(self, scope, headers: dict[str, list[str]]) -> tuple[int, str] | None:
        """``(status, message)`` when the request is refused before the app sees it, else ``None``."""
        if self.api_key is None:
            host = (headers.get("host") or [""])[0]
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                return 403, (f"Host {host!r} is not a loopback name: without an API key this server answers only "
                             "requests addressed to 127.0.0.1, localhost or [::1]")
        if self.protected(scope["path"]) and not authorized(self.api_key, (headers.get("authorization") or [None])[0]):
            return 401, "missing or wrong API key: send the header 'Authorization: Bearer <api_key>'"
        if scope["method"] in ("POST", "PUT", "PATCH"):
            if headers.get("transfer-encoding"):
                return 411, "chunked bodies are not accepted; send a Content-Length header"
            values = headers.get("content-length") or []
            if not values:
                return 411, f"a {scope['method']} needs a Content-Length header"
            value = values[0].strip()
            if len(set(values)) > 1 or not re.fullmatch(r"[0-9]+", value):
                return 400, f"Content-Length {', '.join(values)!r} is not one non-negative integer"
            if len(value.lstrip("0")) > len(str(self.max_body_bytes)) or int(value) > self.max_body_bytes:
                return 413, (f"the body has {value} bytes; this server accepts at most "
                             f"max_body_bytes={self.max_body_bytes}")
            kind = (headers.get("content-type") or [""])[0].split(";")[0].strip().lower()
            if int(value) and kind != "application/json":
                return 415, f"the body must be sent as Content-Type: application/json; got {kind or 'none'!r}"
        return None


async def send_error(send, status: int, message: str, extra_headers=()) -> None:
    body = error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread: ``start()``, ``url``, ``stop()`` (or ``with``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))  # bound now: the port is known, and taken, before start()
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **uvicorn_options)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self, timeout: float = 30.0):
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="rllama-web")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start (see the log)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
