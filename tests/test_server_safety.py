"""The completion server is safe to expose (key, loopback default, adapter root, bounded bodies, tokens and
waits, JSON errors) and its client keeps its key (no environment key unless asked, no redirects)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rllama import PolicyModel
from rllama.backends import OpenAIBackend
from rllama.errors import RLlamaError
from rllama.serving import CompletionServer
from tests.conftest import make_tiny_lm, make_tokenizer

KEY = "test-key-0123456789"
READ_TIMEOUT = 0.5
BODY_LIMIT = 64 * 1024
TOKENS_CAP = 8


@pytest.fixture(scope="module")
def policy():
    return PolicyModel(make_tiny_lm(seed=0), make_tokenizer(), precision="fp32")


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="module")
def server(policy, adapter_root):
    """One keyed server for the module, with small limits so that the tests reach them fast."""
    with CompletionServer(policy, api_key=KEY, adapter_root=adapter_root, read_timeout_s=READ_TIMEOUT,
                          max_body_bytes=BODY_LIMIT, max_tokens_cap=TOKENS_CAP) as srv:
        yield srv


def call(server, route, payload=None, key=KEY, method=None, body=None, auth=None):
    """``(status, JSON body, headers)`` of one request to ``server.url + route``."""
    data = body if body is not None else (json.dumps(payload).encode() if payload is not None else None)
    headers = {"Content-Type": "application/json"}
    if auth or key:
        headers["Authorization"] = auth or f"Bearer {key}"
    request = urllib.request.Request(server.url + route, data=data, headers=headers,
                                     method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def raw(server, data: bytes):
    """``(status, JSON body)`` of bytes sent as they are on a fresh connection."""
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(data)
        answer = read_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def read_until_closed(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def post_head(length: str | None = None, extra: str = "") -> bytes:
    lines = ["POST /v1/completions HTTP/1.1", "Host: test", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def assert_error(result, status, error_type, *fragments):
    code, body, *_ = result
    assert code == status, body
    assert set(body) == {"error"} and body["error"]["type"] == error_type and body["error"]["code"] == status
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


# ---------------------------------------------------------------------- authentication and binding
def test_requests_need_the_api_key(server):
    completion = {"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
    unauthenticated = call(server, "/completions", completion, key=None)
    assert_error(unauthenticated, 401, "authentication_error", "Authorization: Bearer <api_key>")
    assert unauthenticated[2]["WWW-Authenticate"] == "Bearer"
    assert_error(call(server, "/models", key=None), 401, "authentication_error")
    assert_error(call(server, "/models", key=KEY + "x"), 401, "authentication_error")
    assert_error(call(server, "/models", key=KEY[:-1]), 401, "authentication_error")
    assert_error(call(server, "/models", auth=f"Basic {KEY}"), 401, "authentication_error")
    assert call(server, "/models")[:2] == (200, {"object": "list", "data": [{"id": "rllama-base", "object": "model"}]})
    assert call(server, "/models", auth=f"bearer {KEY}")[0] == 200  # the scheme is case-insensitive
    status, body, _ = call(server, "/completions", completion)
    assert status == 200 and len(body["choices"]) == 1
    # the client sends the key it is given, and only then gets through
    with pytest.raises(RLlamaError, match="HTTP 401"):
        OpenAIBackend(server.url, model="rllama-base").generate([[5, 6]], 2, True, [], None)
    reply, = OpenAIBackend(server.url, model="rllama-base", api_key=KEY).generate([[5, 6]], 2, True, [], None)
    assert len(reply.token_ids) == 2 and math.isnan(reply.value)


def test_without_a_key_the_server_binds_to_loopback_only(policy):
    for host in ("0.0.0.0", "", "::", "192.168.1.20", "example.com"):
        with pytest.raises(ValueError, match=f"host={host!r} is not a loopback address and api_key is None"):
            CompletionServer(policy, host=host)
    for bad in ("", "has space", 123):
        with pytest.raises(ValueError, match="api_key: expected a non-empty string"):
            CompletionServer(policy, api_key=bad)
    srv = CompletionServer(policy)  # the defaults: loopback, no key, no adapters, bounded everything
    try:
        assert srv.url.startswith("http://127.0.0.1:") and srv.api_key is None and srv.adapter_root is None
        assert (srv.max_body_bytes, srv.read_timeout_s, srv.max_tokens_cap) == (1 << 20, 30.0, 512)
    finally:
        srv.stop()
    CompletionServer(policy, host="localhost").stop()


# ---------------------------------------------------------------------- adapters
def test_adapter_loading_is_disabled_by_default(policy, tmp_path):
    path = policy.save_adapter("default", tmp_path / "adapter")
    with CompletionServer(policy) as srv:
        result = call(srv, "/load_lora_adapter", {"lora_name": "a", "lora_path": str(path)}, key=None)
    assert_error(result, 403, "permission_error", "disabled", "adapter_root")
    assert "a" not in policy.list_adapters()


def test_adapters_load_only_from_inside_the_root(server, policy, adapter_root, tmp_path):
    inside = policy.save_adapter("default", adapter_root / "good")
    outside = policy.save_adapter("default", tmp_path / "outside")
    (adapter_root / "link").symlink_to(outside, target_is_directory=True)
    (adapter_root / "not-an-adapter").mkdir()
    assert call(server, "/load_lora_adapter", {"lora_name": "good", "lora_path": str(inside)})[0] == 200
    assert [m["id"] for m in call(server, "/models")[1]["data"]] == ["rllama-base", "good"]
    assert call(server, "/unload_lora_adapter", {"lora_name": "good"})[0] == 200
    assert call(server, "/load_lora_adapter", {"lora_name": "good2", "lora_path": "good"})[0] == 200  # relative
    assert call(server, "/unload_lora_adapter", {"lora_name": "good2"})[0] == 200

    refused = [str(outside),                                      # an adapter outside the root
               os.path.relpath(outside, adapter_root),            # ... reached with ../
               f"{adapter_root}/{os.path.relpath(outside, adapter_root)}",   # ... as root/../..
               "link",                                            # ... through a symlink inside the root
               str(adapter_root / "missing"),                     # missing inside the root
               "/no/such/folder/anywhere",                        # missing outside the root
               str(adapter_root / "not-an-adapter"), str(adapter_root), "/",   # folders that are no adapter
               "a" * 5000]                                        # a name longer than the system takes
    messages = set()
    for path in refused:
        status, body, _ = call(server, "/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert status == 404 and body["error"]["type"] == "not_found_error", (path, body)
        messages.add(body["error"]["message"].replace(repr(path), "<path>"))
    assert messages == {"lora_path <path> is not an adapter folder (one holding adapter_config.json) inside "
                        "this server's adapter_root"}
    assert "x" not in policy.list_adapters() and server.adapters == set()
    assert_error(call(server, "/load_lora_adapter", {"lora_name": "x", "lora_path": 5}), 400,
                 "invalid_request_error", "lora_path must be a non-empty string")
    assert_error(call(server, "/load_lora_adapter", {"lora_name": "a.b", "lora_path": "good"}), 400,
                 "invalid_request_error", "lora_name must be")
    assert_error(call(server, "/load_lora_adapter", {"lora_name": "default", "lora_path": "good"}), 400,
                 "invalid_request_error", "lora_name 'default' is taken")  # the policy's own adapter
    assert_error(call(server, "/unload_lora_adapter", {"lora_name": "default"}), 404, "not_found_error", "not loaded")


@pytest.mark.parametrize("damage", ["cut", "cut-no-manifest", "config-list", "config-rank"])
def test_a_damaged_adapter_in_the_root_is_a_400(server, policy, adapter_root, damage):
    """Saved by rllama (a manifest), or a PEFT folder from elsewhere (none): damage is the client's 400."""
    folder = policy.save_adapter("default", adapter_root / damage)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if damage.startswith("cut"):
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "config-list":
        config.write_text("[1]")
    else:
        config.write_text(json.dumps(dict(json.loads(config.read_text()), r="x")))
    if damage != "cut":
        (folder / "manifest.json").unlink()
    result = call(server, "/load_lora_adapter", {"lora_name": "cut", "lora_path": damage})
    assert_error(result, 400, "invalid_request_error", "cannot be loaded into this model")
    assert "cut" not in policy.list_adapters() and "cut" not in server.adapters


