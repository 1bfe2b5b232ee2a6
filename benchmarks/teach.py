"""The teaching page on the embedded model: time to a usable page, learning the Zoggian skill from 8
corrections, and the chat's first-token latency while a skill learns against idle.

    python benchmarks/teach.py                    # writes results/teach.json and results/teach.png
    python benchmarks/teach.py --engine torch     # the chat on the learner's model instead of llama.cpp

It starts ``rllama teach --port 0`` as a user would (a subprocess, one torch thread), waits for the page
and ``/api/info``, then drives the JSON API the page uses:

1. **Startup**: seconds from the command to a page that answers (``GET /`` and ``/api/info``).
2. **Learn**: a skill gets examples/zoggian.py's 8 examples; seconds from "learn" to the ``done`` event
   (the reply to the probe prompt before and after included), and the replies to three questions after.
3. **First token while learning**: ``--chats`` streamed chats idle, then the same while a learn runs
   its steps (a second skill, so that the first keeps its adapter; from the learn's first step, after
   the reply it shows "before", which takes the chat engine), timing the first ``token`` event of each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, save_figure, versions  # noqa: E402

from examples.zoggian import EXAMPLES, QUESTIONS  # noqa: E402


def call(base: str, method: str, path: str, body=None, timeout: float = 600):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def stream(base: str, path: str, body: dict):
    """``(kind, data, seconds since the request)`` of each server-sent event of a POST (or GET without a body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"} if data else {})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as response:
        kind = None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:]), time.perf_counter() - start


def first_token(base: str, prompt: str, skill: str | None) -> tuple[float, float, str]:
    """Seconds to the first token, seconds to the whole reply, the reply."""
    first = None
    for kind, data, t in stream(base, "/api/chat", {"prompt": prompt, "skill": skill, "stream": True}):
        if kind == "token" and first is None:
            first = t
        if kind == "done":
            return first, t, data["reply"]
    raise RuntimeError("the chat ended without a reply")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="auto", choices=["auto", "llama.cpp", "torch"])
    parser.add_argument("--chats", type=int, default=6, help="chats timed idle, and as many while learning")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--name", default="teach")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="rllama-teach-bench-")
    command = [sys.executable, "-m", "rllama.cli", "teach", "--port", "0", "--folder", folder, "--engine",
               args.engine, "--threads", "1", "--epochs", str(args.epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "http://" not in line:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                raise RuntimeError("rllama teach exited before printing its URL")
        base = re.search(r"(http://\S+?)/ ", line).group(1)
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # keep the pipe drained
        with urllib.request.urlopen(base + "/", timeout=60) as page:
            assert b"teach.js" in page.read()
        info = call(base, "GET", "/api/info")
        startup = time.perf_counter() - start
        print(f"page usable after {startup:.1f} s ({info['engine']})", flush=True)

        call(base, "POST", "/api/skills", {"name": "zoggian"})
        call(base, "PUT", "/api/skills/zoggian/examples", {"examples": EXAMPLES})
        t0 = time.perf_counter()
        job = call(base, "POST", "/api/skills/zoggian/learn", {"probe": QUESTIONS[1]})
        losses, done = [], None
        for kind, data, _ in stream(base, f"/api/jobs/{job['id']}/events", None):
            if kind == "step":
                losses.append(data["loss"])
            if kind in ("done", "failed"):
                done = data
                break
        learn_s = time.perf_counter() - t0
        if done is None or done["type"] != "done":
            raise RuntimeError(f"the learn did not finish: {done}")
        answers = {q: call(base, "POST", "/api/chat", {"prompt": q, "skill": "zoggian"})["reply"] for q in QUESTIONS}
        print(f"learned in {learn_s:.1f} s: before {done['before']!r}, after {done['after']!r}", flush=True)

        idle = [first_token(base, q, "zoggian") for q in (QUESTIONS * args.chats)[: args.chats]]
        call(base, "POST", "/api/skills", {"name": "second"})
        call(base, "PUT", "/api/skills/second/examples", {"examples": EXAMPLES})
        busy_job = call(base, "POST", "/api/skills/second/learn", {})
        # from its first step on: the learn's own "before" reply, which uses the chat engine, is over by then
        while not any(e["type"] == "step" for e in call(base, "GET", f"/api/jobs/{busy_job['id']}")["log"]):
            time.sleep(0.05)
        busy = []
        for q in (QUESTIONS * args.chats)[: args.chats]:
            state = call(base, "GET", f"/api/jobs/{busy_job['id']}")["state"]
            busy.append((*first_token(base, q, "zoggian"), state))
        learning_all_along = all(b[3] == "running" for b in busy)
        for _ in stream(base, f"/api/jobs/{busy_job['id']}/events", None):
            pass
    finally:
        server.terminate()
        server.wait(timeout=60)

    idle_first = statistics.median(t[0] for t in idle)
    busy_first = statistics.median(t[0] for t in busy)
    result = {
        "benchmark": "teach", "command": "python benchmarks/teach.py " + " ".join(sys.argv[1:]),
        "versions": versions(), "engine": info["engine"], "model": info["model"], "threads": 1,
        "startup_s": startup,
        "learn": {"examples": len(EXAMPLES), "epochs": args.epochs, "seconds": learn_s, "steps": done["steps"],
                  "losses": losses, "probe": done["prompt"], "before": done["before"], "after": done["after"],
                  "answers_after": answers, "target_s": 60,
                  "says_zog": sum("zog" in a.lower() for a in answers.values())},
        "first_token": {"idle_s": [t[0] for t in idle], "learning_s": [t[0] for t in busy],
                        "idle_median_s": idle_first, "learning_median_s": busy_first,
                        "ratio": busy_first / idle_first, "target_ratio": 2.0,
                        "learn_running_for_every_chat": learning_all_along,
                        "reply_s_idle": [t[1] for t in idle], "reply_s_learning": [t[1] for t in busy]},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(range(1, len(losses) + 1), losses, marker="o")
    a.set(xlabel="learn step (8 examples each)", ylabel="loss per response token",
          title=f"Zoggian skill: {learn_s:.0f} s from learn to answer")
    b.boxplot([result["first_token"]["idle_s"], result["first_token"]["learning_s"]])
    b.set_xticks([1, 2], ["idle", "while a skill learns"])
    b.set(ylabel="seconds to the first token",
          title=f"chat on {info['engine']}: {result['first_token']['ratio']:.2f}x idle")
    fig.suptitle(f"rllama teach, {info['model']}, {versions()['cpu']}, 1 thread", fontsize=10)
    save_figure(fig, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
