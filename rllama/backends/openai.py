"""A client of OpenAI-compatible completions servers (vLLM, SGLang, :mod:`rllama.serving`).

The agent scores candidate actions and samples replies through a :class:`Backend`. The default,
:class:`InProcessBackend`, runs the agent's own :class:`~rllama.policy.PolicyModel` (log-probs, the
value head and Q heads in one pass). :class:`OpenAIBackend` sends the same requests to a server that
speaks the OpenAI completions API — vLLM and SGLang do — so that rollouts run on GPUs serving the
same base model, while the learner trains the adapter in this process:

.. code-block:: python

    from rllama.backends import OpenAIBackend

    backend = OpenAIBackend("http://gpu-host:8000/v1", model="HuggingFaceTB/SmolLM2-135M-Instruct",
                            adapter_sync="vllm", sync_dir="/shared/adapters")
    agent = BlackjackAgent(backend=backend)

A server gives log-probabilities only, not the value head; steps acted through it are marked
``learner_recompute`` and the learner recomputes their values and behaviour log-probs under its own
weights before the update (the server's numerics differ from the learner's anyway). Value-based
algorithms (DQN, SAC) act on Q heads, so they need the in-process backend.

After each update the agent calls :meth:`Backend.after_update`; with ``adapter_sync="vllm"`` the
HTTP backend saves the adapter to ``sync_dir`` (a folder the server can read) and asks the server to
load it (vLLM's ``/v1/load_lora_adapter``, served with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``), then acts with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rllama.backends.base import Backend
from rllama.errors import RLlamaError
from rllama.policy.model import CandidateOutputs, GeneratedReply, candidate_score


class OpenAIBackend(Backend):
    """A client of an OpenAI-compatible completions server (vLLM, SGLang, or :mod:`rllama.serving`).

    Scoring sends each prompt followed by a candidate, with ``echo`` and ``logprobs``, and sums the
    log-probs of the candidate's tokens; generation sends the prompt's token ids and reads the reply's
    token ids back (``return_tokens_as_token_ids``, a vLLM extension). Requests are batched: one
    request carries up to ``batch_size`` prompts.

    Args:
        base_url: the server's API root, e.g. ``http://localhost:8000/v1``.
        model: the model name the server serves (the base model, same tokenizer as the learner's).
        api_key: sent as a bearer token (``Authorization: Bearer <api_key>``), only to ``base_url``'s
            scheme, host and port. ``None`` (default): no key is sent.
        timeout: seconds per request.
        batch_size: prompts (or prompt-candidate pairs) per request.
        adapter_sync: ``None`` (the server's weights are not updated: acting stays with the base
            model or whatever the server serves) or ``"vllm"`` (after each update, save the adapter to
            ``sync_dir`` and load it into the server under a new name; act with it).
        sync_dir: a folder both this process and the server can read (needed with ``adapter_sync``).
        api_key_env: the name of an environment variable holding the key, e.g. ``"OPENAI_API_KEY"``
            (read here, an error if it is unset or empty). The environment is read only when asked:
            a key meant for one provider is never sent to whatever ``base_url`` names.

    Redirects are not followed: a 3xx answer is an error naming the URL, so the key never leaves
    ``base_url``'s server.
    """

    provides_values = False

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 batch_size: int = 64, adapter_sync: str | None = None,
                 sync_dir: str | os.PathLike | None = None, api_key_env: str | None = None) -> None:
        if not _is_plain_http_url(base_url):
            raise ValueError(f"base_url={base_url!r}; expected http(s)://host[:port]/path without credentials "
                             "(pass the key as api_key)")
        if api_key is not None and api_key_env is not None:
            raise ValueError(f"api_key and api_key_env={api_key_env!r} are both set; pass one")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            got = "an empty string" if api_key == "" else f"a {type(api_key).__name__}"  # the value may be secret
            raise ValueError(f"api_key must be a non-empty string or None; got {got}")
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env={api_key_env!r} but ${api_key_env} is unset or empty")
        if adapter_sync not in (None, "vllm"):
            raise ValueError(f"adapter_sync={adapter_sync!r}; expected None or 'vllm'")
        if adapter_sync and sync_dir is None:
            raise ValueError("adapter_sync='vllm' needs sync_dir: a folder the server can read the adapter from")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected at least 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.served_model = model
        self.api_key = api_key
        self.origin = _origin(self.base_url)
        self.timeout = float(timeout)
        self.batch_size = int(batch_size)
        self.adapter_sync = adapter_sync
        self.sync_dir = Path(sync_dir) if sync_dir is not None else None
        self.version = 0

    def bind(self, policy) -> None:
        if policy.temperature != 1.0:
            raise RLlamaError(f"OpenAIBackend needs temperature=1.0 (got {policy.temperature}): servers return the "
                              "log-probs of the untempered model")
        super().bind(policy)

    # ------------------------------------------------------------------ HTTP
    def _post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/{route.lstrip('/')}"
        headers = {"Content-Type": "application/json"}
        if self.api_key and _origin(url) == self.origin:  # the key goes to base_url's server, nowhere else
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with urllib.request.build_opener(_RefuseRedirects).open(request, timeout=self.timeout) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise RLlamaError(f"{url} answered HTTP {exc.code}, a redirect to {exc.headers.get('Location')!r}; "
                                  "OpenAIBackend does not follow redirects (they could carry the API key to "
                                  "another server): set base_url to the address that serves the API") from None
            detail = exc.read().decode(errors="replace")[:500]
            raise RLlamaError(f"{url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RLlamaError(f"cannot reach the generation server at {url}: {reason}") from None
        if not body:  # e.g. vLLM's load_lora_adapter answers with plain text or nothing
            return {}
        try:
            return json.loads(body)
        except ValueError:
            return {"text": body}

    def _completions(self, prompts: list[list[int]], **params) -> list[dict[str, Any]]:
        """One choice per prompt, in order (requests of ``batch_size`` prompts)."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(prompts), self.batch_size):
            part = prompts[start:start + self.batch_size]
            reply = self._post("completions", {"model": self.served_model, "prompt": part, **params})
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not isinstance(choices, list) or len(choices) != len(part):
                raise RLlamaError(f"the server gave {len(choices) if isinstance(choices, list) else 'no'} choices "
                                  f"for {len(part)} prompts: {str(reply)[:300]}")
            for choice in choices:
                index = choice.get("index", 0) if isinstance(choice, dict) else None
                if not isinstance(index, int) or not isinstance(choice.get("logprobs") or {}, dict):
                    raise RLlamaError(f"the server's choice {str(choice)[:200]} is not a completion choice (an "
                                      "object with an integer 'index' and a 'logprobs' object)")
            out.extend(sorted(choices, key=lambda c: c.get("index", 0)))
        return out

    # ------------------------------------------------------------------ acting
    def candidate_outputs(self, prompts, candidates, q_heads=()):
        if q_heads:
            raise RLlamaError(f"this algorithm acts on Q heads {list(q_heads)}, which a completions server does not "
                              "have; value-based algorithms (DQN, SAC) need the in-process backend")
        pairs = [list(p) + list(c) for p, cands in zip(prompts, candidates) for c in cands]
        choices = self._completions(pairs, max_tokens=1, echo=True, logprobs=0, temperature=1.0)
        scores = []
        flat = [(len(p), len(c)) for p, cands in zip(prompts, candidates) for c in cands]
        for (n_prompt, n_cand), choice in zip(flat, choices):
            token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(token_logprobs, list) or len(token_logprobs) < n_prompt + n_cand:
                raise RLlamaError("the server did not echo the prompt's log-probs (echo=True, logprobs=0); "
                                  f"got {str(choice)[:300]}")
            scored = _checked_logprobs(token_logprobs[n_prompt:n_prompt + n_cand], "a candidate's")
            scores.append(candidate_score(scored, self.policy.score_normalization))
        logprobs, start = [], 0
        for cands in candidates:
            logprobs.append(F.log_softmax(torch.tensor(scores[start:start + len(cands)]), dim=-1))
            start += len(cands)
        return CandidateOutputs(logprobs, torch.full((len(prompts),), math.nan), {})

    def generate(self, prompts, max_new_tokens, greedy, stop_token_ids, generator, constraints=None):
        if constraints is not None and any(c is not None for c in constraints):
            raise RLlamaError("OpenAIBackend does not constrain replies to a declared reply_shape; "
                              "use the in-process or llama.cpp backend, or declare no reply shape")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else None
        params = {"max_tokens": int(max_new_tokens), "temperature": 0.0 if greedy else 1.0, "logprobs": 0,
                  "return_tokens_as_token_ids": True, "stop_token_ids": [int(t) for t in stop_token_ids],
                  "skip_special_tokens": False, "include_stop_str_in_output": True}
        if seed is not None:
            params["seed"] = seed
        # Checked against the learner's vocabulary when bound (a server of another model, or a broken one,
        # could name a token the tokenizer cannot decode).
        vocab_size = self.policy.vocab_size if getattr(self, "policy", None) is not None else None
        replies = []
        for choice in self._completions([list(p) for p in prompts], **params):
            logprobs = choice.get("logprobs") or {}
            tokens, token_logprobs = logprobs.get("tokens"), logprobs.get("token_logprobs")
            if not isinstance(tokens, list):
                raise RLlamaError("the server did not return the reply's tokens (logprobs with "
                                  f"return_tokens_as_token_ids); got {str(choice)[:300]}")
            if not isinstance(token_logprobs, list) or len(token_logprobs) != len(tokens):
                count = len(token_logprobs) if isinstance(token_logprobs, list) else "no"
                raise RLlamaError(f"the server returned {count} log-probs for a reply of {len(tokens)} tokens; "
                                  "each reply token needs its log-prob (logprobs=0)")
            if len(tokens) > max_new_tokens:
                raise RLlamaError(f"the server returned a reply of {len(tokens)} tokens where max_tokens was "
                                  f"{max_new_tokens}")
            ids = [_token_id(t, vocab_size) for t in tokens]
            replies.append(GeneratedReply(ids, _checked_logprobs(token_logprobs, "a reply"), math.nan, exact=False))
        return replies

    # ------------------------------------------------------------------ weights
    def after_update(self, policy) -> None:
        if self.adapter_sync is None:
            return
        self.version += 1
        name = f"{policy.active_adapter}-v{self.version}"
        path = policy.save_adapter(policy.active_adapter, self.sync_dir / name)
        self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
        previous, self.served_model = self.served_model, name
        if previous != self.model:
            self._post("unload_lora_adapter", {"lora_name": previous})


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: urllib would carry the ``Authorization`` header to wherever one points.

    Returning ``None`` hands the 3xx on to urllib's default handler, which raises it as an ``HTTPError``.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _is_plain_http_url(url: str) -> bool:
    """Whether ``url`` is ``http(s)://host[:port]/...`` with a valid port and no user name or password."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (parsing it raises on a bad port)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.username is None


def _origin(url: str) -> tuple[str, str, int]:
    """A URL's scheme, host and port (the default port made explicit): where a request goes."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}[scheme]


def _token_id(token, vocab_size: int | None) -> int:
    """A reply token as the server names it (``"token_id:7"`` or ``7``), checked to lie in the vocabulary."""
    value = None
    if isinstance(token, int) and not isinstance(token, bool):
        value = token
    elif isinstance(token, str) and (match := re.fullmatch(r"token_id:(-?[0-9]{1,19})", token)):
        value = int(match.group(1))
    if value is None:
        raise RLlamaError(f"reply token {token!r} is not a token id; the server must support "
                          "return_tokens_as_token_ids")
    if value < 0 or (vocab_size is not None and value >= vocab_size):
        raise RLlamaError(f"the server returned token id {value}, outside the model's vocabulary "
                          f"[0, {vocab_size if vocab_size is not None else 'vocab size'}): is it serving "
                          "another model than the one this agent learns on?")
    return value


# Log-probs a server may round up to a little above 0 (bf16); anything larger is not a probability.
_LOGPROB_SLACK = 1e-3


def _checked_logprobs(values, whose: str) -> list[float]:
    """``values`` as floats, refused unless each is a finite number at most 0 (a log-probability)."""
    out = []
    for value in values:
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an integer of hundreds of digits
            number = math.nan
        if not math.isfinite(number) or number > _LOGPROB_SLACK:
            raise RLlamaError(f"the server returned the log-prob {value!r} for {whose} token; a log-probability "
                              "is a finite number at most 0: the server's reply is broken")
        out.append(min(number, 0.0))
    return out