# ---------------------------------------------------------------------- bounded bodies, waits and work
def test_bodies_over_the_limit_are_refused_before_reading(server):
    # only the head is sent: an answer at all shows the server did not wait for the 150 MB it announced
    assert_error(raw(server, post_head(str(150 * 2**20))), 413, "invalid_request_error", f"max_body_bytes={BODY_LIMIT}")
    assert_error(raw(server, post_head("9" * 50)), 400, "invalid_request_error", "Content-Length")  # refused by h11
    assert_error(raw(server, post_head(None)), 411, "invalid_request_error", "Content-Length")
    assert_error(raw(server, post_head(None, "Transfer-Encoding: chunked\r\n")), 411, "invalid_request_error")
    for bad in ("-5", "abc", "1e3", " "):
        assert_error(raw(server, post_head(bad)), 400, "invalid_request_error", "Content-Length")
    assert_error(raw(server, post_head("2", "Content-Length: 3\r\n")), 400, "invalid_request_error")
    # at the limit it is read (and judged on its content)
    assert_error(call(server, "/completions", body=b" " * BODY_LIMIT), 400, "invalid_request_error", "not valid JSON")


def test_a_stalled_client_is_dropped_and_others_are_served(server, caplog):
    caplog.set_level(logging.WARNING)
    address = server.server_address[:2]
    start = time.monotonic()
    stalled_head = socket.create_connection(address, timeout=5)
    stalled_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")  # the head never ends
    stalled_body = socket.create_connection(address, timeout=5)
    stalled_body.sendall(post_head("100") + b'{"prompt": ')                  # the body never ends
    try:
        before = time.monotonic()
        assert call(server, "/models")[0] == 200
        assert time.monotonic() - before < READ_TIMEOUT  # served while the others stall, not after
        for stalled in (stalled_head, stalled_body):
            head, _, body = read_until_closed(stalled).partition(b"\r\n\r\n")
            assert_error((int(head.split()[1]), json.loads(body)), 408, "timeout_error",
                         f"read_timeout_s={READ_TIMEOUT}")
        assert time.monotonic() - start < READ_TIMEOUT + 2.0
    finally:
        stalled_head.close()
        stalled_body.close()
    assert call(server, "/models")[0] == 200
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # a 408 is no server error


