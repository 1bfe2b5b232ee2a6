"""The teaching page's JSON API and the page itself, on FastAPI (see ``docs/teach.md`` for every route).

Every route answers JSON (errors as ``{"error": {"message", "type", "code"}}``); the chat's reply and a
learn's progress stream as server-sent events (``text/event-stream``: ``event: <type>`` and a JSON
``data:`` line each). The page is static HTML, CSS and JavaScript served from ``rllama/teach/static``:
no build step, and nothing it does that a script cannot do with the same routes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from rllama.teach.teacher import Teacher, TeachError
from rllama.web import Guard, error_body, install_json_errors

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


def sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_app(teacher: Teacher, *, api_key: str | None = None, max_body_bytes: int = 1 << 20):
    """The ASGI app serving ``teacher``: the page at ``/``, the API under ``/api`` (which needs ``api_key``
    when one is set; the page asks for it)."""
    app = FastAPI(title="rllama teach", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")

    install_json_errors(app, logger)

    @app.exception_handler(TeachError)
    async def teach_error(request, exc: TeachError):
        return Response(error_body(exc.status, str(exc)), status_code=exc.status, media_type="application/json")

    async def body(request: Request) -> dict[str, Any]:
        data = await request.body()
        if not data:
            return {}
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise TeachError(f"the body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(value, dict):
            raise TeachError(f"the body must be a JSON object; got {type(value).__name__}")
        return value

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        try:
            path = (STATIC / name).resolve()
            found = path.parent == STATIC and path.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long
            found = False
        if not found:
            raise TeachError(f"no static file {name[:80]!r}", 404)
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ model and skills
    # (routes that read a body are async; what they ask of the model or the disk runs in a thread, off the
    # event loop, which keeps serving the other requests and streams)
    @app.get("/api/info")
    def info():
        return {**teacher.info(), "auth": api_key is not None}

    @app.get("/api/skills")
    def skills():
        return {"skills": teacher.list_skills()}

    @app.post("/api/skills", status_code=201)
    async def create(request: Request):
        return await run_in_threadpool(teacher.create_skill, (await body(request)).get("name"))

    @app.post("/api/skills/load", status_code=201)
    async def load(request: Request):
        payload = await body(request)
        return await run_in_threadpool(teacher.load_skill, payload.get("path"), payload.get("name"))

    @app.get("/api/skills/{name}")
    def skill(name: str):
        return next(s for s in teacher.list_skills() if s["name"] == teacher.skill(name).name)

    @app.patch("/api/skills/{name}")
    async def rename(name: str, request: Request):
        return await run_in_threadpool(teacher.rename_skill, name, (await body(request)).get("name"))

    @app.delete("/api/skills/{name}")
    def delete(name: str):
        teacher.delete_skill(name)
        return {"deleted": name}

    @app.post("/api/skills/{name}/save")
    def save(name: str):
        return teacher.save_skill(name)

    # ------------------------------------------------------------------ examples
    @app.get("/api/skills/{name}/examples")
    def examples(name: str):
        return {"examples": teacher.examples(name)}

    @app.put("/api/skills/{name}/examples")
    async def replace_examples(name: str, request: Request):
        return {"examples": await run_in_threadpool(teacher.set_examples, name, (await body(request)).get("examples"))}

    @app.post("/api/skills/{name}/examples", status_code=201)
    async def add_example(name: str, request: Request):
        payload = await body(request)
        return {"examples": await run_in_threadpool(teacher.add_example, name, payload.get("prompt"),
                                                    payload.get("response"))}

    @app.get("/api/skills/{name}/examples.jsonl")
    def export(name: str):
        return PlainTextResponse(teacher.export_jsonl(name), media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.jsonl"'})

    # ------------------------------------------------------------------ chat
    @app.post("/api/chat")
    async def chat(request: Request):
        payload = await body(request)
        prompt, skill_name = payload.get("prompt"), payload.get("skill")
        limit, stream = payload.get("max_new_tokens"), payload.get("stream", False)
        if not isinstance(stream, bool):
            raise TeachError(f"stream must be true or false; got {stream!r}")
        await run_in_threadpool(teacher.check_request, prompt, skill_name, limit)  # a 4xx now, not in the stream
        if not stream:
            return {"reply": await run_in_threadpool(teacher.reply, prompt, skill_name, limit), "skill": skill_name}
        return StreamingResponse(_stream_reply(teacher, prompt, skill_name, limit), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.post("/api/compare")
    async def compare(request: Request):
        """The base model's reply and the skill's, to the same prompt."""
        payload = await body(request)
        name, prompt = payload.get("skill"), payload.get("prompt")
        await run_in_threadpool(teacher.check_request, prompt, name)
        base = await run_in_threadpool(teacher.reply, prompt, None)
        reply = await run_in_threadpool(teacher.reply, prompt, name)
        return {"prompt": prompt, "base": base, "skill": name, "reply": reply}

    # ------------------------------------------------------------------ learning
    @app.post("/api/skills/{name}/learn", status_code=202)
    async def learn(name: str, request: Request):
        job = await run_in_threadpool(teacher.learn, name, (await body(request)).get("probe"))
        return job.summary()

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        found = teacher.job(job_id)
        return {**found.summary(), "log": list(found.events)}

    @app.get("/api/jobs/{job_id}/events")
    def events(job_id: str, start: int = 0):
        found = teacher.job(job_id)
        return StreamingResponse(_stream_events(found, max(0, start)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    return Guard(app, api_key, max_body_bytes, protected=lambda path: path.startswith("/api/"), log=logger)


def _stream_reply(teacher: Teacher, prompt: str, skill: str | None, limit) -> Iterator[bytes]:
    """The reply's pieces as ``token`` events while it is written, then ``done`` (or ``error``)."""
    pieces: queue.Queue = queue.Queue()

    def write() -> None:
        try:
            reply = teacher.reply(prompt, skill, limit, on_text=lambda text: pieces.put(("token", {"text": text})))
            pieces.put(("done", {"reply": reply, "skill": skill}))
        except TeachError as exc:
            pieces.put(("error", {"message": str(exc)}))
        except Exception as exc:  # the page shows it; the log has the traceback
            logger.exception("chat failed")
            pieces.put(("error", {"message": f"{type(exc).__name__}: {exc}"}))

    threading.Thread(target=write, daemon=True, name="rllama-teach-chat").start()
    while True:
        kind, data = pieces.get()
        yield sse(kind, data)
        if kind != "token":
            return


def _stream_events(job, start: int) -> Iterator[bytes]:
    """The job's events from ``start`` on, as they come, until it has finished; a comment every 15 s of silence."""
    index = start
    while True:
        new = job.wait_events(index, timeout=15.0)
        for event in new:
            yield sse(event["type"], {**event, "index": index})
            index += 1
        if not new:
            if job.state not in ("queued", "running"):
                return
            yield b": still learning\n\n"
