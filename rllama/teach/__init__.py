"""Teach a model in the browser: chat, correct its replies, press learn, see the corrected answer.

    rllama teach                      # the embedded model; skills saved to ./skills
    rllama teach --model path/or/hub-id --folder my-skills --port 8000

or from Python::

    from rllama.teach import Teacher, TeachServer

    teacher = Teacher(folder="skills")            # the embedded model
    with TeachServer(teacher) as server:
        print(server.url)                         # http://127.0.0.1:<port>/
        ...

:class:`Teacher` is the model side (skills as named adapters of a :class:`~rllama.skills.SkillModel`,
their examples, a chat that answers while a skill learns, saves); :func:`create_app` puts it behind the
JSON API and the page (FastAPI); :class:`TeachServer` serves that with uvicorn. Needs the ``ui`` extra
(``pip install 'rllama[ui]'``).
"""

from __future__ import annotations

from rllama.teach.teacher import LearnJob, Skill, Teacher, TeachError, make_chat
from rllama.web import BackgroundServer, check_binding, require_web_stack


class TeachServer(BackgroundServer):
    """The teaching page and its API for ``teacher``, served on ``host:port`` (port 0: any free one) by
    uvicorn in a background thread. Without ``api_key`` only on a loopback address; with one, the API
    needs ``Authorization: Bearer <api_key>`` (the page takes the key from its URL: :attr:`url` carries it
    after ``#``, which browsers never send to the server). ``read_timeout_s`` bounds the time a client may
    take to send a whole request (a 408 after it)."""

    def __init__(self, teacher: Teacher, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
                 max_body_bytes: int = 1 << 20, read_timeout_s: float = 30.0) -> None:
        require_web_stack("the teaching page")
        from rllama.teach.app import create_app

        check_binding(host, api_key, "the model and change its skills")
        self.teacher = teacher
        self.api_key = api_key
        super().__init__(create_app(teacher, api_key=api_key, max_body_bytes=max_body_bytes), host, port,
                         read_timeout_s=read_timeout_s)

    @property
    def url(self) -> str:
        return self.base_url + "/" + (f"#key={self.api_key}" if self.api_key else "")


def create_app(teacher: Teacher, **kwargs):
    """The ASGI app of the page and its API (see :func:`rllama.teach.app.create_app`)."""
    require_web_stack("the teaching page")
    from rllama.teach.app import create_app as create

    return create(teacher, **kwargs)


__all__ = ["LearnJob", "Skill", "TeachError", "TeachServer", "Teacher", "create_app", "make_chat"]