@pytest.mark.parametrize("part", ["line", "head", "body"])
def test_a_client_sending_a_byte_now_and_then_is_dropped_at_the_deadline(server, part):
    """Never silent for read_timeout_s, it still has only read_timeout_s for the whole request."""
    start = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        data = post_head("400") + b'{"prompt": [' + b"5, " * 200 if part == "body" else post_head("10")
        # at once: the request line (head) or the whole head (body); then a byte at a time
        sent = {"line": 4, "head": data.index(b"\r\n") + 2, "body": len(post_head("400"))}[part]
        sock.sendall(data[:sent])
        try:
            while sent < len(data) and time.monotonic() - start < 4 * READ_TIMEOUT:
                sock.sendall(data[sent:sent + 1])
                sent += 1
                time.sleep(READ_TIMEOUT / 5)
        except OSError:  # the server closed the connection
            pass
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert elapsed < READ_TIMEOUT + 1.0, elapsed
    head, _, body = answer.partition(b"\r\n\r\n")
    assert_error((int(head.split()[1]), json.loads(body)), 408, "timeout_error", f"read_timeout_s={READ_TIMEOUT}")
    assert call(server, "/models")[0] == 200


def test_a_kept_alive_connection_gives_each_request_its_own_deadline(server):
    """Idle time between requests on one connection does not count; each request gets read_timeout_s from
    its first byte, so a prompt second request passes after a pause and a dripped one is cut at its deadline."""
    get = f"GET /v1/models HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()

    def answer(sock) -> int:
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        status_line, _, rest = head.partition(b"\r\n")
        length = int(re.search(rb"content-length: *([0-9]+)", rest, re.I).group(1))
        body = rest.partition(b"\r\n\r\n")[2]
        while len(body) < length:
            body += sock.recv(65536)
        return int(status_line.split()[1])

    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(get)
        assert answer(sock) == 200
        time.sleep(2 * READ_TIMEOUT)  # idle, longer than the deadline (shorter than uvicorn's keep-alive)
        sock.sendall(get)
        assert answer(sock) == 200
        start = time.monotonic()
        try:
            for byte in get:  # the third request, a byte at a time
                sock.sendall(bytes([byte]))
                time.sleep(READ_TIMEOUT / 5)
        except OSError:
            pass
        head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
        assert time.monotonic() - start < READ_TIMEOUT + 1.0
    assert_error((int(head.split()[1]), json.loads(body)), 408, "timeout_error", f"read_timeout_s={READ_TIMEOUT}")


