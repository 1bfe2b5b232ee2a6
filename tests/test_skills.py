"""Skills: named adapters, learn() from examples (response-only loss), serving while learning,
trajectory logs (schema, validation) and behaviour cloning."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rllama.errors import CorruptFileError, RLlamaError
from rllama.skills import SkillModel, sft_loss, validate_examples
from rllama.trajectories import (
    TrajectoryError,
    TrajectoryWriter,
    behaviour_cloning,
    read_trajectories,
    select_episodes,
)
from tests.conftest import ChoiceEnv, make_tiny_lm, make_tokenizer, right_probability


@pytest.fixture
def skill():
    model = SkillModel(make_tiny_lm(), make_tokenizer(), precision="fp32")
    yield model
    model.close()


def adapter_state(policy, name):
    return {n: p.detach().clone() for n, p in policy.lm.named_parameters() if "lora_" in n and f".{name}." in n}


def test_adapter_round_trip(skill, tmp_path):
    policy = skill.policy
    policy.add_adapter("zog")
    assert skill.list_adapters() == ["default", "zog"] and policy.active_adapter == "default"
    with torch.no_grad():
        for p in policy.adapter_parameters("zog"):
            p.add_(torch.randn_like(p))
    saved = adapter_state(policy, "zog")
    skill.save_adapter("zog", tmp_path / "zog")
    skill.delete_adapter("zog")
    assert skill.list_adapters() == ["default"]
    skill.load_adapter("zog", tmp_path / "zog")
    loaded = adapter_state(policy, "zog")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with pytest.raises(RLlamaError, match="is active"):
        policy.delete_adapter("default")
    with pytest.raises(RLlamaError, match="no adapter named"):
        skill.generate("hi", adapter="nope")
    with pytest.raises(RLlamaError, match="already exists"):
        policy.add_adapter("zog")
    with pytest.raises(Exception, match="adapter_config.json"):
        skill.load_adapter("other", tmp_path / "missing")


def test_sft_loss_counts_response_tokens_only(skill):
    policy = skill.policy
    prompt, response = skill._prompt_ids("Say hello."), skill.chat.reply_ids("Zog!")
    loss, n = sft_loss(policy, [prompt], [response])
    assert n == len(response)
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = policy.lm(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    start = len(prompt)
    manual = -torch.stack([logp[start + i - 1, response[i]] for i in range(len(response))]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-4, abs=1e-5)
    # the prompt's own tokens carry no loss: changing them changes nothing but the conditioning
    everything = -torch.stack([logp[i - 1, int(ids[0, i])] for i in range(1, ids.shape[1])]).mean()
    assert abs(everything.item() - loss.item()) > 1e-3


def test_learn_teaches_the_adapter_and_leaves_the_base_alone(skill):
    before_base = skill.generate("Say hello.", adapter=None, max_new_tokens=6)
    before_default = adapter_state(skill.policy, "default")
    stats = skill.learn([{"prompt": "Say hello.", "response": "zog"}] * 4, adapter="zoggian", epochs=30,
                        learning_rate=3e-3, batch_size=4)
    # (a tiny random model's frozen lm head caps each token's probability near 0.01: loss ~4.5 at best)
    assert stats["losses"][-1] < stats["losses"][0] - 1.0 and stats["steps"] == 30
    assert skill.generate("Say hello.", adapter="zoggian", max_new_tokens=6) == "zog"
    assert skill.generate("Say hello.", adapter=None, max_new_tokens=6) == before_base
    after_default = adapter_state(skill.policy, "default")
    assert all(torch.equal(before_default[k], after_default[k]) for k in before_default)


def test_examples_are_validated():
    with pytest.raises(ValueError, match="example 1 lacks \\['response'\\]"):
        validate_examples([{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match="non-empty string"):
        validate_examples([{"prompt": "a", "response": "  "}])
    with pytest.raises(ValueError, match="list"):
        validate_examples({"prompt": "a", "response": "b"})


def test_generate_while_learning_in_the_background(skill):
    spans, during = [], []
    real = skill.policy.generate
    learning = threading.Event()

    def spy(*args, **kwargs):
        version = dict(skill.versions)
        out = real(*args, **kwargs)
        spans.append((version, dict(skill.versions)))
        return out

    skill.policy.generate = spy
    future = skill.learn_async([{"prompt": f"word {i}", "response": "zog"} for i in range(8)], adapter="bg",
                               epochs=20, batch_size=2, learning_rate=1e-3)
    while not future.done() and len(during) < 5:
        if skill.versions.get("bg", 0) > 0:
            learning.set()
            during.append(skill.generate("word 1", adapter="bg", max_new_tokens=4))
        time.sleep(0.005)
    stats = future.result(timeout=300)  # no deadlock: learning finishes while generations interleave
    assert stats["steps"] == 80 and learning.is_set() and during
    assert all(before == after for before, after in spans)  # no training step inside a generation


def test_agent_trains_its_named_adapter(make_agent):
    agent = make_agent(adapter="skill", algorithm_config={"batch_episodes": 4, "minibatch_size": 4, "policy_head": 0})
    assert agent.policy.active_adapter == "skill"
    default_before = adapter_state(agent.policy, "default")
    skill_before = adapter_state(agent.policy, "skill")
    agent.train(ChoiceEnv(), 8, seed=0, progress=False)
    default_after, skill_after = adapter_state(agent.policy, "default"), adapter_state(agent.policy, "skill")
    assert all(torch.equal(default_before[k], default_after[k]) for k in default_before)
    assert any(not torch.equal(skill_before[k], skill_after[k]) for k in skill_before)


def test_trajectory_log_round_trip_and_behaviour_cloning(make_agent, tmp_path):
    log = tmp_path / "episodes.jsonl"
    agent = make_agent(trajectory_log=log, algorithm_config={"batch_episodes": 100})  # collect, no update
    agent.train(ChoiceEnv(steps=2), 6, seed=0, progress=False)
    episodes = read_trajectories(log)
    assert [e["episode"] for e in episodes] == list(range(6)) and all(len(e["steps"]) == 2 for e in episodes)
    for e in episodes:
        for s in e["steps"]:
            assert s["response"] in ("left", "right") and s["action"] == (1 if s["response"] == "right" else 0)
            assert s["reward"] == (1.0 if s["action"] == 1 else -1.0) and s["prompt"][0]["role"] == "system"
        assert e["return"] == sum(s["reward"] for s in e["steps"])
    assert select_episodes(episodes, "success") == [e for e in episodes if e["return"] > 0]
    assert len(select_episodes(episodes, 0.5)) == 3

    with pytest.raises(RLlamaError, match="leaves the model's scores out.*score_normalization='mean'"):
        behaviour_cloning(make_agent(), log)  # the default policy is PPO's head alone: cloning would change nothing
    fresh = make_agent(score_normalization="mean")
    p0 = right_probability(fresh, 3)
    stats = behaviour_cloning(fresh, log, keep="success", epochs=20, learning_rate=3e-3)
    assert stats["episodes"] > 0
    assert right_probability(fresh, 3) > p0 + 0.1  # imitating the rewarded replies raises P(right)


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def step(episode=0, t=0, done=True, **kw):
    record = {"episode": episode, "step": t, "observation": "o", "prompt": [{"role": "user", "content": "o"}],
              "response": "r", "action": 0, "reward": 1.0, "done": done, "metadata": {}}
    record.update(kw)
    return record


@pytest.mark.parametrize("records,message", [
    (["{not json"], ":1: not valid JSON"),
    ([step(), {k: v for k, v in step(1).items() if k != "reward"}], ":2: missing field 'reward'"),
    ([step(reward="high")], ":1: field 'reward' is str"),
    ([step(t=1)], ":1: episode 0 starts at step 1"),
    ([step(done=False), step(t=2)], ":2: step 2 of episode 0; expected 1"),
    ([step(done=False), step(episode=1)], ":2: episode 0 (from line 1) has no step with done=true"),
    ([step(), step()], ":2: episode 0 appears again"),
    ([step(done=False)], ":1: the file ends inside episode 0"),
    ([step(prompt=[{"role": "user"}])], ":1: prompt message 0"),
])
def test_trajectory_schema_errors_name_the_line(tmp_path, records, message):
    path = tmp_path / "bad.jsonl"
    write_lines(path, records)
    with pytest.raises(TrajectoryError, match=message.replace("(", "\\(").replace(")", "\\)")):
        read_trajectories(path)


def fake_episode(tag: str, steps: int = 3, reward: float = 1.0):
    """What TrajectoryWriter reads of an agent's record of an episode."""
    return SimpleNamespace(
        steps=[SimpleNamespace(text=f"{tag} reply {t}", action=t, reward=reward) for t in range(steps)],
        observations=[f"{tag} observation {t} café" for t in range(steps)],
        prompts=[[{"role": "user", "content": f"{tag} prompt {t}"}] for t in range(steps)],
    )


