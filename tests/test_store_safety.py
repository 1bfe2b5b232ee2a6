"""The episodic memory store on disk refuses what it cannot trust: an edited ``next_id``, another embedder's
vectors, malformed manifest fields, an index of another width, and paths that leave the folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rllama.memory import EpisodicMemory, Experience, HashingEmbedder, MemoryStoreError
from tests.conftest import ChoiceEnv

WORDS = ["apple", "river", "castle", "engine", "violin", "desert"]


class LengthEmbedder:
    """Another embedder of a chosen width (word lengths hashed to buckets): its vectors mean something else."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.name = f"lengths-{dim}"

    def __call__(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                out[row, len(word) % self.dim] += 1.0
            out[row, -1] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def config(self) -> dict:
        return {"type": "lengths", "name": self.name, "dim": self.dim}


def saved_store(tmp_path, embedder=None):
    memory = EpisodicMemory(embedder or HashingEmbedder(64), k=2)
    memory.add([Experience(observation=w, action=w, metadata={"n": i}) for i, w in enumerate(WORDS)])
    memory.delete([5])  # next_id (6) is now above the largest stored id (4)
    return memory, memory.save(tmp_path / "store")


def edit_manifest(folder, change):
    """Change memory.json and its checksum, as a consistent forgery (or an older writer's bug) would."""
    from rllama.memory.store import content_digest

    path = folder / "memory.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if "content_sha256" in manifest:
        manifest["content_sha256"] = content_digest(manifest)
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------- next_id
@pytest.mark.parametrize("next_id", [4, 0, -1, "7", True, None])
def test_load_refuses_a_next_id_that_would_reuse_ids(tmp_path, next_id):
    _, folder = saved_store(tmp_path)
    edit_manifest(folder, lambda m: m.update(next_id=next_id))
    with pytest.raises(MemoryStoreError, match=r"memory.json: field 'next_id'") as info:
        EpisodicMemory.load(folder)
    assert str(folder) in str(info.value)


def test_a_loaded_store_continues_its_ids(tmp_path):
    memory, folder = saved_store(tmp_path)
    loaded = EpisodicMemory.load(folder)
    assert loaded.add(Experience(observation="new", action="x")) == [6]
    edit_manifest(folder, lambda m: m.update(next_id=5))  # above every stored id (4): allowed
    assert EpisodicMemory.load(folder).add(Experience(observation="new", action="x")) == [5]


# ---------------------------------------------------------------------------------------------- embedder identity
def test_load_refuses_another_embedder_of_the_same_width(tmp_path):
    _, folder = saved_store(tmp_path)  # written by hashing-64
    with pytest.raises(MemoryStoreError, match=r"written by the embedder 'hashing-64'.*given is 'lengths-64'"):
        EpisodicMemory.load(folder, embedder=LengthEmbedder(64))
    _, other = saved_store(tmp_path / "other", embedder=LengthEmbedder(64))
    with pytest.raises(MemoryStoreError, match=r"written by the embedder 'lengths-64'.*given is 'hashing-64'"):
        EpisodicMemory.load(other, embedder=HashingEmbedder(64))
    with pytest.raises(MemoryStoreError, match=r"cannot rebuild.*embedder=\.\.\."):
        EpisodicMemory.load(other)  # rllama cannot make a LengthEmbedder from its record
    with pytest.raises(MemoryStoreError, match="dimensional"):
        EpisodicMemory.load(folder, embedder="hashing")  # 1024 wide


def test_load_accepts_the_embedder_that_wrote_the_store(tmp_path):
    memory, folder = saved_store(tmp_path)
    for embedder in (None, memory.embedder, HashingEmbedder(64), "hashing-64"):
        loaded = EpisodicMemory.load(folder, embedder=embedder)
        assert [vars(e) for e in loaded] == [vars(e) for e in memory]
    custom, other = saved_store(tmp_path / "other", embedder=LengthEmbedder(64))
    loaded = EpisodicMemory.load(other, embedder=custom.embedder)  # as RLlamaAgent.load does
    assert loaded.search("violin")[0].experience.observation == custom.search("violin")[0].experience.observation
    assert len(EpisodicMemory.load(other, embedder=LengthEmbedder(64))) == len(custom)


def test_agent_load_keeps_its_embedder_and_refuses_another(make_agent, tmp_path):
    agent = make_agent(memory=EpisodicMemory(HashingEmbedder(64)))
    agent.train(ChoiceEnv(), 3, seed=0, progress=False)
    agent.save(tmp_path / "ckpt")
    same = make_agent(memory=EpisodicMemory(HashingEmbedder(64)))
    same.load(tmp_path / "ckpt")
    assert [vars(e) for e in same.episodic_memory] == [vars(e) for e in agent.episodic_memory]
    other = make_agent(memory=EpisodicMemory(LengthEmbedder(64)))
    before = other.episodic_memory
    with pytest.raises(MemoryStoreError, match="written by the embedder 'hashing-64'"):
        other.load(tmp_path / "ckpt")
    assert other.episodic_memory is before  # refused before anything changed


# ---------------------------------------------------------------------------------------------- manifest fields
def set_entry(field, value):
    return lambda m: m["entries"][0].update({field: value})


def drop_entry_field(field):
    return lambda m: m["entries"][0].pop(field)


@pytest.mark.parametrize("change,field", [
    (lambda m: m["embedder"].update(dim=-3), "'embedder.dim' is -3"),
    (lambda m: m["embedder"].update(dim="64"), "'embedder.dim' is '64'"),
    (lambda m: m["embedder"].update(dim=64.0), "'embedder.dim' is 64.0"),
    (lambda m: m["embedder"].pop("dim"), "'embedder.dim' is None"),
    (lambda m: m["embedder"].update(name=["x"]), "'embedder.name'"),
    (lambda m: m.update(embedder="hashing-64"), "'embedder'"),
    (lambda m: m.update(config=[1]), "'config'"),
    (lambda m: m["config"].update(capacity=0), "'config' is not a valid EpisodicMemory config: capacity=0"),
    (lambda m: m["config"].update(colour="red"), "'config' is not a valid EpisodicMemory config"),
    (lambda m: m.update(entries={"0": {}}), "'entries'"),
    (lambda m: m["entries"].__setitem__(0, "apple"), "'entries\\[0\\]' is a JSON str"),
    (set_entry("colour", "red"), "'entries\\[0\\]' has unknown fields \\['colour'\\]"),
    (drop_entry_field("action"), "'entries\\[0\\]' lacks \\['action'\\]"),
    (set_entry("reward", "high"), "'entries\\[0\\].reward' is 'high'"),
    (set_entry("reward", float("nan")), "'entries\\[0\\].reward' is nan"),
    (set_entry("observation", 3), "'entries\\[0\\].observation' is 3"),
    (set_entry("metadata", []), "'entries\\[0\\].metadata'"),
    (set_entry("outcome", 1), "'entries\\[0\\].outcome'"),
    (set_entry("id", "0"), "'entries\\[0\\].id'"),
    (set_entry("id", 1), "'entries\\[1\\].id' is 1; expected a non-negative id not used before"),
    (set_entry("id", -2), "'entries\\[0\\].id' is -2"),
    (lambda m: m.update(index_file="../store2/index.faiss"), "'index_file'"),
    (lambda m: m.update(index_file="sub/index.faiss"), "'index_file'"),
    (lambda m: m.update(index_file=".."), "'index_file'"),
    (lambda m: m.update(index_file=7), "'index_file'"),
    (lambda m: m.update(index_sha256="not a digest"), "'index_sha256'"),
    (lambda m: m.pop("index_sha256"), "'index_sha256'"),
    (lambda m: m.update(version=3), "format version 1 to 2"),
    (lambda m: m.update(version=True), "format version 1 to 2"),
    (lambda m: m.pop("format"), "format version 1 to 2"),
])
def test_load_names_the_file_and_the_bad_field(tmp_path, change, field):
    _, folder = saved_store(tmp_path)
    edit_manifest(folder, change)
    with pytest.raises(MemoryStoreError, match=field) as info:
        EpisodicMemory.load(folder)
    assert str(folder / "memory.json") in str(info.value)


def test_load_refuses_an_unreadable_manifest(tmp_path):
    _, folder = saved_store(tmp_path)
    (folder / "memory.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(MemoryStoreError, match="cannot read .*memory.json"):
        EpisodicMemory.load(folder)
    (folder / "memory.json").write_text("[1, 2]")
    with pytest.raises(MemoryStoreError, match="memory.json holds a JSON list"):
        EpisodicMemory.load(folder)


def test_load_refuses_an_index_of_another_width_or_kind(tmp_path):
    import hashlib

    _, folder = saved_store(tmp_path)
    # a consistent-looking manifest (dim 32, hashing-32) over the 64-wide index
    edit_manifest(folder, lambda m: m["embedder"].update(dim=32, name="hashing-32"))
    with pytest.raises(MemoryStoreError, match="holds 64-dimensional vectors, but field 'embedder.dim' of .* 32"):
        EpisodicMemory.load(folder)
    edit_manifest(folder, lambda m: m["embedder"].update(dim=64, name="hashing-64"))
    flat = EpisodicMemory(HashingEmbedder(64))
    plain_index = flat._faiss.serialize_index(flat._faiss.IndexFlatIP(64)).tobytes()  # no ids
    for blob, message in [(b"not an index at all", "is not a FAISS index"), (plain_index, "expected an inner-product")]:
        digest = hashlib.sha256(blob).hexdigest()
        (folder / "index-replaced.faiss").write_bytes(blob)
        edit_manifest(folder, lambda m, digest=digest: m.update(index_file="index-replaced.faiss", index_sha256=digest))
        with pytest.raises(MemoryStoreError, match=message):
            EpisodicMemory.load(folder)


def test_save_never_deletes_a_file_outside_the_store(tmp_path):
    memory, folder = saved_store(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    edit_manifest(folder, lambda m: m.update(index_file="../victim.txt"))
    memory.save(folder)
    assert victim.read_text() == "keep me"
    assert len(EpisodicMemory.load(folder)) == len(memory)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_every_damaged_byte_of_a_store_is_caught(tmp_path, damage):
    import random

    from rllama.errors import CorruptFileError

    memory = EpisodicMemory("hashing", k=2)
    memory.add([Experience(observation=f"room {i} has a key", action="take key", reward=0.5 * i) for i in range(6)])
    folder = memory.save(tmp_path / "store")
    rng = random.Random(damage)
    for path in sorted(folder.iterdir()):
        original = path.read_bytes()
        for _ in range(25):
            if damage == "flip":
                at = rng.randrange(len(original))
                path.write_bytes(original[:at] + bytes([original[at] ^ (1 << rng.randrange(8))]) + original[at + 1:])
            else:
                path.write_bytes(original[: rng.randrange(len(original))])
            with pytest.raises((MemoryStoreError, CorruptFileError), match=path.name):
                EpisodicMemory.load(folder)
        path.write_bytes(original)
    assert len(EpisodicMemory.load(folder)) == 6


# ---------------------------------------------------------------------- text UTF-8 cannot hold
LONE = "room \ud800 east"  # a lone surrogate, as text decoded with errors="surrogateescape" holds


def test_a_lone_surrogate_is_refused_where_it_enters_and_nothing_is_left_behind(tmp_path):
    memory = EpisodicMemory(HashingEmbedder(16))
    memory.add([Experience(observation="fine", action="go")])
    memory.save(tmp_path / "store")
    before = sorted(p.name for p in (tmp_path / "store").iterdir())
    for bad in (Experience(observation=LONE, action="go"), Experience(observation="x", action="go", lesson=LONE),
                Experience(observation="x", action="go", metadata={"note": [LONE]})):
        with pytest.raises(ValueError, match="experience 0.*character 5 of .*lone surrogate"):
            memory.add(bad)
    assert len(memory) == 1
    with pytest.raises(ValueError, match=r"experience 0 cannot be stored as JSON \(Object of type set"):
        memory.add(Experience(observation="x", action="go", metadata={"seen": {1, 2}}))
    assert len(memory) == 1
    memory.entries[0].observation = LONE  # put in behind add()'s back: save refuses before writing anything
    with pytest.raises(MemoryStoreError, match=r"entries\[0\]\['observation'\]: character 5.*lone surrogate"):
        memory.save(tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == before  # no orphan index file
    assert EpisodicMemory.load(tmp_path / "store").entries[0].observation == "fine"


def test_a_lone_surrogate_in_a_trajectory_is_refused_and_the_log_stays_whole(tmp_path):
    from rllama.errors import RLlamaError
    from rllama.trajectories import TrajectoryWriter, read_trajectories
    from tests.test_skills import fake_episode

    path = tmp_path / "log.jsonl"
    writer = TrajectoryWriter(path)
    writer.write_episode(fake_episode("a"))
    size = path.stat().st_size
    bad = fake_episode("b")
    bad.steps[1].text = LONE
    with pytest.raises(RLlamaError, match=r"step 1\['response'\]: character 5 .*lone surrogate"):
        writer.write_episode(bad)
    assert path.stat().st_size == size and len(read_trajectories(path)) == 1


def test_a_hook_returning_a_lone_surrogate_is_named(make_agent):
    from rllama.errors import HookError

    agent = make_agent()
    agent.format_observation = lambda obs: LONE
    with pytest.raises(HookError, match=r"format_observation\(3\) returned text that UTF-8 cannot hold"):
        agent.act(3)


def test_an_escaped_lone_surrogate_in_a_store_is_refused(tmp_path):
    """JSON may spell a lone surrogate ("\\ud800") that no text holds: refused as damage, digest or not."""
    _, folder = saved_store(tmp_path)
    manifest = json.loads((folder / "memory.json").read_text())
    manifest["entries"][0]["observation"] = "x\ud800"  # the digest cannot be recomputed: UTF-8 cannot hold it
    (folder / "memory.json").write_text(json.dumps(manifest))  # ASCII JSON: the escape "\\ud800"
    with pytest.raises(MemoryStoreError, match=r"memory.json: memory.json\['entries'\]\[0\]\['observation'\]: "
                                               r"character 1 .* lone surrogate"):
        EpisodicMemory.load(folder)
    del manifest["content_sha256"]
    manifest["version"] = 1  # an old store without a digest: refused all the same
    (folder / "memory.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryStoreError, match="lone surrogate"):
        EpisodicMemory.load(folder)


def test_a_refused_save_or_log_leaves_no_new_file(tmp_path):
    from rllama.errors import RLlamaError
    from rllama.trajectories import TrajectoryWriter
    from tests.test_skills import fake_episode

    memory = EpisodicMemory(HashingEmbedder(16))
    memory.add([Experience(observation="fine", action="go")])
    memory.entries[0].lesson = LONE
    with pytest.raises(MemoryStoreError, match="lone surrogate"):
        memory.save(tmp_path / "new-store")
    bad = fake_episode("b")
    bad.observations[0] = LONE
    with pytest.raises(RLlamaError, match=r"step 0\['observation'\]"):
        TrajectoryWriter(tmp_path / "logs" / "new.jsonl").write_episode(bad)
    assert not (tmp_path / "new-store").exists() and not (tmp_path / "logs" / "new.jsonl").exists()


@pytest.mark.parametrize("hook", ["get_valid_actions", "episode_lesson", "inject_memories", "reply_prefix"])
def test_every_hook_returning_a_lone_surrogate_is_named(make_agent, hook):
    from rllama.errors import HookError
    from rllama.loops import run_episodes

    memory = EpisodicMemory("hashing", k=1)
    memory.add([Experience(observation="n=3", action="left")])
    agent = make_agent(memory=memory)
    if hook == "get_valid_actions":
        agent.get_valid_actions = lambda obs: ["left", LONE]
    elif hook == "episode_lesson":
        agent.episode_lesson = lambda *args: LONE
    elif hook == "inject_memories":
        agent.inject_memories = lambda text, retrieved: LONE
    else:
        agent.reply_prefix = LONE
        agent.hooks.agent = agent
        with pytest.raises(HookError, match="reply_prefix = .* lone surrogate"):
            agent.hooks.reply_prefix()
        return
    with pytest.raises(HookError, match=f"{hook}\\(.*returned text that UTF-8 cannot hold"):
        run_episodes(agent, ChoiceEnv(), 1, seed=0)