def test_a_pipelined_request_left_unfinished_gets_its_408(server):
    """A whole request and the start of the next in one write, then silence: the second has read_timeout_s
    too, from when the first was answered (its bytes were in already)."""
    get = f"GET /v1/models HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(get + post_head("50") + b'{"prompt": ')
        answers = read_until_closed(sock)
        assert time.monotonic() - start < READ_TIMEOUT + 1.0
    first, second = answers.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and second.startswith(b"408") and b"timeout_error" in second


def test_max_tokens_above_the_cap_is_refused(server):
    result = call(server, "/completions", {"prompt": [5, 6, 7], "max_tokens": TOKENS_CAP + 1, "temperature": 0})
    assert_error(result, 400, "invalid_request_error", f"max_tokens={TOKENS_CAP + 1}", f"max_tokens_cap={TOKENS_CAP}")
    status, body, _ = call(server, "/completions", {"prompt": [5, 6, 7], "max_tokens": TOKENS_CAP, "temperature": 0,
                                                    "logprobs": 0, "return_tokens_as_token_ids": True})
    assert status == 200 and 1 <= len(body["choices"][0]["logprobs"]["tokens"]) <= TOKENS_CAP


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[" * 50_000, 400, "not valid JSON"),  # nested past the recursion limit
    (b"[1, 2]", 400, "must be a JSON object; got list"),
    ({"prompt": {"a": 1}}, 400, "prompt must be a string, a list of token ids"),
    ({"prompt": []}, 400, "prompt must be"),
    ({"prompt": [[5, "x"]]}, 400, "prompt[0] must be a list of integer token ids"),
    ({"prompt": [5, 99999]}, 400, "token ids [99999] outside the vocabulary [0, 384)"),
    ({"prompt": [5] * 2000}, 400, "exceeds the model's context of 1024 tokens"),
    ({"prompt": [[5]] * 300}, 400, "max_prompts=256"),
    ({"prompt": [5], "max_tokens": "many"}, 400, "max_tokens must be a non-negative integer"),
    ({"prompt": [5], "max_tokens": True}, 400, "max_tokens must be"),
    ({"prompt": [5], "max_tokens": -1}, 400, "max_tokens must be"),
    ({"prompt": [5], "temperature": "hot"}, 400, "temperature must be a non-negative number"),
    ({"prompt": [5], "temperature": 0.7}, 400, "samples at temperature 1.0 or 0"),
    ({"prompt": [5], "seed": -1}, 400, "seed must be"),
    ({"prompt": [5], "echo": "yes"}, 400, "echo must be true or false"),
    ({"prompt": [5], "stop_token_ids": 3}, 400, "stop_token_ids must be a list"),
    ({"prompt": [5], "model": 3}, 400, "model must be a string"),
    ({"prompt": [5], "model": "nope"}, 404, "model 'nope' is not served"),
    (b'{"prompt": "a\\ud800b"}', 400, "prompt[0] holds a lone surrogate"),
    (b'{"prompt": ["ok", "\\udfff"]}', 400, "prompt[1] holds a lone surrogate"),
])
def test_bad_requests_get_a_json_error(server, body, status, fragment):
    result = call(server, "/completions", body if isinstance(body, dict) else None,
                  body=body if isinstance(body, bytes) else None)
    assert_error(result, status, "not_found_error" if status == 404 else "invalid_request_error", fragment)