@pytest.mark.parametrize("lines,message", [
    ([json.dumps(step()).encode(), b'{"episode": "\xff\xfe"}', json.dumps(step(1)).encode()], ":2: not valid UTF-8"),
    ([json.dumps(step()).encode(), b"\xc3("], ":2: not valid UTF-8"),  # the last line, but whole (it has its newline)
    ([json.dumps(step()).encode(), b'{"episode": 1, "st', json.dumps(step(2)).encode()], ":2: not valid JSON"),
    ([b"[1, 2]"], ":1: expected a JSON object, got list"),
    ([b'"a step"'], ":1: expected a JSON object, got str"),
    ([json.dumps(step()).encode(), b"{}"], ":2: missing field 'episode'"),
])
def test_trajectory_bad_bytes_name_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(TrajectoryError, match=f"bad.jsonl{message}") as info:
        read_trajectories(path)
    assert isinstance(info.value, CorruptFileError)


def test_trajectory_cut_last_line_is_skipped_then_removed_by_the_next_append(tmp_path, caplog):
    path = tmp_path / "episodes.jsonl"
    first = TrajectoryWriter(path)
    assert [first.write_episode(fake_episode("a")) for _ in range(2)] == [0, 1]
    whole = path.read_bytes()
    for cut in (b'{"episode": 2, "step": 0, "obs', "{\"episode\": 2, \"observation\": \"caf\u00e9".encode()[:-1]):
        # a writer killed in the middle of episode 2: its first line whole, the second cut (even inside a character)
        path.write_bytes(whole + json.dumps(step(2, done=False)).encode() + b"\n" + cut)
        with caplog.at_level(logging.WARNING, logger="rllama.trajectories"):
            assert [e["episode"] for e in read_trajectories(path)] == [0, 1]
        assert f"{path}:8: skipping the last line and the episode 2 it ends (from line 7)" in caplog.text
    path.write_bytes(whole + b'{"episode": 2, "st')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rllama.trajectories"):
        assert [e["episode"] for e in read_trajectories(path)] == [0, 1]
        assert TrajectoryWriter(path).write_episode(fake_episode("b", steps=2)) == 2
        assert first.write_episode(fake_episode("a")) == 3
    assert "removing the last 18 bytes" in caplog.text
    episodes = read_trajectories(path)
    assert [(e["episode"], len(e["steps"])) for e in episodes] == [(0, 3), (1, 3), (2, 2), (3, 3)]
    assert path.read_bytes().startswith(whole)


