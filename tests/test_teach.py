"""The teaching page's API (rllama.teach) on a tiny model: chat streamed, corrections learned, skills saved
whole, learns serialised, bad input refused with a message the page can show."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the ui extra is not installed (pip install 'rllama[ui]')")

from fastapi.testclient import TestClient  # noqa: E402

from rllama.skills import SkillModel  # noqa: E402
from rllama.teach import Teacher, TeachServer, create_app  # noqa: E402
from rllama.trajectories import read_trajectories  # noqa: E402
from tests.conftest import make_tiny_lm, make_tokenizer  # noqa: E402

LEARN = {"epochs": 30, "learning_rate": 3e-3, "max_new_tokens": 12}  # a tiny model learns "zog" in 30 steps


def new_teacher(folder, engine="torch", **kwargs) -> Teacher:
    skills = SkillModel(make_tiny_lm(seed=0), make_tokenizer(), precision="fp32")
    return Teacher(skills, folder, engine=engine, **{**LEARN, **kwargs})


@pytest.fixture
def teacher(tmp_path):
    t = new_teacher(tmp_path / "skills")
    yield t
    t.close()


def client(teacher, **kwargs) -> TestClient:
    return TestClient(create_app(teacher, **kwargs), base_url="http://127.0.0.1:8000")


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        if lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def teach_zog(c) -> list[tuple[str, dict]]:
    assert c.post("/api/skills", json={"name": "zoggian"}).status_code == 201
    for prompt in ("hi", "hello"):
        assert c.post("/api/skills/zoggian/examples", json={"prompt": prompt, "response": "zog"}).status_code == 201
    job = c.post("/api/skills/zoggian/learn", json={"probe": "hi"})
    assert job.status_code == 202
    return events(c.get(f"/api/jobs/{job.json()['id']}/events").text)


def test_a_correction_is_learned_and_the_chat_answers_it(teacher):
    c = client(teacher)
    before = c.post("/api/chat", json={"prompt": "hi"}).json()["reply"]
    assert before != "zog"
    log = teach_zog(c)
    kinds = [k for k, _ in log]
    assert kinds[:3] == ["queued", "started", "before"] and kinds[-1] == "done"
    steps = [d for k, d in log if k == "step"]
    assert len(steps) == LEARN["epochs"] and steps[-1]["loss"] < steps[0]["loss"] - 1
    done = log[-1][1]
    assert (done["before"], done["after"]) == (before, "zog")
    # the chat, streamed: the pieces add up to the reply, which is the corrected one
    streamed = events(c.post("/api/chat", json={"prompt": "hi", "skill": "zoggian", "stream": True}).text)
    pieces = [d["text"] for k, d in streamed if k == "token"]
    assert len(pieces) >= 2 and "".join(pieces) == streamed[-1][1]["reply"] == "zog"
    # the base model, and a skill side by side with it, are unchanged
    assert c.post("/api/compare", json={"prompt": "hi", "skill": "zoggian"}).json() == \
        {"prompt": "hi", "base": before, "skill": "zoggian", "reply": "zog"}
    assert c.get("/api/skills").json()["skills"][0] | {"saved_at": None} == {
        "name": "zoggian", "examples": 2, "steps": LEARN["epochs"], "saved_at": None,
        "folder": str(teacher.folder / "zoggian"), "learning": []}


def test_skills_persist_whole_and_come_back(tmp_path):
    folder = tmp_path / "skills"
    first = new_teacher(folder)
    teach_zog(client(first))
    first.close()
    assert sorted(p.name for p in (folder / "zoggian").iterdir()) == ["adapter", "manifest.json", "skill.json"]
    again = new_teacher(folder)  # a fresh model: the adapter comes from the folder
    try:
        c = client(again)
        assert c.get("/api/skills/zoggian/examples").json()["examples"] == [
            {"prompt": "hi", "response": "zog"}, {"prompt": "hello", "response": "zog"}]
        assert c.post("/api/chat", json={"prompt": "hi", "skill": "zoggian"}).json()["reply"] == "zog"
        assert c.get("/api/skills/zoggian").json()["steps"] == LEARN["epochs"]
    finally:
        again.close()
    # a damaged save is not loaded: the page starts with the others and names it, and why
    record = folder / "zoggian" / "skill.json"
    record.write_text(record.read_text().replace('"zog"', '"zug"'))
    damaged = new_teacher(folder)
    try:
        assert damaged.list_skills() == []
        assert "skill.json does not match its checksum" in damaged.info()["damaged"]["zoggian"]
        assert client(damaged).post("/api/skills", json={"name": "zoggian"}).status_code == 409  # not overwritten
    finally:
        damaged.close()


def test_a_failed_save_changes_nothing(teacher, monkeypatch):
    c = client(teacher)
    c.post("/api/skills", json={"name": "s"})
    c.post("/api/skills/s/examples", json={"prompt": "a", "response": "b"})
    saved = (teacher.folder / "s" / "skill.json").read_bytes()
    monkeypatch.setattr("rllama.teach.teacher.json.dumps", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        teacher.add_example("s", "c", "d")
    assert (teacher.folder / "s" / "skill.json").read_bytes() == saved
    assert teacher.examples("s") == [{"prompt": "a", "response": "b"}]
    assert [p.name for p in teacher.folder.iterdir()] == ["s"]  # no temporary folder left


def test_learns_are_serialised_in_the_order_asked(teacher):
    c = client(teacher)
    c.post("/api/skills", json={"name": "zoggian"})
    c.post("/api/skills/zoggian/examples", json={"prompt": "hi", "response": "zog"})
    with teacher.skills.lock:  # hold the model: both requests are in before either runs a step
        first = c.post("/api/skills/zoggian/learn", json={}).json()["id"]
        second = c.post("/api/skills/zoggian/learn", json={}).json()["id"]
        assert c.get("/api/skills/zoggian").json()["learning"] == [first, second]
        assert c.delete("/api/skills/zoggian").status_code == 409  # not while it learns
    teacher.wait(second, timeout=120)
    a, b = teacher.job(first), teacher.job(second)
    assert a.state == b.state == "done"
    started = {job.id: next(i for i, e in enumerate(job.events) if e["type"] == "started") for job in (a, b)}
    assert started[second] > 0 and a.events[-1]["type"] == "done"
    # the second ran after the first had finished: its steps continue the adapter's count
    assert teacher.skill("zoggian").steps == 2 * LEARN["epochs"]
    assert [e["type"] for e in b.events].count("step") == LEARN["epochs"]
    assert c.get("/api/skills/zoggian").json()["learning"] == []


def test_bad_requests_get_a_message_the_page_shows(teacher):
    c = client(teacher)

    def refused(response, status, fragment):
        body = response.json()
        assert response.status_code == status and fragment in body["error"]["message"], body

    c.post("/api/skills", json={"name": "s"})
    refused(c.post("/api/skills/s/learn", json={}), 400, "has no examples yet")
    refused(c.post("/api/skills", json={"name": "has space"}), 400, "skill name 'has space'")
    refused(c.post("/api/skills", json={"name": "default"}), 400, "skill name 'default'")
    refused(c.post("/api/skills", json={"name": "s"}), 409, "exists already")
    refused(c.post("/api/skills/s/examples", json={"prompt": "a", "response": "  "}), 400, "'response' must be")
    refused(c.put("/api/skills/s/examples", json={"examples": [{"prompt": "a"}]}), 400, "lacks ['response']")
    refused(c.put("/api/skills/s/examples", json={"examples": "x"}), 400, "must be a list")
    refused(c.post("/api/skills/nope/examples", json={"prompt": "a", "response": "b"}), 404, "no skill named 'nope'")
    refused(c.post("/api/chat", json={"prompt": ""}), 400, "prompt must be a non-empty string")
    refused(c.post("/api/chat", json={"prompt": "a", "max_new_tokens": 0}), 400, "max_new_tokens=0")
    refused(c.post("/api/chat", json={"prompt": "a" * 2000}), 400, "context of 1024 tokens")
    refused(c.post("/api/chat", json={"prompt": "a", "skill": "nope", "stream": True}), 404, "no skill named")
    refused(c.post("/api/skills", content=b"{not json", headers={"Content-Type": "application/json"}), 400,
            "not valid JSON")
    refused(c.post("/api/skills", content=b"[1]", headers={"Content-Type": "application/json"}), 400, "JSON object")
    refused(c.get("/api/jobs/job-99"), 404, "no learn job")
    refused(c.get("/api/nothing"), 404, "GET /api/nothing is not served")
    refused(c.post("/api/skills/load", json={"path": "/etc"}), 403, "outside the folders skills may be loaded from")
    refused(c.post("/api/skills/load", json={"path": "~nosuchuser-rllama/x"}), 404, "cannot read")
    for skill in (["a"], {"k": 1}, 3):
        refused(c.post("/api/chat", json={"prompt": "a", "skill": skill}), 400, "skill must be a skill's name")
        refused(c.post("/api/compare", json={"prompt": "a", "skill": skill}), 400, "skill must be a skill's name")
    refused(c.post("/api/chat", json={"prompt": "a", "max_new_tokens": "x", "stream": True}), 400, "max_new_tokens")
    as_json = {"Content-Type": "application/json"}  # lone surrogates sent as JSON escapes, as a script may
    refused(c.post("/api/chat", content=rb'{"prompt": "a\ud800", "stream": true}', headers=as_json), 400,
            "lone surrogate")
    refused(c.post("/api/chat", json={"prompt": "a", "stream": "yes"}), 400, "stream must be true or false")
    c.post("/api/skills/s/examples", json={"prompt": "a", "response": "b"})
    refused(c.post("/api/skills/s/learn", content=rb'{"probe": "\udfff"}', headers=as_json), 400, "lone surrogate")
    for name in ("%00", "a" * 5000, "..%2fteacher.py"):
        refused(c.get("/static/" + name), 404, "")
    assert teacher.examples("s") == [{"prompt": "a", "response": "b"}] and teacher.jobs == {}


def test_nobody_in_without_the_key_or_from_elsewhere(teacher):
    # without a key: a page on another site can neither name this host nor send a simple (non-JSON) request
    c = client(teacher)
    c.post("/api/skills", json={"name": "s"})
    assert c.get("/api/skills", headers={"Host": "attacker.example:8000"}).status_code == 403
    assert c.post("/api/skills", content=b"name=x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert c.post("/api/skills/s/save").status_code == 415  # no body, no JSON type: what a form or beacon sends
    elsewhere = {"Origin": "http://attacker.example"}
    assert c.post("/api/skills/s/save", json={}, headers=elsewhere).status_code == 403
    assert c.delete("/api/skills/s", headers=elsewhere).status_code == 403
    assert c.post("/api/skills/s/save", json={}, headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
    big = b"x" * (2 << 20)
    assert c.post("/api/skills", content=big, headers={"Content-Type": "application/json"}).status_code == 413
    assert c.get("/api/skills", headers={"Host": "localhost:8000"}).status_code == 200
    # with one: the API needs it, the page itself does not (it holds no secret)
    keyed = client(teacher, api_key="k-123")
    assert keyed.get("/api/skills").status_code == 401
    assert keyed.get("/api/skills", headers={"Authorization": "Bearer k-123"}).status_code == 200
    assert keyed.get("/").status_code == 200 and "teach.js" in keyed.get("/").text
    with pytest.raises(ValueError, match="not a loopback address and api_key is None"):
        TeachServer(teacher, host="0.0.0.0")


def test_rename_delete_load_and_export(teacher, tmp_path):
    c = client(teacher)
    teach_zog(c)
    assert c.patch("/api/skills/zoggian", json={"name": "zog2"}).json()["name"] == "zog2"
    assert not (teacher.folder / "zoggian").exists() and (teacher.folder / "zog2" / "adapter").is_dir()
    assert c.post("/api/chat", json={"prompt": "hi", "skill": "zog2"}).json()["reply"] == "zog"
    # the examples as trajectory JSONL, read back by the library
    exported = tmp_path / "zog.jsonl"
    exported.write_text(c.get("/api/skills/zog2/examples.jsonl").text)
    episodes = read_trajectories(exported)
    assert [(e["steps"][0]["observation"], e["steps"][0]["response"]) for e in episodes] == [("hi", "zog"),
                                                                                            ("hello", "zog")]
    # a skill folder loads under another name; an adapter folder (SkillModel.save_adapter) too
    assert c.post("/api/skills/load", json={"path": str(teacher.folder / "zog2"), "name": "copy"}).status_code == 201
    teacher.skills.save_adapter("zog2", teacher.folder / "exported-adapter")
    assert c.post("/api/skills/load", json={"path": str(teacher.folder / "exported-adapter"),
                                           "name": "plain"}).status_code == 201
    for name in ("copy", "plain"):
        assert c.post("/api/chat", json={"prompt": "hi", "skill": name}).json()["reply"] == "zog"
    assert c.delete("/api/skills/zog2").json() == {"deleted": "zog2"}
    assert not (teacher.folder / "zog2").exists() and "zog2" not in teacher.skills.list_adapters()
    assert sorted(s["name"] for s in c.get("/api/skills").json()["skills"]) == ["copy", "plain"]


def test_a_reply_on_llama_cpp_does_not_wait_for_the_learner(tmp_path):
    """On llama.cpp the chat is a model of its own: it answers while the learner holds its lock, and
    answers with a skill's adapter once its learn has finished."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")
    from tests.gguf_models import write_llama_gguf

    gguf = write_llama_gguf(make_tiny_lm("llama", seed=0), tmp_path / "tiny.gguf")
    teacher = new_teacher(tmp_path / "skills", engine="llama.cpp", gguf=gguf)
    torch_teacher = new_teacher(tmp_path / "skills-torch")
    try:
        c = client(teacher)
        assert teacher.chat.name == "llama.cpp"
        base = c.post("/api/chat", json={"prompt": "hi"}).json()["reply"]
        assert base == client(torch_teacher).post("/api/chat", json={"prompt": "hi"}).json()["reply"]
        log = teach_zog(c)
        assert log[-1][1]["after"] == "zog"
        got = {}
        with teacher.skills.lock:  # as a learn step would
            worker = threading.Thread(target=lambda: got.update(
                reply=c.post("/api/chat", json={"prompt": "hi", "skill": "zoggian"}).json()["reply"]))
            worker.start()
            worker.join(timeout=30)
            assert got == {"reply": "zog"}
    finally:
        teacher.close()
        torch_teacher.close()


