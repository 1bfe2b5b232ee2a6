"""Skills: named adapters, learn() from examples (response-only loss), serving while learning,
trajectory logs (schema, validation) and behaviour cloning."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from rllama.errors import RLlamaError
from rllama.skills import SkillModel, sft_loss, validate_examples
from rllama.trajectories import TrajectoryError, behaviour_cloning, read_trajectories, select_episodes
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

    fresh = make_agent()
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


def test_zoggian_example_runs_end_to_end(tiny_model_dir, monkeypatch, capsys):
    from examples import zoggian

    validate_examples(zoggian.EXAMPLES)
    monkeypatch.setattr("sys.argv", ["zoggian.py", "--model", str(tiny_model_dir), "--epochs", "1"])
    zoggian.main()
    out = capsys.readouterr().out
    assert "adapter 'zoggian' on" in out and "saved, deleted and loaded back" in out and "learned 'zoggian'" in out