def test_trajectory_writer_keeps_damage_visible(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(json.dumps(step()).encode() + b"\nnot a step")  # not a cut-off episode: never removed
    TrajectoryWriter(path).write_episode(fake_episode("a"))
    assert path.read_bytes().startswith(json.dumps(step()).encode() + b"\nnot a step\n")
    with pytest.raises(TrajectoryError, match=":2: not valid JSON"):
        read_trajectories(path)
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's file with no newline")
    TrajectoryWriter(notes).write_episode(fake_episode("a"))
    assert notes.read_text().startswith("a user's file with no newline\n")


def test_trajectory_writers_on_one_file_never_reuse_an_episode_id(tmp_path):
    path = tmp_path / "episodes.jsonl"
    writers = [TrajectoryWriter(path), TrajectoryWriter(path)]
    ids = [writers[i % 2].write_episode(fake_episode(f"w{i % 2}", steps=1 + i % 3)) for i in range(10)]
    assert ids == list(range(10))
    assert [e["episode"] for e in read_trajectories(path)] == list(range(10))
    later = TrajectoryWriter(path)  # a writer opened on an existing file continues after its last id
    assert later.write_episode(fake_episode("w2")) == 10


WRITER_PROCESS = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from rllama.trajectories import TrajectoryWriter

path, tag, go, n = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
writer = TrajectoryWriter(path)
Path(f"{go}.{tag}").touch()
while not go.exists():
    time.sleep(0.01)
for i in range(n):
    steps = 1 + i % 4
    record = SimpleNamespace(
        steps=[SimpleNamespace(text=tag, action=t, reward=1.0) for t in range(steps)],
        observations=[f"{tag} " + "x" * 3000 for t in range(steps)],  # episodes larger than a page
        prompts=[[{"role": "user", "content": tag}] for t in range(steps)])
    print(writer.write_episode(record), flush=True)
"""


def test_trajectory_writers_in_two_processes_never_collide(tmp_path):
    path, go, n = tmp_path / "episodes.jsonl", tmp_path / "go", 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_PROCESS, str(path), tag, str(go), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("p", "q")]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{go}.{tag}").exists() for tag in ("p", "q")):  # both writers open: start together
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer did not start"
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    ids = [[int(x) for x in out.split()] for out, _ in outputs]
    assert sorted(ids[0] + ids[1]) == list(range(2 * n))
    episodes = read_trajectories(path)  # every line valid, every episode whole
    assert sorted(e["episode"] for e in episodes) == list(range(2 * n))
    for e in episodes:
        tag = e["steps"][0]["response"]
        assert e["episode"] in ids[0 if tag == "p" else 1] and all(s["response"] == tag for s in e["steps"])


def test_zoggian_example_runs_end_to_end(tiny_model_dir, monkeypatch, capsys):
    from examples import zoggian

    validate_examples(zoggian.EXAMPLES)
    monkeypatch.setattr("sys.argv", ["zoggian.py", "--model", str(tiny_model_dir), "--epochs", "1"])
    zoggian.main()
    out = capsys.readouterr().out
    assert "adapter 'zoggian' on" in out and "saved, deleted and loaded back" in out and "learned 'zoggian'" in out