def test_teach_serves_on_uvicorn_and_stops(teacher):
    with TeachServer(teacher) as server:
        import urllib.request

        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url + "api/info", timeout=10) as response:
            assert json.loads(response.read())["engine"] == "torch"
        start = time.monotonic()
    assert time.monotonic() - start < 10


def test_a_trained_agents_adapter_becomes_a_skill_that_answers_as_the_agent(make_agent, tmp_path):
    """What ``rllama teach --run`` does: the run's adapter, copied as a skill, replies as the agent's policy."""
    agent = make_agent(algorithm_config={"policy_head": 0, "batch_episodes": 4, "minibatch_size": 4,
                                         "learning_rate": 5e-2})
    from tests.conftest import ChoiceEnv

    agent.train(ChoiceEnv(steps=2), 8, seed=0, progress=False)
    skills = SkillModel(policy=agent.policy)
    teacher = Teacher(skills, tmp_path / "skills", engine="torch", **LEARN)
    try:
        teacher.adopt_adapter(agent.policy.active_adapter, "run-x")
        trained = teacher.reply("hi", "run-x")
        assert trained == skills.generate("hi", adapter=agent.policy.active_adapter, max_new_tokens=12)
        assert trained != teacher.reply("hi", None)  # the adapter moved the model
        assert (teacher.folder / "run-x" / "adapter" / "adapter_config.json").is_file()
    finally:
        teacher.close()


