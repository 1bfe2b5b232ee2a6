"""Episodic memory speed: retrieval latency, insert throughput and memory use at 1 k, 10 k, 100 k entries.

    python benchmarks/memory.py                 # the committed results (about 2 minutes)

For each size the store is filled with random normalised 384-d vectors (the width of the embedded
all-MiniLM-L6-v2) through ``EpisodicMemory.add(experiences, vectors=...)``, then single queries are
timed three ways in the same run:

- ``rllama``: ``EpisodicMemory.search_vectors`` (FAISS search + ranking + Experience lookup), k=4;
- ``faiss (limit)``: the bare ``IndexFlatIP.search`` on the same vectors, one thread;
- ``numpy (naive)``: brute-force ``vectors @ query`` + ``argpartition``.

Also measured: rllama with FAISS's default thread count (``search_threads=None``), the same
query with return/recency weighting (re-ranks 16 candidates), and end to end with the query embedded
by MiniLM (``search(text)``). Insert throughput is of ``add`` with precomputed vectors (index cost)
and with MiniLM embedding texts (1 k texts). Memory use: the index's bytes and the process RSS growth.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_figure, versions  # noqa: E402

DIM = 384
DEFAULT_FAISS_THREADS = 2  # set in main() from FAISS before anything changes it


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def summary(times: list[float]) -> dict:
    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}


def timed(fn, repeats: int) -> dict:
    return interleaved({"fn": fn}, repeats)["fn"]


def interleaved(fns: dict, repeats: int) -> dict:
    """Time each function ``repeats`` times, taking turns, so that machine noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: summary(ts) for name, ts in times.items()}


def random_unit(n: int, rng) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_size(n: int, queries: int, rng) -> dict:
    from rllama.memory import EpisodicMemory, Experience, HashingEmbedder

    class Fixed(HashingEmbedder):  # only its dimension matters here: vectors are given
        def __init__(self):
            super().__init__(DIM)

    gc.collect()
    rss0 = rss_mb()
    vectors = random_unit(n, rng)
    memory = EpisodicMemory(Fixed(), capacity=max(n, 1), k=4)
    experiences = [Experience(observation=f"obs {i}", action="a", reward=float(i % 3 - 1)) for i in range(n)]
    t = time.perf_counter()
    for start in range(0, n, 1000):
        memory.add(experiences[start:start + 1000], vectors=vectors[start:start + 1000])
    insert_s = time.perf_counter() - t
    rss1 = rss_mb()
    qs = random_unit(queries, rng)
    it = iter(range(10**9))

    def q():
        return qs[next(it) % queries:][:1]

    import faiss

    faiss.omp_set_num_threads(1)
    flat = memory.index
    half = EpisodicMemory(Fixed(), capacity=max(n, 1), k=4, index="fp16")
    for start in range(0, n, 1000):
        half.add(experiences[start:start + 1000], vectors=vectors[start:start + 1000])
    weighted = EpisodicMemory(Fixed(), capacity=max(n, 1), k=4, return_weight=0.5, recency_weight=0.1)
    weighted.index, weighted.entries, weighted._next_id = memory.index, memory.entries, memory._next_id
    row = {
        "entries": n,
        "insert_vectors_per_s": n / insert_s,
        "index_mb": n * DIM * 4 / 2**20,
        "rss_growth_mb": rss1 - rss0,
        **interleaved({
            "rllama": lambda: memory.search_vectors(q()),
            "rllama fp16": lambda: half.search_vectors(q()),
            "rllama weighted": lambda: weighted.search_vectors(q()),
            "faiss (limit)": lambda: flat.search(q(), 4),
        }, queries),
        "numpy (naive)": timed(lambda: np.argpartition(-(vectors @ q()[0]), 4)[:4], max(20, queries // 10)),
    }
    exact, approx = memory.search_vectors(qs[:50]), half.search_vectors(qs[:50])
    row["fp16 recall@4"] = float(np.mean([len({r.experience.id for r in a} & {r.experience.id for r in b}) / 4
                                          for a, b in zip(exact, approx)]))
    memory.search_threads = None
    faiss.omp_set_num_threads(DEFAULT_FAISS_THREADS)
    row["rllama, faiss default threads"] = timed(lambda: memory.search_vectors(q()), max(20, queries // 5))
    faiss.omp_set_num_threads(1)
    row["ratio rllama/limit"] = row["rllama"]["median_ms"] / row["faiss (limit)"]["median_ms"]
    row["speedup vs naive"] = row["numpy (naive)"]["median_ms"] / row["rllama"]["median_ms"]
    return row


def bench_text(rng) -> dict:
    from rllama.memory import EpisodicMemory, Experience

    memory = EpisodicMemory(k=4)  # the embedded MiniLM
    texts = [f"You are in room {i}. There is a {w} on the table." for i, w in
             zip(range(1000), rng.choice(["key", "lamp", "book", "apple", "coin"], size=1000))]
    t = time.perf_counter()
    memory.add([Experience(observation=s, action="take") for s in texts])
    add_s = time.perf_counter() - t
    return {
        "add_texts_per_s (MiniLM embedding)": len(texts) / add_s,
        "search(text) at 1k entries": timed(lambda: memory.search("Where is the lamp?"), 50),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    sizes = [r["entries"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in [("rllama", "o-"), ("rllama fp16", "v-"), ("rllama weighted", "s--"), ("faiss (limit)", "^-"),
                        ("numpy (naive)", "x:"),
                        ("rllama, faiss default threads", "d-.")]:
        ax.plot(sizes, [r[name]["median_ms"] for r in rows], style, label=name)
    ax.axhline(5.0, color="tab:red", lw=1, ls="--", label="target 5 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entries in memory")
    ax.set_ylabel("median latency of one query, ms (k=4)")
    ax.set_title("Episodic memory retrieval, 384-d, 1 FAISS thread")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    bx.bar([str(s) for s in sizes], [r["insert_vectors_per_s"] / 1e3 for r in rows], color="tab:blue")
    bx.set_xlabel("entries in memory")
    bx.set_ylabel("insert throughput, thousand entries / s (vectors given)")
    t = result["text"]
    bx.set_title(f"Inserts; with MiniLM embedding: {t['add_texts_per_s (MiniLM embedding)']:.0f} texts/s")
    bx.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="memory")
    args = parser.parse_args()
    import faiss
    import torch

    global DEFAULT_FAISS_THREADS
    DEFAULT_FAISS_THREADS = faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    result = {"benchmark": "memory", "command": "python " + " ".join(sys.argv), "config": vars(args),
              "versions": dict(versions(), faiss=faiss.__version__, faiss_default_threads=DEFAULT_FAISS_THREADS),
              "sizes": [], "text": {}}
    for n in args.sizes:
        row = bench_size(n, args.queries, rng)
        result["sizes"].append(row)
        print(f"{n:>7d} entries: rllama {row['rllama']['median_ms']:.3f} ms, "
              f"fp16 {row['rllama fp16']['median_ms']:.3f} ms, "
              f"limit {row['faiss (limit)']['median_ms']:.3f} ms, "
              f"naive {row['numpy (naive)']['median_ms']:.3f} ms, default threads "
              f"{row['rllama, faiss default threads']['median_ms']:.3f} ms, insert {row['insert_vectors_per_s']:.0f}/s,"
              f" RSS +{row['rss_growth_mb']:.0f} MB", flush=True)
    result["text"] = bench_text(rng)
    print(result["text"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
