"""What rllama's web servers share, on FastAPI and uvicorn: who may connect, bounded requests, JSON errors,
and a server that runs in a background thread.

- **Nobody in uninvited.** Without an API key a server binds to a loopback address only, and answers only
  requests whose ``Host`` header names a loopback host (a web page elsewhere cannot reach it through a
  rebound DNS name); a POST, PUT or PATCH must be sent as ``application/json``, even with an empty body
  (a page elsewhere cannot send one without the browser asking first, which is never granted), and a
  request that changes something and names another ``Origin`` is refused. With a key, every protected route
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
    """Raise :class:`~rllama.errors.MissingExtraError` naming the ``ui`` extra when FastAPI or uvicorn is missing."""
    from rllama.errors import require

    for module in ("fastapi", "uvicorn"):
        require(module, "ui", what)


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
        log: where unexpected errors are logged.
        max_head_bytes: the largest header section accepted (431 above it; uvicorn bounds only a head that
            arrives in pieces).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 protected: Callable[[str], bool] = lambda path: True, log: logging.Logger = logger,
                 max_head_bytes: int = 16384) -> None:
        self.app, self.api_key, self.max_body_bytes, self.protected = app, api_key, max_body_bytes, protected
        self.log, self.max_head_bytes = log, max_head_bytes

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
        from starlette.requests import ClientDisconnect

        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:  # the client left, or its request ran past the deadline: nobody to answer
            pass
        except Exception:
            if started:  # answered by the app's handler (install_json_errors), which logged it
                return
            error_id = uuid.uuid4().hex[:12]
            self.log.exception("%s %s failed (error id %s)", scope["method"], scope["path"], error_id)
            await send_error(send, 500, internal_error(error_id))

    def refusal(self, scope, headers: dict[str, list[str]]) -> tuple[int, str] | None:
        """``(status, message)`` when the request is refused before the app sees it, else ``None``."""
        if sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > self.max_head_bytes:
            return 431, f"the request's head is over {self.max_head_bytes} bytes"
        if self.api_key is None:
            host = (headers.get("host") or [""])[0]
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                return 403, (f"Host {host!r} is not a loopback name: without an API key this server answers only "
                             "requests addressed to 127.0.0.1, localhost or [::1]")
        if self.protected(scope["path"]) and not authorized(self.api_key, (headers.get("authorization") or [None])[0]):
            return 401, "missing or wrong API key: send the header 'Authorization: Bearer <api_key>'"
        origin = (headers.get("origin") or [None])[0]
        if origin is not None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            own = (headers.get("host") or [""])[0]
            if origin.split("://", 1)[-1].rstrip("/") != own:
                return 403, (f"a request from the page at {origin!r} to change something here is refused: only "
                             "this server's own pages may")
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
            if kind != "application/json":  # an empty body too: no other page can send this without asking first
                return 415, f"the body must be sent as Content-Type: application/json; got {kind or 'none'!r}"
        return None


def internal_error(error_id: str) -> str:
    return f"internal server error (error id {error_id}); the server's log has the details"


def install_json_errors(app, log: logging.Logger = logger) -> None:
    """Make a FastAPI app answer every error in this module's JSON shape: its own refusals (404, 405),
    validation errors (400), and unexpected exceptions (500, logged to ``log`` with an error id the
    answer names; never the traceback)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    def answer(status: int, message: str, headers=None) -> Response:
        return Response(error_body(status, message), status_code=status, media_type="application/json",
                        headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        allowed = (exc.headers or {}).get("Allow", "")
        message = {404: f"{request.method} {request.url.path} is not served",
                   405: f"{request.method} {request.url.path} is not served" + (f"; use {allowed}" if allowed else "")
                   }.get(exc.status_code, str(exc.detail))
        return answer(exc.status_code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return answer(400, f"bad request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        from starlette.requests import ClientDisconnect

        if isinstance(exc, ClientDisconnect):  # the client left, or ran past its deadline: no one to answer
            return Response(status_code=400)
        error_id = uuid.uuid4().hex[:12]
        log.error("%s %s failed (error id %s)", request.method, request.url.path, error_id,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return answer(500, internal_error(error_id))


async def send_error(send, status: int, message: str, extra_headers=()) -> None:
    body = error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


def raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying a JSON error, for the protocol layer (before or beside the app)."""
    from http import HTTPStatus

    body = error_body(status, message)
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def guarded_protocol(read_timeout_s: float, max_head_bytes: int):
    """uvicorn's HTTP/1.1 protocol (h11) with two rules of this module's servers: a client has
    ``read_timeout_s`` from the first byte of a request to its last, however it trickles them (uvicorn
    bounds only the wait between requests), and a request it cannot parse is answered in JSON. The
    deadline is armed when a connection opens and at the first byte of each later request on it, and
    disarmed once the request is in: the work it asks for is not bounded by it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, config, *args, **kwargs) -> None:
            config.h11_max_incomplete_event_size = max_head_bytes
            super().__init__(config, *args, **kwargs)
            self.deadline = None
            self.cycle_before = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self.deadline is None:
                self.deadline = self.loop.call_later(read_timeout_s, self._expire)
                self.cycle_before = self.cycle  # the last request's: a new one is this request's

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _request_in(self) -> bool:
            return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

        def data_received(self, data: bytes) -> None:
            if not self._request_in():
                self._arm()  # a later request on a kept-alive connection: its own deadline from its first byte
            super().data_received(data)
            if self._request_in():
                self._disarm()

        def _expire(self) -> None:
            self.deadline = None
            if self._request_in() or self.transport.is_closing():
                return
            cycle = self.cycle if self.cycle is not self.cycle_before else None  # None: its head is not in yet
            started = cycle is not None and cycle.response_started
            if cycle is not None:
                cycle.disconnected = True  # the app's answer, if it comes, goes nowhere
                cycle.message_event.set()
            if not started:
                message = f"the request was not sent within read_timeout_s={read_timeout_s}"
                self.transport.write(raw_response(408, message))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            buffered = len(self.conn.trailing_data[0])
            if buffered >= max_head_bytes:
                status, text = 431, f"the request's head is over {max_head_bytes} bytes"
            else:
                status, text = 400, ("malformed HTTP request: its request line or headers do not parse as HTTP/1.1 "
                                     "(which needs a Host header, and one Content-Length of digits)")
            self._disarm()
            self.transport.write(raw_response(status, text))
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start the next request from bytes already buffered
            if not self._request_in() and (self.conn.trailing_data[0] or self.conn.their_state is h11.SEND_BODY):
                self._arm()  # a pipelined request, partly in: its deadline runs from now, not from more bytes

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread: ``start()``, ``url``, ``stop()`` (or ``with``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, read_timeout_s: float = 30.0,
                 max_head_bytes: int = 16384, **uvicorn_options) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))  # bound now: the port is known, and taken, before start()
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                http=guarded_protocol(read_timeout_s, max_head_bytes), **uvicorn_options)
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