def test_the_command_prints_its_url_and_serves_the_page(tiny_model_dir, tmp_path):
    import os
    import re
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    command = [sys.executable, "-m", "rllama.cli", "teach", "--model", str(tiny_model_dir), "--port", "0",
               "--folder", str(tmp_path / "skills"), "--engine", "torch", "--threads", "1"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        found = re.search(r"rllama teach: (http://127\.0\.0\.1:\d+/) \(ready in [0-9.]+ s; chat on torch", line)
        assert found, line
        with urllib.request.urlopen(found.group(1), timeout=30) as page:
            assert b"teach.js" in page.read()
        with urllib.request.urlopen(found.group(1) + "api/info", timeout=30) as info:
            assert json.loads(info.read())["folder"] == str((tmp_path / "skills").resolve())
    finally:
        server.terminate()
        server.wait(timeout=60)
    bad = subprocess.run(command[:-4] + ["--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not a loopback address and api_key is None" in bad.stderr


def test_a_page_closed_mid_learn_loses_nothing(tmp_path):
    """The learn runs in the server: a reader of its progress that goes away (a closed tab) stops nothing,
    and what it learned is saved; a fresh start finds it."""
    import urllib.request

    teacher = new_teacher(tmp_path / "skills")
    try:
        c = client(teacher)
        c.post("/api/skills", json={"name": "zoggian"})
        c.post("/api/skills/zoggian/examples", json={"prompt": "hi", "response": "zog"})
        with TeachServer(teacher) as server:
            with teacher.skills.lock:  # the learn cannot take a step before the page has gone
                job = c.post("/api/skills/zoggian/learn", json={}).json()["id"]
                with urllib.request.urlopen(f"{server.base_url}/api/jobs/{job}/events", timeout=30) as stream:
                    assert stream.readline().startswith(b"event: queued")
                # the tab closed here, with the stream
            assert teacher.wait(job, timeout=120).state == "done"
    finally:
        teacher.close()
    again = new_teacher(tmp_path / "skills")
    try:
        assert again.skill("zoggian").steps == LEARN["epochs"]
        assert again.reply("hi", "zoggian") == "zog"
    finally:
        again.close()


def test_a_failed_save_or_a_taken_name_leaves_everything_as_it_was(teacher, monkeypatch, tmp_path):
    import errno

    import rllama.teach.teacher as module

    c = client(teacher)
    teach_zog(c)
    teacher.skills.policy.add_adapter("agent")  # an agent's adapter on the same model: not a skill's name
    for request in (lambda: c.post("/api/skills", json={"name": "agent"}),
                    lambda: c.patch("/api/skills/zoggian", json={"name": "agent"})):
        response = request()
        assert response.status_code == 409 and "not a skill" in response.json()["error"]["message"]
    (teacher.folder / "stray").mkdir()  # a folder the teacher did not load: never overwritten
    load = {"path": str(teacher.folder / "zoggian"), "name": "stray"}
    assert c.post("/api/skills/load", json=load).status_code == 409

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "writing_dir", full)
    adapters = sorted(teacher.skills.list_adapters())
    for request, status in ((lambda: c.post("/api/skills", json={"name": "new"}), 507),
                            (lambda: c.patch("/api/skills/zoggian", json={"name": "renamed"}), 507),
                            (lambda: c.post("/api/skills/load", json={"path": str(teacher.folder / "zoggian"),
                                                                      "name": "copy"}), 507),
                            (lambda: c.post("/api/skills/zoggian/examples", json={"prompt": "a", "response": "b"}),
                             507)):
        response = request()
        assert response.status_code == status and "No space left" in response.json()["error"]["message"]
    monkeypatch.undo()
    assert [s["name"] for s in c.get("/api/skills").json()["skills"]] == ["zoggian"]
    assert sorted(teacher.skills.list_adapters()) == adapters and len(teacher.examples("zoggian")) == 2
    assert sorted(p.name for p in teacher.folder.iterdir()) == ["stray", "zoggian"]
    assert c.post("/api/chat", json={"prompt": "hi", "skill": "zoggian"}).json()["reply"] == "zog"
    # a saved skill whose adapter/ is a link to a folder elsewhere is refused, not copied in
    outside = tmp_path / "outside"
    teacher.skills.save_adapter("zoggian", outside / "adapter")
    forged = teacher.folder / "forged"
    forged.mkdir()
    (forged / "skill.json").write_text((teacher.folder / "zoggian" / "skill.json").read_text())
    (forged / "adapter").symlink_to(outside / "adapter")
    from rllama.fileio import write_manifest

    write_manifest(forged)
    response = c.post("/api/skills/load", json={"path": str(forged), "name": "evil"})
    assert response.status_code == 403 and "outside the folders" in response.json()["error"]["message"]