def test_unknown_routes_and_methods_get_a_json_error(server):
    assert_error(call(server, "/nothing"), 404, "not_found_error", "GET /v1/nothing is not served")
    assert_error(call(server, "/completions", method="GET"), 405, "invalid_request_error", "use POST")
    assert_error(call(server, "/models", method="PUT"), 405, "invalid_request_error", "is not served; use", "GET")
    many_headers = "".join(f"X-{i}: {'v' * 100}\r\n" for i in range(200))  # 20 KB of head
    big_head = f"GET /v1/models HTTP/1.1\r\nHost: test\r\n{many_headers}\r\n".encode()
    assert_error(raw(server, big_head), 431, "invalid_request_error", "head is over 16384 bytes")
    # a malformed request line still gets a status line and JSON
    assert_error(raw(server, b"NONSENSE\r\n\r\n"), 400, "invalid_request_error", "malformed HTTP request")


def test_an_internal_error_is_a_500_and_the_server_keeps_serving(server, monkeypatch, caplog):
    def boom(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(PolicyModel, "generate", boom)
    caplog.set_level(logging.ERROR, logger="rllama.serving")
    result = call(server, "/completions", {"prompt": [5, 6], "max_tokens": 2})
    assert_error(result, 500, "server_error", "internal server error", "the server's log has the details")
    assert "ZeroDivision" not in json.dumps(result[1]) and "Traceback" not in json.dumps(result[1])
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert len(logged) == 1 and "POST /v1/completions failed" in logged[0].getMessage()
    monkeypatch.undo()
    assert call(server, "/completions", {"prompt": [5, 6], "max_tokens": 2})[0] == 200  # lock and adapters restored


# ---------------------------------------------------------------------- the client keeps its key
REPLY = {"choices": [{"index": 0, "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.5]}}]}


@contextlib.contextmanager
def recording_server(redirect_to: str | None = None, redirect_code: int = 302, reply: dict = REPLY):
    """A tiny HTTP server in a thread: records each request's ``Authorization`` header, answers ``reply``
    (or a ``redirect_code`` redirect to ``redirect_to``). Yields ``(url, seen)``."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(self.headers.get("Authorization"))
            data = b"" if redirect_to else json.dumps(reply).encode()
            self.send_response(redirect_code if redirect_to else 200)
            if redirect_to:
                self.send_header("Location", redirect_to)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST  # urllib's default handler turns a 301/302/303 after a POST into a GET

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_client_sends_no_environment_key_unless_asked(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    with recording_server() as (url, seen):
        for kwargs in ({}, {"api_key_env": "OPENAI_API_KEY"}, {"api_key": "sk-explicit"}):
            reply, = OpenAIBackend(url, model="m", **kwargs).generate([[5, 6]], 1, True, [], None)
            assert reply.token_ids == [7] and reply.token_logprobs == [-0.5]
    assert seen == [None, "Bearer sk-from-the-environment", "Bearer sk-explicit"]
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match=r"api_key_env='OPENAI_API_KEY' but \$OPENAI_API_KEY is unset or empty"):
        OpenAIBackend(url, model="m", api_key_env="OPENAI_API_KEY")
    with pytest.raises(ValueError, match="both set"):
        OpenAIBackend(url, model="m", api_key="k", api_key_env="OPENAI_API_KEY")
    for bad in ("ftp://host/v1", "localhost:8000/v1", "http://user:pw@host/v1"):
        with pytest.raises(ValueError, match="expected http"):
            OpenAIBackend(bad, model="m")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_the_client_refuses_redirects_and_keeps_its_key(code):
    with recording_server() as (elsewhere, seen_elsewhere):
        with recording_server(redirect_to=f"{elsewhere}/completions", redirect_code=code) as (url, seen):
            backend = OpenAIBackend(url, model="m", api_key="sk-explicit")
            expected = (f"{url}/completions answered HTTP {code}, a redirect to '{elsewhere}/completions'; "
                        "OpenAIBackend does not follow redirects")
            with pytest.raises(RLlamaError, match=re.escape(expected)):
                backend.generate([[5, 6]], 1, True, [], None)
    assert seen == ["Bearer sk-explicit"]  # the configured server got the key ...
    assert seen_elsewhere == []            # ... and nothing reached the other one


# ---------------------------------------------------------------------- the client checks what it is sent
def _reply(tokens, token_logprobs):
    return {"choices": [{"index": 0, "logprobs": {"tokens": tokens, "token_logprobs": token_logprobs}}]}


@pytest.mark.parametrize("reply, message", [
    (_reply(["token_id:1000000000"], [-0.5]), "token id 1000000000, outside the model's vocabulary [0, 384)"),
    (_reply(["token_id:-3"], [-0.5]), "token id -3, outside the model's vocabulary"),
    (_reply(["token_id:abc"], [-0.5]), "reply token 'token_id:abc' is not a token id"),
    (_reply([7, True], [-0.5, -0.5]), "reply token True is not a token id"),
    (_reply(["token_id:7"], [50.0]), "the log-prob 50.0 for a reply token"),
    (_reply(["token_id:7"], [math.nan]), "the log-prob nan for a reply token"),
    (_reply(["token_id:7"], ["-0.5"]), "the log-prob '-0.5' for a reply token"),
    (_reply(["token_id:7", "token_id:8"], [-0.5]), "1 log-probs for a reply of 2 tokens"),
    (_reply(["token_id:7"], None), "no log-probs for a reply of 1 tokens"),
    (_reply(["token_id:7"] * 3, [-0.5] * 3), "a reply of 3 tokens where max_tokens was 2"),
    (_reply("token_id:7", [-0.5]), "did not return the reply's tokens"),
    (_reply(["token_id:\u00b2"], [-0.5]), "is not a token id"),      # a superscript two: a digit to isdigit()
    (_reply(["token_id:--5"], [-0.5]), "is not a token id"),
    (_reply(["token_id:" + "9" * 5000], [-0.5]), "is not a token id"),
    (_reply(["token_id:7"], [-10 ** 400]), "the log-prob -1000"),       # an integer no float holds
    ({"choices": [None]}, "is not a completion choice"),
    ({"choices": ["x"]}, "is not a completion choice"),
    ({"choices": [{"index": 0, "logprobs": "x"}]}, "is not a completion choice"),
    ({"choices": [{"index": 0, "logprobs": [1]}]}, "is not a completion choice"),
    ([1, 2], "the server gave no choices for 1 prompts"),
])
def test_the_client_refuses_impossible_replies(policy, reply, message):
    """A broken or foreign server's reply is refused with what was wrong, not passed on to the tokenizer."""
    with recording_server(reply=reply) as (url, _seen):
        backend = OpenAIBackend(url, model="m")
        backend.bind(policy)
        with pytest.raises(RLlamaError, match=re.escape(message)):
            backend.generate([[5, 6]], 2, True, [], None)


@pytest.mark.parametrize("echoed, message", [
    ([None, -1.0, 50.0, -0.1], "the log-prob 50.0 for a candidate's token"),
    ([None, -1.0, math.inf, -0.1], "the log-prob inf for a candidate's token"),
    ([None, -1.0, None, -0.1], "the log-prob None for a candidate's token"),
    ([None, -1.0], "did not echo the prompt's log-probs"),
])
def test_the_client_refuses_impossible_scores(policy, echoed, message):
    with recording_server(reply=_reply(["token_id:5"] * len(echoed), echoed)) as (url, _seen):
        backend = OpenAIBackend(url, model="m")
        backend.bind(policy)
        with pytest.raises(RLlamaError, match=re.escape(message)):
            backend.candidate_outputs([[5, 6]], [[[7]]])
    with recording_server(reply=_reply(["token_id:5"] * 4, [None, -1.0, -0.7, -0.1])) as (url, _seen):
        backend = OpenAIBackend(url, model="m")
        backend.bind(policy)
        out = backend.candidate_outputs([[5, 6]], [[[7]]])  # a sound reply still scores
        assert out.logprobs[0].tolist() == [0.0]
